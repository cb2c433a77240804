"""Typed configuration for every stage, loaded from YAML.

One YAML file per scale (``configs/tiny.yaml``, ...) holds one section per stage; each
section mirrors one dataclass below (the translator's own, ``TranslatorConfig``,
``TrainConfig`` and ``SweepConfig``, live in :mod:`gt_ray.translator.config`, which imports no
model code). Defaults live in the dataclasses and nowhere else. Unknown keys and bad values
raise ``ValueError`` with the offending path in the message.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gt_ray import storage
from gt_ray.translator.config import LAYOUT_FIELDS, SweepConfig, TrainConfig, TranslatorConfig
from gt_ray.yaml_io import from_dict, read_yaml


@dataclass
class PretrainConfig:
    """How gt-ray pretrains a model it builds from a transformers config."""

    steps: int = 1500
    """Optimizer steps on generated task data with the task parameter visible."""
    lr: float = 1.5e-3
    """AdamW peak learning rate (linear warmup, cosine decay)."""
    batch_size: int = 128
    """Examples per step."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    seed: int = 0
    """Seed for the initial weights and the generated data."""
    num_threads: int = 2
    """torch threads used by the pretraining process."""
    max_input_length: int | None = None
    """Pretrain on task inputs of at most this many characters only (None: all). A TinyLM
    that never saw long inputs learns what k does but executes long inputs poorly."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "num_threads")
        if self.max_input_length is not None:
            _positive(self, "max_input_length")
        _positive(self, "lr")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


@dataclass
class HealConfig:
    """How gt-ray heals a model cut from a larger one: logit distillation from the full model.

    The student starts as the teacher with only some of its layers; it then learns to match
    the teacher's next-token distributions (KL at every non-pad position) on public text:
    the task world's public split, task parameter shown (as in pretraining).
    """

    steps: int = 300
    """Optimizer steps."""
    lr: float = 3e-4
    """AdamW peak learning rate (linear warmup, cosine decay)."""
    batch_size: int = 32
    """Sequences per step."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    temperature: float = 1.0
    """Softmax temperature of both models' distributions in the KL (loss scaled by T^2)."""
    train_embeddings: bool = False
    """Also train the token embeddings and the output head (frozen by default: they stay
    the teacher's, so the student shares its tokenizer and output space exactly)."""
    seed: int = 0
    """Seed of the generated text."""
    num_threads: int = 2
    """torch threads used by the healing process."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "num_threads", "lr", "temperature")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


@dataclass
class ModelSpec:
    """One model of the pair: a local Hugging Face directory, a registry model, an
    architecture to build, or a model cut from another one.

    Exactly one of ``path``, ``registry``, ``arch`` and ``derive_from`` is set. A
    ``registry`` model is a pretrained model shipped inside a registry package
    (``gt_ray.registry.MODELS``), converted once into the cache. With ``arch`` gt-ray builds
    the model from a transformers config (``model_type`` plus its keyword arguments), gives
    it the built-in character tokenizer of the task world and pretrains it (``pretrain``).
    With ``derive_from`` gt-ray makes a smaller model of the same family: the other model's
    tokenizer, embeddings, final norm and head with only its layers ``keep_layers``, healed
    by distillation from it (``heal``). Built and derived models are cached on disk keyed by
    the hash of their recipe.
    """

    path: str | None = None
    """Local directory with a causal LM and its tokenizer (``from_pretrained`` layout)."""
    registry: str | None = None
    """Name of a registry model (``gt-ray models list``), e.g. ``smollm2-135m``."""
    arch: dict[str, Any] | None = None
    """transformers config kwargs with ``model_type`` (e.g. ``llama``), used to build."""
    derive_from: ModelSpec | None = None
    """The model to cut this one from (a ``path``, ``registry`` or ``arch`` spec), usually
    the pair's LLM: the TinyLM then shares its tokenizer and pretraining. Its ``dtype`` is
    the teacher's while healing (bfloat16 is faster on CPUs that have it); the student
    trains in float32."""
    keep_layers: list[int] | None = None
    """With ``derive_from``: indices (0-based, increasing) of the decoder layers kept."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """Pretraining recipe, used only with ``arch``."""
    heal: HealConfig = field(default_factory=HealConfig)
    """Healing recipe, used only with ``derive_from``."""
    dtype: str = "float32"
    """Weights dtype when loading: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.path, self.registry, self.arch, self.derive_from)) != 1:
            raise ValueError("exactly one of 'path', 'registry', 'arch' and 'derive_from' must be set for a model")
        if self.registry is not None:
            from gt_ray.registry import get_model  # local import: registry imports nothing from here

            get_model(self.registry)
        if self.arch is not None and "model_type" not in self.arch:
            raise ValueError("'arch' needs a 'model_type' (e.g. llama, qwen2)")
        if self.derive_from is not None:
            if self.derive_from.derive_from is not None:
                raise ValueError("derive_from must name a path, registry or arch model, not another derived one")
            if not self.keep_layers:
                raise ValueError("derive_from needs keep_layers: the indices of the layers to keep")
            if self.keep_layers[0] < 0 or any(b <= a for a, b in zip(self.keep_layers, self.keep_layers[1:])):
                raise ValueError(f"keep_layers must be increasing indices >= 0, got {self.keep_layers}")
        elif self.keep_layers is not None:
            raise ValueError("keep_layers is used only with derive_from")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class LoraSpec:
    """The LoRA spec of the pair card, shared by every fine-tune of either model; the two
    sides may adapt different modules (``llm_target_modules``), with one rank and alpha."""

    rank: int = 2
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names that get LoRA, in the order used inside each layer token (both sides,
    unless ``llm_target_modules`` names the LLM's)."""
    llm_target_modules: list[str] | None = None
    """The LLM's modules where they differ from the TinyLM's (``None``: ``target_modules``):
    e.g. every linear module of the LLM, so that it holds mixtures, and q, v of the TinyLM."""
    init_seed_tiny: int = 1234
    """Seed of the TinyLM's LoRA A init (B starts at zero)."""
    init_seed_llm: int = 5678
    """Seed of the LLM's LoRA A init (B starts at zero)."""

    def __post_init__(self) -> None:
        _positive(self, "rank", "alpha")
        for name in ("target_modules", "llm_target_modules"):
            modules = getattr(self, name)
            if modules is None and name == "llm_target_modules":
                continue
            if not modules:
                raise ValueError(f"{name} must name at least one module")
            if len(set(modules)) != len(modules):
                raise ValueError(f"{name} has duplicates: {modules}")

    def for_side(self, side: str) -> "LoraSpec":
        """The spec one side's model gets: ``target_modules`` are that side's modules."""
        if side not in ("tiny", "llm"):
            raise ValueError(f"side must be 'tiny' or 'llm', got {side!r}")
        modules = self.llm_target_modules if side == "llm" and self.llm_target_modules else self.target_modules
        return dataclasses.replace(self, target_modules=list(modules), llm_target_modules=None)

    def to_card(self) -> dict[str, Any]:
        """The spec as the pair card stores it; ``llm_target_modules`` only where it is set,
        so that cards of pairs with one module list keep their ids."""
        data = dataclasses.asdict(self)
        if data["llm_target_modules"] is None:
            del data["llm_target_modules"]
        return data


@dataclass
class PairConfig:
    """The model pair: a TinyLM the organizations can afford and the provider's LLM."""

    tiny: ModelSpec
    """The small model organizations fine-tune."""
    llm: ModelSpec
    """The large model that receives generated updates."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA spec and init seeds (the same for every fine-tune)."""


@dataclass
class TaskConfig:
    """The task world: which tasks, how datasets are drawn, and where real data lives."""

    names: list[str] = field(default_factory=lambda: ["caesar", "rotate", "index", "add", "delete"])
    """Built-in generated tasks (see gt_ray.tasks.TASKS)."""
    dirichlet_alpha: float = 0.5
    """Concentration of the task mixture drawn for each dataset (subset or organization)."""
    hidden_param: bool = True
    """Fine-tuning prompts hide the task parameter k (each dataset has one secret k)."""
    secret_per_task: bool = False
    """Each dataset draws one secret k per task instead of one for all its tasks, so the
    space of datasets (secrets x mixtures) is far larger than any shadow corpus covers."""
    data_files: dict[str, str] | None = None
    """Real data instead of generated tasks: split name (public, private_train,
    private_test) -> local JSONL or Parquet file with question/answer columns. Shadow
    subsets draw ``finetune.n_examples`` rows of ``public``; organizations draw from the
    private splits. A question in two splits' files stays only in the split its stable
    hash names (one file named for several splits is divided by that hash)."""
    question_column: str = "question"
    """Column of the data files holding the question (data files only)."""
    answer_column: str = "answer"
    """Column of the data files holding the answer (data files only)."""
    prompt_template: str = "Question: {question}\nAnswer:"
    """The prompt made of a row's question (a ``{question}`` field; data files only)."""
    answer_template: str = " {answer}"
    """The training target made of a row's answer (an ``{answer}`` field; with a chat
    template its leading whitespace is dropped). The loss covers these tokens and EOS only."""
    answer: str = "full"
    """``full``: train on (and exact-match) the whole answer text; ``final``: only the final
    answer after GSM8K's ``####`` (data files only)."""
    chat_template: str = "auto"
    """Data-file prompts go through the tokenizer's chat template as the user's turn:
    ``auto`` when the tokenizer has one, ``on`` always (an error without one), ``off``
    never. Each model uses its own tokenizer's template. Generated tasks never use one."""

    def __post_init__(self) -> None:
        from gt_ray.tasks import ANSWER_MODES, CHAT_TEMPLATE_MODES, TASKS, SPLITS  # local import: tasks imports nothing from here

        unknown = [n for n in self.names if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
        if not self.names:
            raise ValueError("names must list at least one task")
        _positive(self, "dirichlet_alpha")
        if self.data_files is not None:
            bad = [s for s in self.data_files if s not in SPLITS]
            if bad:
                raise ValueError(f"data_files keys must be among {list(SPLITS)}, got {bad}")
            bad = [f"{s}: {p}" for s, p in self.data_files.items() if not str(p).endswith((".jsonl", ".json", ".parquet"))]
            if bad:
                raise ValueError(f"data_files must be .jsonl, .json or .parquet files, got {bad}")
        if self.answer not in ANSWER_MODES:
            raise ValueError(f"answer must be one of {list(ANSWER_MODES)}, got {self.answer!r}")
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise ValueError(f"chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {self.chat_template!r}")
        for name, key in (("prompt_template", "question"), ("answer_template", "answer")):
            try:
                getattr(self, name).format(**{key: "x"})
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{name} must use only the field {{{key}}}, got {getattr(self, name)!r} ({e!r})") from None
            if "{" + key + "}" not in getattr(self, name):
                raise ValueError(f"{name} must contain {{{key}}}, got {getattr(self, name)!r}")


@dataclass
class DPConfig:
    """DP-SGD through opacus. The unit of privacy is one training example."""

    enabled: bool = False
    """Train with DP-SGD."""
    target_epsilon: float | None = None
    """Pick the noise multiplier for this epsilon (opacus make_private_with_epsilon)."""
    noise_multiplier: float | None = None
    """Or give the noise multiplier directly."""
    delta: float = 1e-5
    """Target delta; should be below 1 / dataset size."""
    max_grad_norm: float = 1.0
    """Per-example gradient clipping norm."""
    accountant: str = "rdp"
    """opacus accountant: rdp (safe default), prv or gdp."""

    def __post_init__(self) -> None:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("DP needs exactly one of target_epsilon and noise_multiplier")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        _positive(self, "max_grad_norm")
        if self.accountant not in ("rdp", "prv", "gdp"):
            raise ValueError(f"accountant must be rdp, prv or gdp, got {self.accountant!r}")


@dataclass
class FinetuneConfig:
    """LoRA fine-tuning of one model on one dataset, with update-vector snapshots."""

    lr: float = 3e-3
    """AdamW learning rate (constant). 1e-2 made updates mostly noise in the prototype."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 32
    """Examples per step (sampled with replacement from the dataset)."""
    n_examples: int = 256
    """Training examples per dataset (shadow subset or organization)."""
    weight_decay: float = 0.0
    """AdamW weight decay on LoRA parameters."""
    snapshot_steps: list[int] = field(default_factory=lambda: [60, 80, 100])
    """Steps (1-based, after that step's update) at which the update vector is recorded."""
    num_threads: int = 1
    """torch threads per fine-tuning process."""

    def __post_init__(self) -> None:
        _positive(self, "lr", "steps", "batch_size", "n_examples", "num_threads")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.snapshot_steps:
            raise ValueError("snapshot_steps must list at least one step")
        bad = [s for s in self.snapshot_steps if not 1 <= s <= self.steps]
        if bad:
            raise ValueError(f"snapshot_steps must be within 1..steps={self.steps}, got {bad}")
        if sorted(set(self.snapshot_steps)) != list(self.snapshot_steps):
            raise ValueError("snapshot_steps must be strictly increasing")


@dataclass
class CorpusConfig:
    """The shadow corpus build (Ray Train workers, one shard per shadow subset)."""

    n_subsets: int = 160
    """Shadow subsets drawn from the public split."""
    num_workers: int = 2
    """Ray Train workers; each takes subsets rank, rank + world, ..."""
    use_gpu: bool = False
    """Give each worker a GPU (real clusters)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; torch uses this many threads (at least 1)."""
    max_failures: int = 3
    """Ray Train FailureConfig: restarts of the worker group after a worker dies."""
    storage_path: str | None = None
    """Where the corpus goes; default ``{work_dir}/corpus``."""
    seed: int = 1000
    """Seed of the subset plan (subset i depends only on this seed and i)."""
    n_tiny_only: int = 0
    """TinyLM-only shadow subsets besides the ``n_subsets`` paired ones: the TinyLM update
    and the subset's spec, no LLM fine-tune (about 5x cheaper). The translator's function
    loss needs nothing more; baselines and the MSE term use the paired subsets only."""

    def __post_init__(self) -> None:
        _positive(self, "n_subsets", "num_workers", "cpus_per_worker")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.n_tiny_only < 0:
            raise ValueError(f"n_tiny_only must be >= 0, got {self.n_tiny_only}")


@dataclass
class TranslatorSection:
    """Training the Grad-Transformer on the shadow corpus (Ray Train, data parallel)."""

    model: TranslatorConfig = field(default_factory=TranslatorConfig)
    """The architecture (gt_ray.translator.config.TranslatorConfig) without the layouts,
    which come from the corpus."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization (gt_ray.translator.config.TrainConfig)."""
    val_fraction: float = 0.1
    """Fraction of shadow subsets held out for validation (split by subset, never by row):
    they choose epochs, sweep trials and variants."""
    test_fraction: float = 0.2
    """Fraction of shadow subsets held out for the held-out table only; nothing is chosen on them."""
    num_workers: int = 1
    """Ray Train data-parallel workers."""
    use_gpu: bool = False
    """Train on GPUs (real clusters)."""
    best_config: str | None = None
    """YAML written by ``gt-ray translator tune``; its model/train values override these.
    Default: ``{work_dir}/translator_best.yaml`` when that file exists."""
    seeds: list[int] | None = None
    """Training seeds: one checkpoint each, every organization scored with each and the
    mean reported (no seed is ever picked on test). The first is the one the service
    serves. ``None``: one checkpoint with ``train.seed``."""

    def __post_init__(self) -> None:
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"translator.seeds must be a non-empty list of distinct seeds, got {self.seeds}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"test_fraction must be in (0, 1) and leave training subsets beside val_fraction, "
                             f"got {self.test_fraction}")
        _positive(self, "num_workers")
        bad = [name for name in LAYOUT_FIELDS if getattr(self.model, name) is not None]
        if bad:
            raise ValueError(f"model must not set the layouts {sorted(bad)}: they come from the corpus")


@dataclass
class EvalConfig:
    """The evaluation: simulated organizations on the private split, several seeds."""

    n_orgs: int = 6
    """Organizations per seed, each with its own secret k and task mixture."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the organization draws (and their fine-tunes)."""
    n_test: int = 400
    """Test examples per organization (private_test split)."""
    seen_fraction: float = 0.0
    """Fraction of each seed's organizations that hold private data of a combination some
    training shadow subset has (its mixture and secrets, drawn from the private pools): the
    paper's own setting, the "seen" group. The others draw a fresh mixture and secrets."""
    kd: list[str] = field(default_factory=lambda: ["sequence", "logit"])
    """Knowledge-distillation baselines (rows ``kd_sequence``, ``kd_logit``): the provider
    labels ``finetune.n_examples`` public prompts with the TinyLM carrying the organization's
    update and fine-tunes the LLM on them with the ceiling's recipe. ``sequence`` trains on
    the TinyLM's greedy answers, ``logit`` on its next-token distributions (skipped when the
    two models do not share a vocabulary). ``[]`` turns both off."""
    num_threads: int = 1
    """torch threads of `gt-ray eval` and `gt-ray translator eval` where they run here
    (``--serial``, or no Ray). Their Ray tasks always run on one thread, so the default 1
    gives ``--serial`` the Ray path's exact figures; more threads give other float rounding."""

    def __post_init__(self) -> None:
        _positive(self, "n_orgs", "n_test", "num_threads")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        unknown = [m for m in self.kd if m not in ("sequence", "logit")]
        if unknown or len(set(self.kd)) != len(self.kd):
            raise ValueError(f"kd must list distinct modes out of sequence, logit; got {self.kd}")
        if not 0 <= self.seen_fraction <= 1:
            raise ValueError(f"seen_fraction must be in [0, 1], got {self.seen_fraction}")


@dataclass
class CollabConfig:
    """The collaboration benchmark (``gt-ray collab``): several organizations with one task
    (one mixture and secrets) but few examples each join one round."""

    sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Numbers of organizations in a round, increasing; a round of ``n`` takes the group's
    first ``n`` members, so the rounds are nested."""
    n_examples: int = 32
    """Private training examples per organization (``private_train``)."""
    groups: int = 3
    """Groups (one shared task each) per seed."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the group draws (and the members' fine-tunes)."""
    n_test: int = 400
    """Test examples per group (``private_test``, the group's task)."""
    attack_scale: float = 100.0
    """The scaling attacker sends this multiple of its honest update."""
    trim_fraction: float = 0.1
    """Fraction trimmed at each end by the ``trimmed_mean`` rows (the service's default)."""

    def __post_init__(self) -> None:
        _positive(self, "n_examples", "groups", "n_test", "attack_scale")
        if not self.sizes or any(n < 1 for n in self.sizes) or self.sizes != sorted(set(self.sizes)):
            raise ValueError(f"sizes must be strictly increasing integers >= 1, got {self.sizes}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")


@dataclass
class ExperimentConfig:
    """Everything one scale needs; each job reads the sections it uses."""

    pair: PairConfig
    """The model pair and the LoRA spec."""
    tasks: TaskConfig = field(default_factory=TaskConfig)
    """The task world."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuning settings for shadow subsets and organizations."""
    dp: DPConfig = field(default_factory=DPConfig)
    """DP-SGD settings for organizations."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The shadow corpus build."""
    translator: TranslatorSection = field(default_factory=TranslatorSection)
    """The Grad-Transformer and its training."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The hyperparameter search."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The organizations' evaluation."""
    collab: CollabConfig = field(default_factory=CollabConfig)
    """The collaboration and robust-aggregation benchmark."""
    work_dir: str = "runs/tiny"
    """Where stage outputs go (corpus, checkpoints, results), relative to the cwd."""
    cache_dir: str = "~/.cache/gt-ray"
    """Cache for built and pretrained models, shared across runs."""
    seed: int = 0
    """Master seed of the experiment."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def corpus_dir(self) -> str:
        return self.corpus.storage_path or storage.join(self.work_dir, "corpus")


def load_yaml(path: str | os.PathLike, cls: type = ExperimentConfig) -> Any:
    """Load a YAML file into dataclass ``cls``.

    A file may start from another: ``base: tiny.yaml`` (relative to the file) loads that one
    first and merges this file's mappings over it, key by key (a list or scalar replaces).

    Raises:
        ValueError: if the file (or a base) is missing, is not valid YAML, names bases in a
            cycle, or does not fit ``cls``.
    """
    p = Path(path)
    data = read_yaml(p)
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


"""The translator's configs: its architecture (`TranslatorConfig`), its optimization
(`TrainConfig`), the hyperparameter search over both (`SweepConfig`) and the modes they accept.

Pure dataclasses: this module imports no torch and no transformers, so `gt_ray.config`
(the YAML loader) can type its translator section with them without loading model code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

NormalizationMode = Literal["coordinate", "global", "none"]
NORMALIZATION_MODES = ("coordinate", "global", "none")
DecoderMode = Literal["autoregressive", "parallel"]
DECODER_MODES = ("autoregressive", "parallel")
OBJECTIVES = ("mse", "function")
HEADS = ("direct", "retrieval")
InputMode = Literal["update", "behaviour"]
INPUT_MODES = ("update", "behaviour")
SELECT_ON = ("nll", "accuracy")
LAYOUT_FIELDS = ("d_tiny", "L_tiny", "d_llm", "L_llm")
"""The vector layouts: taken from the corpus (or the data), never from a YAML."""


def _config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)


@dataclass
class TranslatorConfig:
    """Architecture of a Grad-Transformer and the vector layouts it maps between."""

    d_tiny: int | None = None
    """Width of one encoder input token: one TinyLM layer's flattened LoRA matrices (with
    ``input: behaviour``, one behaviour token). None until the layouts are known (a YAML's
    translator section leaves them to the corpus, see `with_layouts`); a model needs all four."""
    L_tiny: int | None = None
    """Number of encoder input tokens: the TinyLM's layers (``behaviour_rows`` with
    ``input: behaviour``)."""
    d_llm: int | None = None
    """Width of one LLM layer token."""
    L_llm: int | None = None
    """Number of LLM layers, i.e. decoder steps."""
    d_model: int = 128
    """Transformer width."""
    num_layers: int = 2
    """Encoder depth (and decoder depth unless `num_decoder_layers` is set)."""
    num_decoder_layers: int | None = None
    """Decoder depth; None means the same as `num_layers`."""
    num_heads: int = 4
    """Attention heads."""
    d_kv: int | None = None
    """Width of one attention head; None means `d_model // num_heads`."""
    d_ff: int = 512
    """Hidden width of the feed-forward blocks."""
    feed_forward_proj: str = "relu"
    """T5 feed-forward flavour: "relu", "gelu", "gated-gelu", ... (T5 v1.1 uses "gated-gelu")."""
    dropout: float = 0.1
    """Dropout rate inside the T5 stacks."""
    normalization: NormalizationMode = "coordinate"
    """How vectors are standardized before the model sees them: "coordinate" (mean/std per
    coordinate, from the training set), "global" (one mean/std per side) or "none"."""
    norm_eps: float = 1e-8
    """Floor on every std of the normalizer, so constant coordinates do not blow up."""
    input_norm_eps: float | None = None
    """Floor on the input side's stds alone (None: `norm_eps`). Inputs with rare, large moves
    (the behaviour matrices' probabilities: a coordinate near 0 on every training row that
    jumps to 0.5 on a test row) otherwise standardize to values in the thousands."""
    pretrained_t5_path: str | None = None
    """Local T5 directory (config.json + weights) whose encoder/decoder stacks replace the
    random init. Use `TranslatorConfig.from_pretrained_t5` so the widths match it."""
    decoder: DecoderMode = "autoregressive"
    """"autoregressive": the paper's decoder, each LLM layer fed the previous output (KV
    cache at inference, teacher forcing under the MSE objective). "parallel": one learned
    query per LLM layer, all layers in one pass; it never reads its own outputs, so
    training and inference see the same inputs (no exposure bias)."""
    head: str = "direct"
    """"direct": the decoder's output is the update. "retrieval" (parallel decoder only):
    soft attention over the training subsets' real LLM updates, plus the decoder's output as
    a learned residual, so the output starts as a mixture of valid updates."""
    bank_size: int = 0
    """Retrieval head: number of stored training updates (set by training from the data)."""
    input: InputMode = "update"
    """What the encoder reads. "update": the TinyLM update's layer rows. "behaviour": what the
    update does, the updated TinyLM's next-token probabilities along its greedy answers to
    ``behaviour_prompts`` public probe prompts (`gt_ray.translator.behaviour`), cut into
    ``behaviour_rows`` tokens; the provider computes it with its TinyLM in training and in
    the service, and the translator still maps an update to an update."""
    behaviour_prompts: int = 64
    """``input: behaviour``: probe prompts, drawn from the training subsets' public examples."""
    behaviour_steps: int = 8
    """``input: behaviour``: greedy answer positions recorded per prompt."""
    behaviour_rows: int = 2
    """``input: behaviour``: input tokens the behaviour matrix is cut into (must divide
    prompts x steps x vocabulary). One token per prompt learnt nothing (docs/world.md)."""

    def __post_init__(self) -> None:
        for name in (*LAYOUT_FIELDS, "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if name in LAYOUT_FIELDS and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TranslatorConfig.{name} must be a positive int, got {value!r}")
        if self.num_decoder_layers is not None and self.num_decoder_layers < 1:
            raise ValueError(f"TranslatorConfig.num_decoder_layers must be >= 1, got {self.num_decoder_layers}")
        if self.d_kv is None and self.d_model % self.num_heads != 0:
            raise ValueError(
                f"TranslatorConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "set d_kv explicitly"
            )
        if self.d_kv is not None and self.d_kv < 1:
            raise ValueError(f"TranslatorConfig.d_kv must be >= 1, got {self.d_kv}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TranslatorConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.normalization not in NORMALIZATION_MODES:
            raise ValueError(
                f"TranslatorConfig.normalization must be one of {NORMALIZATION_MODES}, got {self.normalization!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"TranslatorConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.input_norm_eps is not None and not self.input_norm_eps > 0:
            raise ValueError(f"TranslatorConfig.input_norm_eps must be > 0 or None, got {self.input_norm_eps}")
        if self.decoder not in DECODER_MODES:
            raise ValueError(f"TranslatorConfig.decoder must be one of {DECODER_MODES}, got {self.decoder!r}")
        if self.head not in HEADS:
            raise ValueError(f"TranslatorConfig.head must be one of {HEADS}, got {self.head!r}")
        if self.head == "retrieval" and self.decoder != "parallel":
            raise ValueError("TranslatorConfig.head 'retrieval' needs decoder 'parallel'")
        if self.input not in INPUT_MODES:
            raise ValueError(f"TranslatorConfig.input must be one of {INPUT_MODES}, got {self.input!r}")
        for name in ("behaviour_prompts", "behaviour_steps", "behaviour_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TranslatorConfig.{name} must be a positive int, got {value!r}")
        if self.bank_size < 0:
            raise ValueError(f"TranslatorConfig.bank_size must be >= 0, got {self.bank_size}")
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated"):
            raise ValueError(
                f"TranslatorConfig.feed_forward_proj must be 'ACT' or 'gated-ACT', got {self.feed_forward_proj!r}"
            )

    @property
    def has_layouts(self) -> bool:
        """Whether all four vector layouts are set (a model can be built)."""
        return all(getattr(self, name) is not None for name in LAYOUT_FIELDS)

    def with_layouts(self, *, d_tiny: int, L_tiny: int, d_llm: int, L_llm: int) -> TranslatorConfig:
        """A copy with the vector layouts set (e.g. from the corpus' shapes).

        Raises:
            ValueError: on a layout that is not a positive int.
        """
        return dataclasses.replace(self, d_tiny=d_tiny, L_tiny=L_tiny, d_llm=d_llm, L_llm=L_llm)

    def require_layouts(self) -> None:
        """Raises ValueError unless all four vector layouts are set."""
        missing = [name for name in LAYOUT_FIELDS if getattr(self, name) is None]
        if missing:
            raise ValueError(f"TranslatorConfig needs the vector layouts {missing} (see with_layouts)")

    @property
    def decoder_layers(self) -> int:
        """Decoder depth after applying the default."""
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def head_dim(self) -> int:
        """Width of one attention head after applying the default."""
        return self.d_model // self.num_heads if self.d_kv is None else self.d_kv

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TranslatorConfig:
        """Builds a config from `to_dict` output (ValueError on unknown keys or bad values)."""
        return _config_from_dict(cls, data)

    @classmethod
    def from_pretrained_t5(
        cls, path: str | Path, *, d_tiny: int, L_tiny: int, d_llm: int, L_llm: int, **overrides: Any
    ) -> TranslatorConfig:
        """A config whose architecture fields are read from a local T5 directory.

        Args:
            path: local T5 directory holding config.json.
            d_tiny, L_tiny, d_llm, L_llm: the vector layouts.
            **overrides: other fields (dropout, normalization, ...).

        Returns:
            The config with `pretrained_t5_path=str(path)`.

        Raises:
            ValueError: if path holds no config.json.
        """
        from gt_ray.translator.model import read_t5_config  # transformers only when asked for a pretrained T5

        t5 = read_t5_config(path)
        return cls(
            d_tiny=d_tiny,
            L_tiny=L_tiny,
            d_llm=d_llm,
            L_llm=L_llm,
            d_model=t5.d_model,
            num_layers=t5.num_layers,
            num_decoder_layers=t5.num_decoder_layers,
            num_heads=t5.num_heads,
            d_kv=t5.d_kv,
            d_ff=t5.d_ff,
            feed_forward_proj=t5.feed_forward_proj,
            pretrained_t5_path=str(path),
            **overrides,
        )


@dataclass
class TrainConfig:
    """Optimization of a translator.

    Objective "mse": MSE in normalized space, teacher-forced. Objective "function": the
    LLM's answer loss with the generated update plugged in, on the training subset's own
    examples (see `gt_ray.translator.function_loss`), plus `mse_weight` x the normalized MSE, both on
    the decoded output (what inference produces). With an LLM at hand (a
    `FunctionObjective`), epochs are chosen on the validation subsets' answer NLL whatever
    the objective; without one, on validation MSE.
    """

    lr: float = 3e-4
    """Peak AdamW learning rate (the fragile one: tune it)."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (not biases, norms or the start token)."""
    batch_size: int = 32
    """Pairs per optimizer step (per worker under data-parallel training)."""
    max_epochs: int = 200
    """Upper bound on epochs."""
    patience: int = 20
    """Stop after this many epochs without a new best validation MSE; best weights are kept."""
    min_delta: float = 0.0
    """A validation MSE must beat the best by more than this to count as an improvement."""
    seed: int = 0
    """Seeds model init, shuffling and dropout."""
    grad_clip: float | None = 1.0
    """Max global grad norm; None disables clipping."""
    warmup: int = 0
    """Optimizer steps of linear learning-rate warmup, constant afterwards."""
    val_autoregressive: bool = True
    """Early-stop on the MSE of autoregressive decoding (what inference does) instead of
    the teacher-forced MSE; both are logged in the history."""
    objective: str = "mse"
    """"mse" or "function" (see the class docstring)."""
    mse_weight: float = 0.1
    """Weight of the normalized MSE beside the answer loss under the function objective."""
    examples_per_subset: int = 16
    """Function objective: the subset's examples drawn per update per step."""
    sample_snapshots: bool = False
    """Each epoch takes one random snapshot row per training subset (dense snapshots as
    augmentation) instead of every row."""
    select_on: str = "nll"
    """With an LLM at hand: choose epochs on the validation subsets' answer ``nll`` or on
    their exact-match ``accuracy`` (NLL rewards hedging between answers, exact match
    rewards committing to one)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_delta < 0:
            raise ValueError(f"TrainConfig.min_delta must be >= 0, got {self.min_delta}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.warmup < 0:
            raise ValueError(f"TrainConfig.warmup must be >= 0, got {self.warmup}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"TrainConfig.select_on must be nll or accuracy, got {self.select_on!r}")
        if self.mse_weight < 0:
            raise ValueError(f"TrainConfig.mse_weight must be >= 0, got {self.mse_weight}")
        if self.examples_per_subset < 1:
            raise ValueError(f"TrainConfig.examples_per_subset must be >= 1, got {self.examples_per_subset}")

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Builds a config from `to_dict` output (ValueError on unknown keys or bad values)."""
        return _config_from_dict(cls, data)


SCHEDULERS = ("asha", "fifo")
"""Values of ``sweep.scheduler``."""


@dataclass
class SweepConfig:
    """The Ray Tune search over the translator's hyperparameters (ASHA early stopping, or
    every trial to ``max_epochs``)."""

    num_samples: int = 6
    """Trials drawn from the search space."""
    max_concurrent_trials: int = 2
    """Trials at once, as set here: the cluster's size at start is not consulted (an
    autoscaling cluster may start with no worker; Ray queues trials until resources come)."""
    max_epochs: int = 40
    """Epochs per trial at most (ASHA's max_t)."""
    grace_period: int = 5
    """Epochs before ASHA may stop a trial."""
    scheduler: str = "asha"
    """``asha``: stop trials early (Ray's ASHAScheduler); ``fifo``: every trial trains
    ``max_epochs``. ASHA's choice depends on which trial reports first: a trial reaching a rung
    before the others is kept, a later one is compared with it, so with few trials run two at a
    time two runs of the same sweep can keep different trials (seen: lr 1.3e-3 kept to epoch 8
    in one run, stopped at 3 in the next, and the other trial chosen). ``fifo`` compares every
    trial over the same epochs, whatever the order."""
    lr: list[float] = field(default_factory=lambda: [1e-4, 3e-3])
    """Log-uniform learning-rate bounds [low, high]."""
    d_model: list[int] = field(default_factory=lambda: [64, 128])
    """Widths to choose from."""
    num_layers: list[int] = field(default_factory=lambda: [1, 2])
    """Depths to choose from."""
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.1])
    """Dropout rates to choose from."""
    batch_size: list[int] = field(default_factory=lambda: [16, 32])
    """Batch sizes to choose from."""
    seed: int = 0
    """Seed of the search."""
    cpus_per_trial: float = 1.0
    """CPUs each trial reserves (fractions allowed, never 0); torch uses that many threads (at least 1)."""
    gpus_per_trial: float = 0.0
    """GPUs each trial reserves: 0 trains on the CPU, a fraction (0.25) shares one GPU among
    trials, a whole number above 1 gives a trial several. The translator trains on it."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_concurrent_trials", "max_epochs", "grace_period"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.cpus_per_trial <= 0:
            raise ValueError(f"cpus_per_trial must be > 0 (Ray refuses 0; a GPU trial can take 0.01), "
                             f"got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0:
            raise ValueError(f"gpus_per_trial must be >= 0, got {self.gpus_per_trial}")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ValueError(f"gpus_per_trial above 1 must be a whole number, got {self.gpus_per_trial}")
        if len(self.lr) != 2 or not 0 < self.lr[0] <= self.lr[1]:
            raise ValueError(f"lr must be [low, high] with 0 < low <= high, got {self.lr}")
        for name in ("d_model", "num_layers", "dropout", "batch_size"):
            if not getattr(self, name):
                raise ValueError(f"{name} must list at least one value")

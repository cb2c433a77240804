"""Build or load the model pair, attach LoRA with the card's init, and the pair card.

Every model ends up as a normal Hugging Face directory (config, tokenizer, safetensors):
a ``path`` model is used where it lies, a ``registry`` model is converted once from its
package into ``{cache_dir}/models/{name}-{sha}`` (gt_ray.registry), an ``arch`` model is built from a transformers
config, pretrained on the generated task world, and cached under
``{cache_dir}/models/{model_type}-{hash}``, a ``derive_from`` model is cut from another
model (a few of its layers) and healed by distillation from it, cached under
``{cache_dir}/models/derived-{hash}``; all are rebuilt when missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from gt_ray import storage
from gt_ray import tasks as tasks_mod
from gt_ray.config import ExperimentConfig, HealConfig, LoraSpec, ModelSpec, PairConfig, PretrainConfig
from gt_ray.yaml_io import config_hash
from gt_ray.registry import COMPLETE_MARKER, converted_dir, fetch_model, get_model, publish_model_dir
from gt_ray.updates import UpdateLayout, derive_layout, read_lora, seeded_lora_init, tensor_sha256, write_lora

logger = logging.getLogger(__name__)

CARD_VERSION = 2
"""2: ``card_id`` hashes what the pair is, not where its models lie (no ``path``); 1: with paths."""
BUILD_FILE = "gt_ray_build.json"
"""How gt-ray made a built or derived model (recipe, losses, seconds), inside its directory."""
DERIVE_VERSION = 1
"""Bump when cutting or healing changes, so cached derived models are made again."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_char_tokenizer(task_names: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """The character tokenizer of the generated world of ``task_names`` (one token per
    character; :func:`gt_ray.tasks.vocab`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(tasks_mod.vocab(task_names))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=tasks_mod.PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=tasks_mod.PAD, eos_token=tasks_mod.EOS)


def pretrain_record(cfg: PretrainConfig) -> dict[str, Any]:
    """``cfg`` as recorded in a built model's key and build file: optional settings left
    unset are left out, so models built before they existed keep their keys."""
    record = asdict(cfg)
    if record["max_input_length"] is None:
        del record["max_input_length"]
    return record


def built_model_dir(spec: ModelSpec, cache_dir: str | Path, task_names: list[str]) -> Path:
    """Where the built-and-pretrained model of ``spec`` is cached (keyed by its hash)."""
    key = config_hash({"arch": spec.arch, "pretrain": pretrain_record(spec.pretrain), "vocab": tasks_mod.vocab(task_names),
                       "tasks": sorted(task_names), "world": tasks_mod.WORLD_VERSION})
    return Path(cache_dir).expanduser() / "models" / f"{spec.arch['model_type']}-{key}"


def derived_model_dir(spec: ModelSpec, cache_dir: str | Path, task_names: list[str]) -> Path:
    """Where the derived-and-healed model of ``spec`` is cached, keyed by its teacher (its
    cache directory's name, or a ``path`` teacher's weights hash), kept layers, heal recipe
    and healing data."""
    teacher = spec.derive_from
    teacher_dir = cached_model_dir(teacher, cache_dir, task_names)
    teacher_key = teacher_dir.name if teacher_dir is not None else weights_sha256(Path(teacher.path).expanduser())
    key = config_hash({"teacher": teacher_key, "teacher_dtype": teacher.dtype, "keep_layers": spec.keep_layers,
                       "heal": asdict(spec.heal), "tasks": sorted(task_names), "world": tasks_mod.WORLD_VERSION,
                       "derive": DERIVE_VERSION})
    return Path(cache_dir).expanduser() / "models" / f"derived-{key}"


def cached_model_dir(spec: ModelSpec, cache_dir: str | Path, task_names: list[str]) -> Path | None:
    """Where gt-ray keeps the model of ``spec`` in its cache; ``None`` for a ``path`` model."""
    if spec.registry is not None:
        return converted_dir(get_model(spec.registry), cache_dir)
    if spec.arch is not None:
        return built_model_dir(spec, cache_dir, task_names)
    if spec.derive_from is not None:
        return derived_model_dir(spec, cache_dir, task_names)
    return None


def prepare_model(spec: ModelSpec, cache_dir: str | Path, task_names: list[str],
                  on_step: Callable[[int, float], None] | None = None) -> Path:
    """Return a local directory holding the model of ``spec``, building it if needed.

    Args:
        spec: a ``path`` spec (returned as is, after a check), a ``registry`` spec
            (converted into the cache on first use) or an ``arch`` spec.
        cache_dir: cache root for built models.
        task_names: tasks the pretraining data covers.
        on_step: called as ``on_step(step, loss)`` during pretraining, for progress.

    Raises:
        ValueError: if a ``path`` does not hold a Hugging Face model, a registry
            model cannot be converted (see :func:`gt_ray.registry.fetch_model`), or
            ``keep_layers`` names a layer the teacher does not have.
    """
    if spec.registry is not None:
        return fetch_model(spec.registry, cache_dir)
    if spec.derive_from is not None:
        return _prepare_derived(spec, cache_dir, task_names, on_step)
    if spec.path is not None:
        p = Path(spec.path).expanduser()
        if not (p / "config.json").is_file():
            raise ValueError(f"model path {p} has no config.json: not a Hugging Face model directory")
        return p
    out = built_model_dir(spec, cache_dir, task_names)
    if (out / COMPLETE_MARKER).is_file():
        return out
    tokenizer = build_char_tokenizer(task_names)
    arch = dict(spec.arch)
    model_type = arch.pop("model_type")
    arch.setdefault("vocab_size", len(tokenizer))
    arch.setdefault("pad_token_id", tokenizer.pad_token_id)
    arch.setdefault("eos_token_id", tokenizer.eos_token_id)
    arch.setdefault("bos_token_id", None)
    config = AutoConfig.for_model(model_type, **arch)
    torch.manual_seed(spec.pretrain.seed)
    model = AutoModelForCausalLM.from_config(config)
    logger.info("pretraining %s (%d params) for %d steps", out.name, count_params(model), spec.pretrain.steps)
    t0 = time.time()
    stats = pretrain(model, tokenizer, spec.pretrain, task_names, on_step)
    stats["seconds"] = round(time.time() - t0, 1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / BUILD_FILE).write_text(json.dumps(
        {"arch": spec.arch, "pretrain": pretrain_record(spec.pretrain), "params": count_params(model), **stats},
        indent=2, sort_keys=True))
    return publish_model_dir(tmp, out)


def _prepare_derived(spec: ModelSpec, cache_dir: str | Path, task_names: list[str],
                     on_step: Callable[[int, float], None] | None) -> Path:
    teacher_dir = prepare_model(spec.derive_from, cache_dir, task_names)
    out = derived_model_dir(spec, cache_dir, task_names)
    if (out / COMPLETE_MARKER).is_file():
        return out
    teacher, tokenizer = load_model(teacher_dir, spec.derive_from.dtype)  # bfloat16 here makes healing faster
    student = cut_layers(teacher, spec.keep_layers)
    logger.info("healing %s (%d of %d layers, %d params) for %d steps", out.name, len(spec.keep_layers),
                teacher.config.num_hidden_layers, count_params(student), spec.heal.steps)
    t0 = time.time()
    stats = heal(student, teacher, tokenizer, spec.heal, task_names, on_step)
    stats["seconds"] = round(time.time() - t0, 1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    teacher_card = {"path": str(Path(teacher_dir).resolve()), "weights_sha256": weights_sha256(teacher_dir),
                    "n_layers": teacher.config.num_hidden_layers, "params": count_params(teacher)}
    (tmp / BUILD_FILE).write_text(json.dumps(
        {"derived_from": teacher_card, "keep_layers": list(spec.keep_layers), "heal": asdict(spec.heal),
         "heal_data": {"tasks": sorted(task_names), "split": "public", "k_shown": True, "world": tasks_mod.WORLD_VERSION},
         "params": count_params(student), **stats}, indent=2, sort_keys=True))
    return publish_model_dir(tmp, out)


def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The name and the ModuleList of a causal LM's decoder layers: the one ModuleList with
    ``config.num_hidden_layers`` entries (no per-architecture attribute names)."""
    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ValueError(f"cannot tell the decoder layers of {type(model).__name__}: "
                         f"{len(found)} module lists of num_hidden_layers={n} entries")
    return found[0]


def cut_layers(teacher: torch.nn.Module, keep_layers: list[int]) -> torch.nn.Module:
    """A fresh model of the teacher's family with only the layers ``keep_layers``.

    Same config except the layer count (and per-layer lists such as ``layer_types``, cut
    alike); every weight is copied from the teacher: embeddings, the kept layers in order,
    the final norm and the head, in float32. The teacher is left unchanged.

    Raises:
        ValueError: if a kept index is not a layer of the teacher.
    """
    n = teacher.config.num_hidden_layers
    bad = [i for i in keep_layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"keep_layers {bad} out of range: the model has {n} layers (0..{n - 1})")
    prefix, _ = _decoder_layers(teacher)
    cfg = teacher.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    for key, value in list(cfg.items()):  # per-layer settings, e.g. layer_types
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            cfg[key] = [value[i] for i in keep_layers]
    cfg["num_hidden_layers"] = len(keep_layers)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # trained: float32 whatever the teacher's dtype
    new_index = {old: new for new, old in enumerate(keep_layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            old, rest = key[len(prefix) + 1:].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}.{new_index[int(old)]}.{rest}"
        state[key] = value.float().clone()
    student.load_state_dict(state, strict=True)
    student.eval()
    return student


def distill_loss(student: torch.nn.Module, teacher: torch.nn.Module, batch: tasks_mod.Batch,
                 temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions, mean over non-pad positions,
    times ``temperature`` squared (Hinton et al.'s scaling, so gradients keep their size)."""
    with torch.no_grad():
        t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()  # (B, T, V)
    s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()  # (B, T, V)
    mask = batch.attention_mask.bool()
    return token_kl(s_logits[mask], t_logits[mask], temperature).mean()  # mean over (N,) positions


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position ``KL(teacher || student)`` of next-token distributions at ``temperature``,
    times ``temperature`` squared: logits (..., V) -> (...)."""
    t_logp = torch.log_softmax(teacher_logits / temperature, dim=-1)
    s_logp = torch.log_softmax(student_logits / temperature, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1) * temperature**2


def heal(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, cfg: HealConfig, task_names: list[str],
         on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Distill ``teacher`` into ``student`` on generated public-split text (task parameter
    shown, as pretraining shows it), AdamW with warmup and cosine decay.

    Embeddings and head stay frozen unless ``cfg.train_embeddings``. Returns the
    distillation loss on a fixed held-out batch before and after healing.
    """
    rng = random.Random(cfg.seed)
    held_out = tasks_mod.encode_examples(tokenizer, tasks_mod.generate_pretraining_batch(
        random.Random(f"heal-eval|{cfg.seed}"), task_names, 64))
    if not cfg.train_embeddings:
        for module in (student.get_input_embeddings(), student.get_output_embeddings()):
            for p in module.parameters():
                p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    teacher.eval()
    student.eval()
    with torch.no_grad():
        before = distill_loss(student, teacher, held_out, cfg.temperature).item()
    student.train()
    losses = _train_on_pretraining_batches(
        params, lambda batch: distill_loss(student, teacher, batch, cfg.temperature), tokenizer, rng, task_names, cfg,
        weight_decay=0.0, on_step=on_step)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        after = distill_loss(student, teacher, held_out, cfg.temperature).item()
    tail = losses[-20:]
    return {"kd_loss_before": before, "kd_loss_after": after, "final_loss": sum(tail) / len(tail)}


def _train_on_pretraining_batches(params: list, loss_of: Callable, tokenizer, rng: random.Random, task_names: list[str],
                                  cfg, weight_decay: float, on_step: Callable[[int, float], None] | None,
                                  max_input_length: int | None = None) -> list[float]:
    """AdamW (warmup + cosine, grad norm clipped at 1) on ``cfg.steps`` generated public-split
    batches of ``cfg.batch_size``; returns the loss of every step. Shared by healing and pretraining."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, cfg.warmup_steps, cfg.steps))
    losses = []
    for step in range(1, cfg.steps + 1):
        batch = tasks_mod.encode_examples(tokenizer, tasks_mod.generate_pretraining_batch(
            rng, task_names, cfg.batch_size, max_input_length))
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def pretrain(model: torch.nn.Module, tokenizer, cfg: PretrainConfig, task_names: list[str],
             on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Pretrain on generated public-split examples with the task parameter shown.

    AdamW with linear warmup and cosine decay; the loss covers answer tokens only (the
    inputs are random strings, nothing to learn there). Returns final loss figures.
    """
    rng = random.Random(cfg.seed)
    model.train()
    losses = _train_on_pretraining_batches(list(model.parameters()), lambda batch: lm_loss(model, batch), tokenizer, rng,
                                           task_names, cfg, weight_decay=0.01, on_step=on_step,
                                           max_input_length=cfg.max_input_length)
    model.eval()
    tail = losses[-50:]
    return {"final_loss": sum(tail) / len(tail)}


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def lm_loss(model: torch.nn.Module, batch: tasks_mod.Batch) -> torch.Tensor:
    """Mean over examples of each example's mean answer-token NLL.

    Per-example means (not a token mean over the batch) make each example's share of the
    gradient independent of the others, which DP-SGD's per-example clipping assumes.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    labels = batch.labels[:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # (B, T-1)
    return (nll.sum(1) / mask.sum(1).clamp(min=1)).mean()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(path: str | Path, dtype: str = "float32"):
    """Load a causal LM and its tokenizer from a local directory (no hub access).

    Returns:
        (model in eval mode, tokenizer with a pad token)
    """
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def attach_lora(model: torch.nn.Module, lora: LoraSpec, seed: int) -> tuple[PeftModel, UpdateLayout, torch.Tensor]:
    """Attach LoRA from the spec and set the card's seeded init (A seeded, B zero).

    ``get_peft_model`` changes ``model`` in place. Only LoRA parameters are trainable.

    Returns:
        (peft model, its layout, the init as a ``(n_layers, d_layer)`` tensor)
    """
    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                     lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, cfg)
    layout = derive_layout(peft_model, lora.target_modules)
    init = seeded_lora_init(layout, seed)
    write_lora(peft_model, layout, init)
    return peft_model, layout, init


def weights_sha256(path: str | Path) -> str:
    """sha256 over a model directory's weight files (sorted by name)."""
    h = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))
    if not files:
        raise ValueError(f"{path}: no weight files")
    for f in files:
        h.update(f.name.encode())
        storage.hash_file(h, f)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    """One side of the pair card."""

    path: str
    weights_sha256: str
    config_hash: str
    n_params: int
    init_seed: int
    init_sha256: str
    layout_fingerprint: str
    n_layers: int
    d_layer: int
    build: dict[str, Any] | None = None
    """How a derived model was made (its :data:`BUILD_FILE` less timings): the teacher, the
    layers kept, the heal recipe and its distillation losses. ``None`` for other models."""


RECIPE_KEYS = ("steps", "lr", "batch_size", "weight_decay", "dtype")
"""The recipe fields an organization's fine-tune must match (its data size and snapshots may differ)."""


def recipe_of(cfg: ExperimentConfig) -> dict[str, Any]:
    """The fine-tune recipe of ``cfg``'s shadow corpus, as recorded in the pair card; with
    ``tasks.data_files`` also its ``data_format`` (:func:`gt_ray.tasks.data_format`: columns,
    templates, answer mode, chat template), which organizations use for their own files."""
    ft = cfg.finetune
    recipe = {"steps": ft.steps, "lr": ft.lr, "batch_size": ft.batch_size, "weight_decay": ft.weight_decay,
              "n_examples": ft.n_examples, "snapshot_steps": list(ft.snapshot_steps), "dtype": cfg.pair.tiny.dtype}
    if cfg.tasks.data_files:  # only then: cards of the generated world keep their ids
        recipe["data_format"] = tasks_mod.data_format(cfg.tasks)
    return recipe


def recipe_fingerprint(recipe: dict[str, Any]) -> str:
    """Hash of the :data:`RECIPE_KEYS` of a recipe (what the service compares)."""
    return config_hash({k: recipe[k] for k in RECIPE_KEYS}, n=16)


@dataclass(frozen=True)
class PairCard:
    """The provider's fixed pair: base models, LoRA spec, init seeds and layouts, and the
    fine-tune recipe its shadow corpus used (organizations follow it)."""

    tiny: ModelCard
    llm: ModelCard
    lora: dict[str, Any]
    version: int = CARD_VERSION
    recipe: dict[str, Any] | None = None
    """:func:`recipe_of` the corpus config: steps, lr, batch_size, weight_decay, n_examples,
    snapshot_steps, dtype (the TinyLM's). ``None`` on cards written before recipes."""

    @property
    def card_id(self) -> str:
        """Hash of what the pair is: each side's weights, config, layout, LoRA init and build
        record, the LoRA spec and the recipe; not where the models lie (``path``, a derived
        model's teacher path), so the same pair built under another home has the same id."""
        data = asdict(self)
        for side in ("tiny", "llm"):
            del data[side]["path"]
            teacher = (data[side]["build"] or {}).get("derived_from")
            if teacher is not None:
                del teacher["path"]
        return config_hash(data, n=16)

    def _card_id_v1(self) -> str:
        """The id version 1 cards were written with (paths included), to check old cards."""
        data = asdict(self)
        data["version"] = 1
        if data["recipe"] is None:
            del data["recipe"]  # a card without a recipe kept the id it had before recipes existed
        for side in ("tiny", "llm"):
            if data[side]["build"] is None:
                del data[side]["build"]  # likewise for models gt-ray did not derive
        return config_hash(data, n=16)

    @property
    def recipe_fingerprint(self) -> str | None:
        return None if self.recipe is None else recipe_fingerprint(self.recipe)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "card_id": self.card_id}

    def save(self, path: str | Path) -> str | Path:
        """Write the card JSON atomically to a path or a URI (gt_ray.storage); returns ``path``."""
        storage.write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path if storage.is_uri(path) else Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "PairCard":
        """Read a card JSON from a path or a URI. Raises ValueError if missing, malformed or tampered with."""
        path = path if storage.is_uri(path) else Path(path)
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise ValueError(f"pair card not found: {path}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a gt-ray pair card ({e})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "pair card") -> "PairCard":
        """Build a card from its JSON dict (``to_dict``'s output), checking ``card_id``.

        Raises:
            ValueError: naming ``source``, if malformed or tampered with.
        """
        try:
            data = dict(data)
            card_id = data.pop("card_id", None)
            card = cls(tiny=ModelCard(**data.pop("tiny")), llm=ModelCard(**data.pop("llm")), **data)
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{source}: not a gt-ray pair card ({e})") from None
        if card.version > CARD_VERSION:
            raise ValueError(f"{source}: pair card version {card.version} is newer than this gt-ray's ({CARD_VERSION})")
        if card.version == 1:  # checked by the id it was written with, then read as a version 2 card
            if card_id is not None and card_id != card._card_id_v1():
                raise ValueError(f"{source}: card_id {card_id} does not match its content ({card._card_id_v1()})")
            card = replace(card, version=CARD_VERSION)
            logger.info("%s: version 1 pair card %s read as version %d, card_id %s (path-free)", source, card_id,
                        CARD_VERSION, card.card_id)
        elif card_id is not None and card_id != card.card_id:
            raise ValueError(f"{source}: card_id {card_id} does not match its content ({card.card_id})")
        return card


def describe_model(path: str | Path, model: PeftModel, layout: UpdateLayout, init: torch.Tensor, seed: int) -> ModelCard:
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True).to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    build_file = Path(path) / BUILD_FILE
    build = json.loads(build_file.read_text()) if build_file.is_file() else {}
    build = {k: v for k, v in build.items() if k != "seconds"} if "derived_from" in build else None
    return ModelCard(path=str(Path(path).resolve()), weights_sha256=weights_sha256(path), config_hash=config_hash(cfg),
                     n_params=base_params, init_seed=seed, init_sha256=tensor_sha256(init),
                     layout_fingerprint=layout.fingerprint, n_layers=layout.n_layers, d_layer=layout.d_layer, build=build)


@dataclass
class LoadedModel:
    """A model with the card's LoRA init attached, ready to fine-tune or take updates."""

    model: PeftModel
    tokenizer: Any
    layout: UpdateLayout
    init: torch.Tensor  # (n_layers, d_layer)
    path: Path

    def reset(self) -> None:
        """Put the LoRA parameters back to the card's init."""
        write_lora(self.model, self.layout, self.init)


def load_with_lora(path: str | Path, lora: LoraSpec, seed: int, dtype: str = "float32",
                   card: ModelCard | None = None) -> LoadedModel:
    """Load a model directory, attach the card's LoRA init, and check it against the card.

    Raises:
        ValueError: if ``card`` is given and the local weights, layout or init differ.
    """
    model, tokenizer = load_model(path, dtype)
    peft_model, layout, init = attach_lora(model, lora, seed)
    if card is not None:
        if card.weights_sha256 != weights_sha256(path):
            raise ValueError(f"model at {path} is not the card's model: weights sha256 differs "
                             f"({card.weights_sha256[:12]}... expected)")
        if card.layout_fingerprint != layout.fingerprint:
            raise ValueError(f"model at {path}: LoRA layout fingerprint differs from the card's")
        if card.init_sha256 != tensor_sha256(read_lora(peft_model, layout)):
            raise ValueError(f"model at {path}: LoRA init differs from the card's (seed {card.init_seed})")
    return LoadedModel(peft_model, tokenizer, layout, init, Path(path))


def make_pair_card(pair: PairConfig, tiny_path: str | Path, llm_path: str | Path,
                   recipe: dict[str, Any] | None = None) -> PairCard:
    """Describe a prepared pair: weights hashes, layouts and LoRA inits of both models, and
    the fine-tune ``recipe`` (:func:`recipe_of`) when known."""
    sides = {}
    for side, path, seed, spec in (("tiny", tiny_path, pair.lora.init_seed_tiny, pair.tiny),
                                   ("llm", llm_path, pair.lora.init_seed_llm, pair.llm)):
        lm = load_with_lora(path, pair.lora.for_side(side), seed, spec.dtype)
        sides[side] = describe_model(path, lm.model, lm.layout, lm.init, seed)
    return PairCard(tiny=sides["tiny"], llm=sides["llm"], lora=pair.lora.to_card(), recipe=recipe)


def load_card_side(card: PairCard, side: str, dtype: str = "float32", path: str | Path | None = None) -> LoadedModel:
    """Load the ``tiny`` or ``llm`` model named by the card (or at ``path``) and verify it."""
    mc = card.tiny if side == "tiny" else card.llm
    lora = LoraSpec(**card.lora).for_side(side)
    return load_with_lora(path or mc.path, lora, mc.init_seed, dtype, card=mc)

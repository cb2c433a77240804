"""The Grad-Transformer: a T5-style encoder-decoder that translates a TinyLM LoRA update
vector into an LLM LoRA update vector, plus its training loop and checkpoint format.

An update vector is a sequence of *layer tokens*: one row per transformer layer, so a
TinyLM vector is `(L_tiny, d_tiny)` and an LLM vector is `(L_llm, d_llm)`. The encoder
reads the TinyLM layers; the decoder emits the LLM layers one by one, each step fed the
previous output through `emb_proj`, the way a language model is fed its previous token.

Read bottom-up: configs, normalization, the model, the `Translator` wrapper (model +
normalizer + config, the public inference path), training, checkpoints.
This module never imports ray; `jobs/` wraps `train_epoch` / `train_translator`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import T5Config, T5Model
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Stack

from gt_ray import storage

logger = logging.getLogger(__name__)

MODEL_FILENAME = "model.safetensors"
CONFIG_FILENAME = "translator.json"
FORMAT_VERSION = 1
FINGERPRINTS_KEY = "fingerprints"
"""Key of `extra_metadata` holding `{name: layout fingerprint}` (e.g. `{"tiny": ..., "llm": ...}`)."""

NormalizationMode = Literal["coordinate", "global", "none"]
NORMALIZATION_MODES = ("coordinate", "global", "none")
DecoderMode = Literal["autoregressive", "parallel"]
DECODER_MODES = ("autoregressive", "parallel")
OBJECTIVES = ("mse", "function")
HEADS = ("direct", "retrieval")


# ----------------------------------------------------------------------------- configs


def _config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)


@dataclass
class TranslatorConfig:
    """Architecture of a Grad-Transformer and the vector layouts it maps between."""

    d_tiny: int
    """Width of one TinyLM layer token (flattened LoRA matrices of one layer)."""
    L_tiny: int
    """Number of TinyLM layers, i.e. encoder sequence length."""
    d_llm: int
    """Width of one LLM layer token."""
    L_llm: int
    """Number of LLM layers, i.e. decoder steps."""
    d_model: int = 256
    """Transformer width."""
    num_layers: int = 4
    """Encoder depth (and decoder depth unless `num_decoder_layers` is set)."""
    num_decoder_layers: int | None = None
    """Decoder depth; None means the same as `num_layers`."""
    num_heads: int = 8
    """Attention heads."""
    d_kv: int | None = None
    """Width of one attention head; None means `d_model // num_heads`."""
    d_ff: int = 1024
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

    def __post_init__(self) -> None:
        for name in ("d_tiny", "L_tiny", "d_llm", "L_llm", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
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
        if self.decoder not in DECODER_MODES:
            raise ValueError(f"TranslatorConfig.decoder must be one of {DECODER_MODES}, got {self.decoder!r}")
        if self.head not in HEADS:
            raise ValueError(f"TranslatorConfig.head must be one of {HEADS}, got {self.head!r}")
        if self.head == "retrieval" and self.decoder != "parallel":
            raise ValueError("TranslatorConfig.head 'retrieval' needs decoder 'parallel'")
        if self.bank_size < 0:
            raise ValueError(f"TranslatorConfig.bank_size must be >= 0, got {self.bank_size}")
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated"):
            raise ValueError(
                f"TranslatorConfig.feed_forward_proj must be 'ACT' or 'gated-ACT', got {self.feed_forward_proj!r}"
            )

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
        t5 = _read_t5_config(path)
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
    examples (see `gt_ray.function_loss`), plus `mse_weight` x the normalized MSE, both on
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
    max_epochs: int = 100
    """Upper bound on epochs."""
    patience: int = 10
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
        if self.select_on not in ("nll", "accuracy"):
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


# ----------------------------------------------------------------------- normalization


class Normalizer(nn.Module):
    """Standardizes TinyLM inputs and LLM targets with statistics of the training set.

    Update vectors mix coordinates of very different scales (LoRA A vs B matrices, layers
    near the input vs the output), so the MSE would be dominated by a few coordinates
    without it. Stats are buffers: they move with `.to()` and live in the state dict.
    Per-coordinate stats have the layout's shape, global ones are `(1, 1)`, and mode
    "none" stores mean 0 / std 1, so every mode broadcasts the same way.
    """

    def __init__(
        self,
        mode: NormalizationMode,
        x_mean: torch.Tensor,
        x_std: torch.Tensor,
        y_mean: torch.Tensor,
        y_std: torch.Tensor,
    ) -> None:
        super().__init__()
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"normalization mode must be one of {NORMALIZATION_MODES}, got {mode!r}")
        self.mode = mode
        self.register_buffer("x_mean", x_mean.detach().float().contiguous())  # (L_tiny, d_tiny) or (1, 1)
        self.register_buffer("x_std", x_std.detach().float().contiguous())
        self.register_buffer("y_mean", y_mean.detach().float().contiguous())  # (L_llm, d_llm) or (1, 1)
        self.register_buffer("y_std", y_std.detach().float().contiguous())

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, mode: NormalizationMode, eps: float = 1e-8) -> Normalizer:
        """Computes the statistics from training tensors.

        Args:
            x: TinyLM vectors, (N, L_tiny, d_tiny).
            y: LLM vectors, (N, L_llm, d_llm).
            mode: "coordinate", "global" or "none".
            eps: floor on every std.

        Returns:
            The fitted normalizer.

        Raises:
            ValueError: on an unknown mode or fewer than 2 rows.
        """
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"normalization mode must be one of {NORMALIZATION_MODES}, got {mode!r}")
        if x.shape[0] < 2 or y.shape[0] < 2:
            raise ValueError(f"need at least 2 training rows to fit a normalizer, got {x.shape[0]}")

        def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = t.double()  # sums over many rows lose precision in float32
            if mode == "coordinate":
                mean, std = t.mean(0), t.std(0)  # (L, d)
            elif mode == "global":
                mean, std = t.mean().reshape(1, 1), t.std().reshape(1, 1)
            else:
                mean, std = torch.zeros(1, 1, dtype=t.dtype), torch.ones(1, 1, dtype=t.dtype)
            return mean.float(), std.clamp_min(eps).float()

        return cls(mode, *stats(x), *stats(y))

    def normalize_x(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L_tiny, d_tiny) raw -> normalized."""
        return (x - self.x_mean) / self.x_std

    def denormalize_x(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L_tiny, d_tiny) normalized -> raw."""
        return x * self.x_std + self.x_mean

    def normalize_y(self, y: torch.Tensor) -> torch.Tensor:
        """(B, L_llm, d_llm) raw -> normalized."""
        return (y - self.y_mean) / self.y_std

    def denormalize_y(self, y: torch.Tensor) -> torch.Tensor:
        """(B, L_llm, d_llm) normalized -> raw."""
        return y * self.y_std + self.y_mean

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, x={tuple(self.x_mean.shape)}, y={tuple(self.y_mean.shape)}"


# ------------------------------------------------------------------------------- model


def _read_t5_config(path: str | Path) -> T5Config:
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"pretrained_t5_path {str(path)!r} holds no config.json")
    return T5Config.from_pretrained(str(path))


def build_t5_config(cfg: TranslatorConfig) -> T5Config:
    """The T5 config both stacks are derived from.

    With `cfg.pretrained_t5_path` it is the pretrained model's own config (so details
    such as layer-norm epsilon or bucket counts match its weights), checked against cfg.

    Args:
        cfg: the translator config.

    Returns:
        A T5Config with cfg's dropout.

    Raises:
        ValueError: if the pretrained config disagrees with cfg's architecture fields.
    """
    if cfg.pretrained_t5_path is None:
        return T5Config(
            vocab_size=1,  # stacks read inputs_embeds; the token embedding is dropped
            d_model=cfg.d_model,
            d_kv=cfg.head_dim,
            d_ff=cfg.d_ff,
            num_layers=cfg.num_layers,
            num_decoder_layers=cfg.decoder_layers,
            num_heads=cfg.num_heads,
            feed_forward_proj=cfg.feed_forward_proj,
            dropout_rate=cfg.dropout,
            pad_token_id=None,
            eos_token_id=None,
            decoder_start_token_id=None,
        )
    t5 = _read_t5_config(cfg.pretrained_t5_path)
    wanted = {
        "d_model": cfg.d_model,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.num_heads,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "feed_forward_proj": cfg.feed_forward_proj,
    }
    wrong = {k: (v, getattr(t5, k)) for k, v in wanted.items() if getattr(t5, k) != v}
    if wrong:
        detail = ", ".join(f"{k}: config {v!r} vs pretrained {p!r}" for k, (v, p) in wrong.items())
        raise ValueError(
            f"TranslatorConfig does not match the T5 at {cfg.pretrained_t5_path}: {detail} "
            "(build it with TranslatorConfig.from_pretrained_t5)"
        )
    t5.dropout_rate = cfg.dropout
    return t5


def _stack_configs(t5: T5Config) -> tuple[T5Config, T5Config]:
    # The same split T5Model does: a bidirectional encoder, a causal decoder with cross-attention.
    enc = copy.deepcopy(t5)
    enc.is_decoder, enc.use_cache, enc.is_encoder_decoder = False, False, False
    dec = copy.deepcopy(t5)
    dec.is_decoder, dec.is_encoder_decoder, dec.num_layers = True, True, t5.num_decoder_layers
    return enc, dec


class GradTransformer(nn.Module):
    """T5 encoder-decoder over layer tokens. Works in normalized space; see `Translator`.

    Args:
        cfg: the translator config.
        t5_config: the stacks' T5 config. None derives it from cfg and, with
            `cfg.pretrained_t5_path`, loads the pretrained stack weights; given (as when
            loading a checkpoint) the stacks are randomly initialized from it.
    """

    def __init__(self, cfg: TranslatorConfig, t5_config: T5Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        load_pretrained = t5_config is None and cfg.pretrained_t5_path is not None
        self.t5_config = build_t5_config(cfg) if t5_config is None else t5_config
        d = cfg.d_model

        self.in_proj = nn.Linear(cfg.d_tiny, d)
        # T5's relative bias already orders positions; absolute embeddings tell the model
        # *which* layer a token is, which matters because layers are not interchangeable.
        self.enc_pos = nn.Parameter(torch.randn(cfg.L_tiny, d) * 0.02)  # (L_tiny, d_model)
        self.dec_pos = nn.Parameter(torch.randn(cfg.L_llm, d) * 0.02)  # (L_llm, d_model)
        self.start = nn.Parameter(torch.randn(d) * 0.02)  # (d_model,)
        # The parallel decoder never reads outputs back: no embedding projection to train.
        self.emb_proj = nn.Linear(cfg.d_llm, d) if cfg.decoder == "autoregressive" else None
        self.out_proj = nn.Linear(d, cfg.d_llm)
        if cfg.head == "retrieval":
            # The bank: one normalized (TinyLM, LLM) pair per training subset, and its subset
            # id, so training can hide a row's own subset (else it learns to retrieve itself).
            self.register_buffer("bank_x", torch.zeros(cfg.bank_size, cfg.L_tiny, cfg.d_tiny))
            self.register_buffer("bank_y", torch.zeros(cfg.bank_size, cfg.L_llm, cfg.d_llm))
            self.register_buffer("bank_ids", torch.full((cfg.bank_size,), -1, dtype=torch.long))
            self.query_proj = nn.Linear(d, d)
            self.key_proj = nn.Linear(d, d)

        enc_cfg, dec_cfg = _stack_configs(self.t5_config)
        if load_pretrained:
            t5 = T5Model.from_pretrained(cfg.pretrained_t5_path, dropout_rate=cfg.dropout, dtype=torch.float32)
            self.encoder, self.decoder = t5.encoder, t5.decoder
            logger.info("initialized encoder/decoder stacks from %s", cfg.pretrained_t5_path)
        else:
            self.encoder, self.decoder = T5Stack(enc_cfg), T5Stack(dec_cfg)
        # Inputs always arrive as inputs_embeds: drop the (possibly 32k-row) token table.
        self.encoder.embed_tokens = None
        self.decoder.embed_tokens = None
        self.train()  # from_pretrained leaves its stacks in eval mode

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encodes normalized TinyLM vectors.

        Args:
            x: (B, L_tiny, d_tiny).

        Returns:
            Encoder states, (B, L_tiny, d_model).
        """
        h = self.in_proj(x) + self.enc_pos  # (B, L_tiny, d_model)
        return self.encoder(inputs_embeds=h, use_cache=False).last_hidden_state  # (B, L_tiny, d_model)

    def _decode(
        self, tokens: torch.Tensor, memory: torch.Tensor, start: int, cache: EncoderDecoderCache | None
    ) -> torch.Tensor:
        # tokens: (B, T, d_model) decoder inputs for positions start..start+T-1.
        h = tokens + self.dec_pos[start : start + tokens.shape[1]]  # (B, T, d_model)
        out = self.decoder(
            inputs_embeds=h,
            encoder_hidden_states=memory,
            past_key_values=cache,
            use_cache=cache is not None,
        ).last_hidden_state  # (B, T, d_model)
        return self.out_proj(out)  # (B, T, d_llm)

    def set_bank(self, x: torch.Tensor, y: torch.Tensor, subset_ids: torch.Tensor) -> None:
        """Store the retrieval head's bank: normalized (K, L_tiny, d_tiny), (K, L_llm, d_llm), (K,)."""
        if self.cfg.head != "retrieval" or x.shape[0] != self.cfg.bank_size:
            raise ValueError(f"set_bank needs head 'retrieval' and {self.cfg.bank_size} rows, got {x.shape[0]}")
        self.bank_x.copy_(x)
        self.bank_y.copy_(y)
        self.bank_ids.copy_(subset_ids)

    def _retrieve(self, memory: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
        # memory: (B, L_tiny, d_model); returns a softmax mixture of bank updates, (B, L_llm, d_llm).
        q = self.query_proj(memory.mean(1))  # (B, d_model)
        k = self.key_proj(self.encode(self.bank_x).mean(1))  # (K, d_model)
        scores = q @ k.T / math.sqrt(q.shape[-1])  # (B, K)
        if exclude is not None:
            scores = scores.masked_fill(self.bank_ids[None, :] == exclude.to(scores.device)[:, None], float("-inf"))
        return torch.einsum("bk,kld->bld", torch.softmax(scores, dim=-1), self.bank_y)

    def forward(self, x: torch.Tensor, y_prev: torch.Tensor | None = None,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced prediction (training), or autoregressive decoding without y_prev.

        Args:
            x: normalized TinyLM vectors, (B, L_tiny, d_tiny).
            y_prev: normalized target LLM vectors, (B, T, d_llm) with 1 <= T <= L_llm,
                usually T = L_llm. The decoder reads [start, emb_proj(y_prev[:, :-1])],
                so output t sees only y_prev[:, :t]. None (or a parallel decoder, which reads
                no targets) calls `translate(x)`.

        Returns:
            Predicted normalized LLM vectors, (B, T, d_llm) (T = L_llm without y_prev).

        Raises:
            ValueError: on wrong shapes.

        ``exclude`` (B,) hides bank rows of these subset ids from the retrieval head.
        """
        self._check_x(x)
        if y_prev is None or self.cfg.decoder == "parallel":
            return self.translate(x, exclude=exclude)
        B = x.shape[0]
        ok = y_prev.ndim == 3 and y_prev.shape[0] == B and y_prev.shape[2] == self.cfg.d_llm
        if not (ok and 1 <= y_prev.shape[1] <= self.cfg.L_llm):
            raise ValueError(
                f"y_prev must be (B={B}, 1..{self.cfg.L_llm}, {self.cfg.d_llm}), got {tuple(y_prev.shape)}"
            )
        memory = self.encode(x)  # (B, L_tiny, d_model)
        start = self.start.expand(B, 1, -1)  # (B, 1, d_model)
        tokens = torch.cat([start, self.emb_proj(y_prev[:, :-1])], dim=1)  # (B, T, d_model)
        return self._decode(tokens, memory, 0, cache=None)  # (B, T, d_llm)

    def translate(self, x: torch.Tensor, use_cache: bool = True, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Decodes the LLM layers one by one, each step fed emb_proj(previous output).

        Args:
            x: normalized TinyLM vectors, (B, L_tiny, d_tiny).
            use_cache: keep the decoder's keys/values (self- and cross-attention) and feed
                only the new token each step. False re-runs the whole prefix each step,
                as the published implementation does; in eval mode both agree.

        Returns:
            Normalized LLM vectors, (B, L_llm, d_llm).

        Raises:
            ValueError: on a wrong x shape.
        """
        self._check_x(x)
        B = x.shape[0]
        memory = self.encode(x)  # (B, L_tiny, d_model)
        if self.cfg.decoder == "parallel":  # every layer's query is start + its position
            out = self._decode(self.start.expand(B, self.cfg.L_llm, -1), memory, 0, cache=None)  # (B, L_llm, d_llm)
            return out + self._retrieve(memory, exclude) if self.cfg.head == "retrieval" else out
        token = self.start.expand(B, 1, -1)  # (B, 1, d_model)
        outputs: list[torch.Tensor] = []
        if use_cache:
            dec_cfg = self.decoder.config
            cache = EncoderDecoderCache(DynamicCache(config=dec_cfg), DynamicCache(config=dec_cfg))
            for t in range(self.cfg.L_llm):
                y_t = self._decode(token, memory, t, cache)  # (B, 1, d_llm)
                outputs.append(y_t)
                token = self.emb_proj(y_t)  # (B, 1, d_model)
        else:
            tokens = token  # (B, t+1, d_model)
            for t in range(self.cfg.L_llm):
                y_t = self._decode(tokens, memory, 0, cache=None)[:, -1:]  # (B, 1, d_llm)
                outputs.append(y_t)
                tokens = torch.cat([tokens, self.emb_proj(y_t)], dim=1)
        return torch.cat(outputs, dim=1)  # (B, L_llm, d_llm)

    def _check_x(self, x: torch.Tensor) -> None:
        want = (self.cfg.L_tiny, self.cfg.d_tiny)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be (B, {want[0]}, {want[1]}), got {tuple(x.shape)}")


# ------------------------------------------------------------------ public translator


class Translator(nn.Module):
    """Model + normalizer + config: raw TinyLM vectors in, raw LLM vectors out.

    Attributes:
        config: the architecture.
        model: the GradTransformer (normalized space).
        normalizer: the training-set statistics.
        train_config: how it was trained, when known.
        metadata: extra metadata (pair-card fingerprints, provenance) from a checkpoint.
    """

    def __init__(
        self,
        config: TranslatorConfig,
        model: GradTransformer,
        normalizer: Normalizer,
        train_config: TrainConfig | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if normalizer.mode != config.normalization:
            raise ValueError(f"normalizer mode {normalizer.mode!r} != config.normalization {config.normalization!r}")
        self.config = config
        self.model = model
        self.normalizer = normalizer
        self.train_config = train_config
        self.metadata = dict(metadata or {})

    @torch.no_grad()
    def translate(self, x: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        """Translates raw TinyLM update vectors into raw LLM update vectors.

        Runs without autograd; call `.eval()` first (checkpoints load in eval mode) or
        dropout stays active.

        Args:
            x: (B, L_tiny, d_tiny) or a single (L_tiny, d_tiny) vector, finite.
            use_cache: decode with the KV cache (see `GradTransformer.translate`).

        Returns:
            (B, L_llm, d_llm), or (L_llm, d_llm) for a single vector; float32.

        Raises:
            ValueError: on a wrong shape or non-finite values.
        """
        single = x.ndim == 2
        x = x.unsqueeze(0) if single else x
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.config.L_tiny, self.config.d_tiny):
            raise ValueError(
                f"x must be (B, {self.config.L_tiny}, {self.config.d_tiny}), got {tuple(x.shape)}"
            )
        x = x.to(device=self.normalizer.x_mean.device, dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("x holds non-finite values")
        y = self.normalizer.denormalize_y(self.model.translate(self.normalizer.normalize_x(x), use_cache))
        return y[0] if single else y  # (B, L_llm, d_llm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as `translate(x)`."""
        return self.translate(x)


# --------------------------------------------------------------------------- training


def make_optimizer(
    model: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (decay on matrices only) and a linear-warmup-then-constant schedule.

    Args:
        model: the model (or its DDP wrapper).
        cfg: the training config.

    Returns:
        (optimizer, scheduler); step the scheduler once per optimizer step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    warmup = cfg.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    )
    return optimizer, scheduler


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    function: FunctionLoss | None = None,
) -> float:
    """One pass over normalized pairs: teacher-forced MSE, or the function objective.

    Works unchanged on a DDP-wrapped model with a distributed loader.

    Args:
        model: GradTransformer or DDP(GradTransformer), put in train mode here.
        loader: yields (x, y) or (x, y, subset_id) batches, (B, L_tiny, d_tiny) and
            (B, L_llm, d_llm) normalized, (B,) long.
        optimizer: the optimizer.
        scheduler: stepped once per optimizer step, if given.
        grad_clip: max global grad norm, or None.
        function: with it, the loss is the LLM's answer loss with the decoded update
            plus `function.mse_weight` x MSE (needs subset ids in the batches).

    Returns:
        Mean training loss over this worker's samples.
    """
    model.train()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y, *rest in loader:
        x, y = x.to(device), y.to(device)
        if function is None:
            pred = model(x, y, rest[0].to(device) if rest else None)  # (B, L_llm, d_llm), teacher-forced
            loss = F.mse_loss(pred, y)
        else:
            pred = model(x, None, rest[0].to(device))  # (B, L_llm, d_llm), decoded as at inference
            raw = function.denormalize(pred)
            loss = function.loss(raw, rest[0].tolist()) + function.mse_weight * F.mse_loss(pred, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def evaluate_mse(model: nn.Module, loader: DataLoader, autoregressive: bool = True) -> float:
    """Validation MSE in normalized space.

    Args:
        model: GradTransformer or a DDP wrapper of one, put in eval mode here.
        loader: yields normalized (x, y) batches.
        autoregressive: score cached decoding (what inference does) rather than teacher forcing.

    Returns:
        Mean MSE over the loader's samples.
    """
    net: GradTransformer = getattr(model, "module", model)  # decoding needs no DDP sync
    net.eval()
    device = next(net.parameters()).device
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        pred = net.translate(x) if autoregressive else net(x, y)  # (B, L_llm, d_llm)
        total += F.mse_loss(pred, y, reduction="sum").item() / y[0].numel()
        count += x.shape[0]
    return total / max(count, 1)


@dataclass
class FunctionLoss:
    """The function objective inside training: a `FunctionObjective` (LLM + examples),
    the normalizer to go back to raw vectors, and the draw's randomness."""

    objective: Any  # gt_ray.function_loss.FunctionObjective (kept untyped: no import cycle)
    normalizer: Normalizer
    mse_weight: float
    rng: Any

    def denormalize(self, pred: torch.Tensor) -> torch.Tensor:
        return self.normalizer.denormalize_y(pred)

    def loss(self, raw: torch.Tensor, subset_ids: list[int]) -> torch.Tensor:
        return self.objective.train_loss(raw, subset_ids, self.rng)


@torch.no_grad()
def evaluate_answer_scores(model: nn.Module, x: torch.Tensor, subset_ids: list[int], normalizer: Normalizer,
                           objective: Any, batch_size: int = 64) -> dict[str, float]:
    """Validation answer NLL and exact-match accuracy of the LLM with the decoded updates
    (what inference produces).

    Args:
        model: GradTransformer or a DDP wrapper of one.
        x: normalized TinyLM vectors of the validation rows, (M, L_tiny, d_tiny).
        subset_ids: the rows' subsets, len M.
        normalizer: maps the decoded output back to raw vectors.
        objective: a `gt_ray.function_loss.FunctionObjective`.
    """
    net: GradTransformer = getattr(model, "module", model)
    net.eval()
    device = next(net.parameters()).device
    raw = torch.cat([normalizer.denormalize_y(net.translate(x[i:i + batch_size].to(device)))
                     for i in range(0, x.shape[0], batch_size)])
    return objective.val_scores(raw, subset_ids)


@dataclass
class EarlyStopping:
    """Tracks the best validation loss and its weights; says when patience ran out."""

    patience: int
    """Epochs without improvement before stopping."""
    min_delta: float = 0.0
    """Required improvement over the best loss."""
    best_loss: float = math.inf
    """Best validation loss so far."""
    best_epoch: int = -1
    """Epoch of best_loss."""
    best_state: dict[str, torch.Tensor] | None = None
    """CPU copy of the model's state dict at best_epoch."""
    bad_epochs: int = 0
    """Epochs since the last improvement."""

    def step(self, epoch: int, val_loss: float, model: nn.Module) -> bool:
        """Records an epoch's validation loss.

        Args:
            epoch: the epoch index.
            val_loss: its validation loss.
            model: the model (or DDP wrapper) whose weights to keep if it is the best.

        Returns:
            True when training should stop.
        """
        if val_loss < self.best_loss - self.min_delta:
            net = getattr(model, "module", model)
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def _check_pairs(x: torch.Tensor, y: torch.Tensor, cfg: TranslatorConfig, split: str) -> None:
    if x.ndim != 3 or tuple(x.shape[1:]) != (cfg.L_tiny, cfg.d_tiny):
        raise ValueError(f"{split}_x must be (N, {cfg.L_tiny}, {cfg.d_tiny}), got {tuple(x.shape)}")
    if y.ndim != 3 or tuple(y.shape[1:]) != (cfg.L_llm, cfg.d_llm):
        raise ValueError(f"{split}_y must be (N, {cfg.L_llm}, {cfg.d_llm}), got {tuple(y.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{split}_x and {split}_y need the same non-zero row count, got {x.shape[0]} and {y.shape[0]}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"{split} pairs hold non-finite values")


EpochCallback = Callable[[int, float, float], bool | None]


def train_translator(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: TrainConfig,
    model_config: TranslatorConfig | None = None,
    on_epoch: EpochCallback | None = None,
    device: str | torch.device = "cpu",
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    prepare_train_loader: Callable[[DataLoader], DataLoader] | None = None,
    train_subsets: torch.Tensor | None = None,
    val_subsets: torch.Tensor | None = None,
    function: Any = None,
) -> tuple[Translator, list[dict[str, float]]]:
    """Trains a translator with early stopping on a validation loss; returns the best weights.

    The validation loss is the answer NLL of the LLM with the decoded updates on the
    validation subsets' examples when ``function`` is given, else the validation MSE.
    Deterministic given cfg.seed (on CPU); the caller's global RNG state is left untouched.

    Args:
        train_x: raw TinyLM vectors, (N, L_tiny, d_tiny).
        train_y: raw LLM vectors, (N, L_llm, d_llm).
        val_x: (M, L_tiny, d_tiny).
        val_y: (M, L_llm, d_llm).
        cfg: the training config.
        model_config: the architecture; None uses TranslatorConfig defaults for the data's layouts.
        on_epoch: called as on_epoch(epoch, train_loss, val_loss) after every epoch (e.g. to
            report to Ray Train/Tune); returning True stops training.
        device: where to train.
        prepare_model: wraps the model for data-parallel training (e.g. Ray Train's
            ``prepare_model``, which moves it to the worker's device and wraps it in DDP).
        prepare_train_loader: shards the training loader across workers (e.g. Ray
            Train's ``prepare_data_loader``). Validation is never sharded: every worker
            scores the whole validation set, so all take the same early-stopping decision.
        train_subsets: (N,) subset id of each training row; needed by the function
            objective and by snapshot sampling (default: every row its own subset).
        val_subsets: (M,) subset id of each validation row (needed with ``function``).
        function: a `gt_ray.function_loss.FunctionObjective` holding the frozen LLM and the
            subsets' examples; required by ``cfg.objective == "function"``.

    Returns:
        (translator in eval mode on `device`, history): one dict per epoch with epoch,
        train_loss, val_loss (the early-stopping figure), val_nll, val_tf_loss, val_ar_loss,
        lr, seconds.

    Raises:
        ValueError: on inconsistent shapes or non-finite values, or the function
            objective without ``function`` / subset ids.
    """
    if model_config is None:
        model_config = TranslatorConfig(
            d_tiny=train_x.shape[-1], L_tiny=train_x.shape[-2], d_llm=train_y.shape[-1], L_llm=train_y.shape[-2]
        )
    _check_pairs(train_x, train_y, model_config, "train")
    _check_pairs(val_x, val_y, model_config, "val")
    if cfg.objective == "function" and function is None:
        raise ValueError("objective 'function' needs a FunctionObjective (the LLM and the subsets' examples)")
    if train_subsets is None:
        train_subsets = torch.arange(train_x.shape[0])
    if function is not None and val_subsets is None:
        raise ValueError("scoring on validation answer NLL needs val_subsets")
    if train_subsets.shape[0] != train_x.shape[0] or (val_subsets is not None and val_subsets.shape[0] != val_x.shape[0]):
        raise ValueError("train_subsets / val_subsets need one id per row")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        normalizer = Normalizer.fit(train_x, train_y, model_config.normalization, model_config.norm_eps)
        last_row = {int(s): i for i, s in enumerate(train_subsets.tolist())}  # each subset's last snapshot
        if model_config.head == "retrieval":
            model_config = dataclasses.replace(model_config, bank_size=len(last_row))
        core = GradTransformer(model_config)
        if model_config.head == "retrieval":
            idx = torch.tensor(list(last_row.values()))
            core.set_bank(normalizer.normalize_x(train_x[idx].float()), normalizer.normalize_y(train_y[idx].float()),
                          torch.tensor(list(last_row)))
        core = core.to(device)
        model = prepare_model(core) if prepare_model is not None else core
        device = next(core.parameters()).device
        normalizer = normalizer.to(device)
        train_set = TensorDataset(normalizer.normalize_x(train_x.float().to(device)).cpu(),
                                  normalizer.normalize_y(train_y.float().to(device)).cpu(), train_subsets.long())
        val_xn = normalizer.normalize_x(val_x.float().to(device)).cpu()
        val_set = TensorDataset(val_xn, normalizer.normalize_y(val_y.float().to(device)).cpu())
        generator = torch.Generator().manual_seed(cfg.seed)
        rows_of: dict[int, list[int]] = {}
        for i, sid in enumerate(train_subsets.tolist()):
            rows_of.setdefault(sid, []).append(i)

        def epoch_loader() -> DataLoader:
            data = train_set
            if cfg.sample_snapshots:  # one random snapshot of each subset this epoch
                data = torch.utils.data.Subset(train_set, [rng.choice(rows_of[s]) for s in sorted(rows_of)])
            loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=generator)
            return prepare_train_loader(loader) if prepare_train_loader is not None else loader

        train_loader = epoch_loader()
        val_loader = DataLoader(val_set, batch_size=max(cfg.batch_size, 64))
        optimizer, scheduler = make_optimizer(model, cfg)
        stopper = EarlyStopping(cfg.patience, cfg.min_delta)
        fn_loss = None
        if cfg.objective == "function":
            fn_loss = FunctionLoss(function, normalizer, cfg.mse_weight, rng)
        if val_subsets is not None:  # answer NLL on each validation subset's last snapshot only
            last_val = {int(s): i for i, s in enumerate(val_subsets.tolist())}
            val_ids, val_nll_x = list(last_val), val_xn[list(last_val.values())]
        history: list[dict[str, float]] = []

        for epoch in range(cfg.max_epochs):
            t0 = time.perf_counter()
            if cfg.sample_snapshots and epoch > 0:
                train_loader = epoch_loader()
            train_loss = train_epoch(model, train_loader, optimizer, scheduler, cfg.grad_clip, fn_loss)
            val_tf = evaluate_mse(model, val_loader, autoregressive=False)
            val_ar = evaluate_mse(model, val_loader, autoregressive=True) if cfg.val_autoregressive else math.nan
            val_nll = val_acc = math.nan
            if function is not None:
                scores = evaluate_answer_scores(model, val_nll_x, val_ids, normalizer, function)
                val_nll, val_acc = scores["nll"], scores["accuracy"]
                # accuracy is coarse: the NLL, scaled far below one example's worth, breaks ties
                val_loss = val_nll if cfg.select_on == "nll" else (1 - val_acc) + 1e-4 * val_nll
            else:
                val_loss = val_ar if cfg.val_autoregressive else val_tf
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_nll": val_nll,
                    "val_accuracy": val_acc,
                    "val_tf_loss": val_tf,
                    "val_ar_loss": val_ar,
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": time.perf_counter() - t0,
                }
            )
            logger.info("epoch=%d train_loss=%.6g val_loss=%.6g val_tf_loss=%.6g", epoch, train_loss, val_loss, val_tf)
            if not math.isfinite(train_loss):
                logger.warning("training diverged at epoch %d (train_loss=%s); stopping", epoch, train_loss)
                break
            stop = stopper.step(epoch, val_loss, core)
            if on_epoch is not None and on_epoch(epoch, train_loss, val_loss):
                logger.info("stop requested by on_epoch at epoch %d", epoch)
                break
            if stop:
                logger.info(
                    "early stop at epoch %d; best epoch %d val_loss=%.6g", epoch, stopper.best_epoch, stopper.best_loss
                )
                break

    if stopper.best_state is not None:
        core.load_state_dict(stopper.best_state)
    translator = Translator(model_config, core, normalizer.to(device), train_config=cfg)
    best = stopper.best_loss if math.isfinite(stopper.best_loss) else None
    translator.metadata.update({"best_epoch": stopper.best_epoch, "best_val_loss": best,
                                "selected_on": f"val_answer_{cfg.select_on}" if function is not None else "val_mse"})
    return translator.eval(), history


# ------------------------------------------------------------------------ checkpoints


def save_translator(
    translator: Translator, directory: str | Path, extra_metadata: Mapping[str, Any] | None = None
) -> str | Path:
    """Writes `model.safetensors` (weights + normalizer stats) and `translator.json`.

    Each file appears whole or not at all (`gt_ray.storage`); the weights first, so a
    `translator.json` always has its weights beside it.

    Args:
        translator: the translator.
        directory: a path (created if missing) or a URI (`s3://`, `gs://`, `file://`);
            existing files of the same names are replaced.
        extra_metadata: JSON-able provenance merged over `translator.metadata`. Put the pair
            card's layout fingerprints under "fingerprints" as {name: fingerprint} so
            `load_translator(expected_fingerprints=...)` can check them.

    Returns:
        The directory: a `Path` when given a path, else the URI.

    Raises:
        ValueError: if the metadata is not JSON-serializable or fingerprints are not str -> str.
    """
    directory = directory if storage.is_uri(directory) else Path(directory)
    metadata = {**translator.metadata, **(extra_metadata or {})}
    fingerprints = metadata.get(FINGERPRINTS_KEY, {})
    if not isinstance(fingerprints, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fingerprints.items()
    ):
        raise ValueError(f"extra_metadata[{FINGERPRINTS_KEY!r}] must map names to fingerprint strings")
    document = {
        "format_version": FORMAT_VERSION,
        "translator_config": translator.config.to_dict(),
        "t5_config": json.loads(translator.model.t5_config.to_json_string(use_diff=False)),
        "train_config": None if translator.train_config is None else translator.train_config.to_dict(),
        "normalization": translator.normalizer.mode,
        "metadata": metadata,
    }
    try:
        text = json.dumps(document, sort_keys=True, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"translator metadata is not JSON-serializable: {err}") from err

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in translator.state_dict().items()}
    file_metadata = {"format": "pt", "normalization": translator.normalizer.mode}
    storage.write_bytes(storage.join(directory, MODEL_FILENAME), save_safetensors_bytes(tensors, metadata=file_metadata))
    storage.write_text(storage.join(directory, CONFIG_FILENAME), text + "\n")
    logger.info("saved translator (%d tensors) to %s", len(tensors), directory)
    return directory


def load_translator(
    directory: str | Path,
    expected_fingerprints: Mapping[str, str] | None = None,
    device: str | torch.device = "cpu",
) -> Translator:
    """Restores a translator written by `save_translator`, in eval mode.

    Args:
        directory: the checkpoint directory, a path or a URI.
        expected_fingerprints: {name: fingerprint} that must equal the stored
            `metadata["fingerprints"]` for every given name.
        device: where to put the weights.

    Returns:
        The translator; `translator.metadata` holds the stored metadata.

    Raises:
        ValueError: if a file is missing, the format is unknown, a fingerprint differs
            or the weights do not fit the config.
    """
    for name in (CONFIG_FILENAME, MODEL_FILENAME):
        if not storage.is_file(storage.join(directory, name)):
            raise ValueError(f"translator checkpoint {directory} is missing {name}")
    try:
        document = json.loads(storage.read_text(storage.join(directory, CONFIG_FILENAME)))
    except json.JSONDecodeError as err:
        raise ValueError(f"translator checkpoint {directory}: {CONFIG_FILENAME} is not JSON ({err})") from None
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"translator checkpoint {directory} has format_version {document.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
    metadata = document["metadata"]
    stored = metadata.get(FINGERPRINTS_KEY, {})
    for name, fingerprint in (expected_fingerprints or {}).items():
        if stored.get(name) != fingerprint:
            raise ValueError(
                f"layout fingerprint mismatch for {name!r}: checkpoint {directory} has {stored.get(name)!r}, "
                f"expected {fingerprint!r}"
            )

    config = TranslatorConfig.from_dict(document["translator_config"])
    train_config = None if document["train_config"] is None else TrainConfig.from_dict(document["train_config"])
    weights_at = storage.join(directory, MODEL_FILENAME)
    try:  # a local file is memory-mapped; an object is read into memory once
        tensors = (load_safetensors_file(str(storage.local_path(weights_at))) if storage.is_local(weights_at)
                   else load_safetensors_bytes(storage.read_bytes(weights_at)))
    except Exception as err:  # safetensors raises its own error types for a bad file
        raise ValueError(f"translator checkpoint {directory}: {MODEL_FILENAME} is not readable ({err})") from None
    stats = {k.removeprefix("normalizer."): tensors.pop(k) for k in list(tensors) if k.startswith("normalizer.")}
    if set(stats) != {"x_mean", "x_std", "y_mean", "y_std"}:
        raise ValueError(f"translator checkpoint {directory} lacks normalizer stats, found {sorted(stats)}")
    normalizer = Normalizer(document["normalization"], **stats)
    # Random init, then overwrite: the pretrained T5 directory need not exist at load time.
    model = GradTransformer(config, t5_config=T5Config.from_dict(document["t5_config"]))
    weights = {k.removeprefix("model."): v for k, v in tensors.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f"translator checkpoint {directory} does not fit its config: {err}") from err
    translator = Translator(config, model, normalizer, train_config=train_config, metadata=metadata)
    logger.info("loaded translator from %s", directory)
    return translator.to(device).eval()

"""The Grad-Transformer: a T5-style encoder-decoder that translates a TinyLM LoRA update
vector into an LLM LoRA update vector.

An update vector is a sequence of *layer tokens*: one row per transformer layer, so a
TinyLM vector is `(L_tiny, d_tiny)` and an LLM vector is `(L_llm, d_llm)`. The encoder
reads the TinyLM layers; the decoder emits the LLM layers one by one, each step fed the
previous output through `emb_proj`, the way a language model is fed its previous token.

Read bottom-up: normalization, the T5 config, the model, the `Translator` wrapper (model +
normalizer + config, the public inference path). Configs live in
`gt_ray.translator.config`, training in `gt_ray.translator.train`, checkpoints in
`gt_ray.translator.checkpoint`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import T5Config, T5Model
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Stack

from gt_ray.translator.config import NORMALIZATION_MODES, NormalizationMode, TrainConfig, TranslatorConfig

logger = logging.getLogger(__name__)

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
    def fit(cls, x: torch.Tensor, y: torch.Tensor, mode: NormalizationMode, eps: float = 1e-8,
            x_eps: float | None = None) -> Normalizer:
        """Computes the statistics from training tensors.

        Args:
            x: TinyLM vectors, (N, L_tiny, d_tiny).
            y: LLM vectors, (N, L_llm, d_llm).
            mode: "coordinate", "global" or "none".
            eps: floor on every std.
            x_eps: floor on the TinyLM side's stds (None: ``eps``).

        Returns:
            The fitted normalizer.

        Raises:
            ValueError: on an unknown mode or fewer than 2 rows.
        """
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"normalization mode must be one of {NORMALIZATION_MODES}, got {mode!r}")
        if x.shape[0] < 2 or y.shape[0] < 2:
            raise ValueError(f"need at least 2 training rows to fit a normalizer, got {x.shape[0]}")

        def stats(t: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
            t = t.double()  # sums over many rows lose precision in float32
            if mode == "coordinate":
                mean, std = t.mean(0), t.std(0)  # (L, d)
            elif mode == "global":
                mean, std = t.mean().reshape(1, 1), t.std().reshape(1, 1)
            else:
                mean, std = torch.zeros(1, 1, dtype=t.dtype), torch.ones(1, 1, dtype=t.dtype)
            return mean.float(), std.clamp_min(eps).float()

        return cls(mode, *stats(x, eps if x_eps is None else x_eps), *stats(y, eps))

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


def read_t5_config(path: str | Path) -> T5Config:
    """The T5 config of a local T5 directory.

    Raises:
        ValueError: if the directory holds no config.json.
    """
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
    t5 = read_t5_config(cfg.pretrained_t5_path)
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
        cfg: the translator config, its layouts set.
        t5_config: the stacks' T5 config. None derives it from cfg and, with
            `cfg.pretrained_t5_path`, loads the pretrained stack weights; given (as when
            loading a checkpoint) the stacks are randomly initialized from it.

    Raises:
        ValueError: if cfg lacks a layout, or disagrees with its pretrained T5.
    """

    def __init__(self, cfg: TranslatorConfig, t5_config: T5Config | None = None) -> None:
        super().__init__()
        cfg.require_layouts()
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
        input_encoder: with ``config.input == "behaviour"``, the map from raw TinyLM updates to
            the encoder's input tokens (`gt_ray.translator.behaviour.BehaviourInput`: it runs
            the provider's TinyLM, on the CPU); None reads the updates as they are.
    """

    def __init__(
        self,
        config: TranslatorConfig,
        model: GradTransformer,
        normalizer: Normalizer,
        train_config: TrainConfig | None = None,
        metadata: Mapping[str, Any] | None = None,
        input_encoder: Any = None,
    ) -> None:
        super().__init__()
        if normalizer.mode != config.normalization:
            raise ValueError(f"normalizer mode {normalizer.mode!r} != config.normalization {config.normalization!r}")
        if (config.input == "behaviour") != (input_encoder is not None):
            raise ValueError(f"translator input {config.input!r} "
                             + ("needs an input encoder" if input_encoder is None else "takes no input encoder"))
        if input_encoder is not None and tuple(input_encoder.shape) != (config.L_tiny, config.d_tiny):
            raise ValueError(f"the input encoder makes {tuple(input_encoder.shape)} tokens, the model reads "
                             f"{(config.L_tiny, config.d_tiny)}")
        self.input_encoder = input_encoder
        self.config = config
        self.model = model
        self.normalizer = normalizer
        self.train_config = train_config
        self.metadata = dict(metadata or {})

    @property
    def input_shape(self) -> tuple[int, int]:
        """One raw TinyLM update's (layers, width), what `translate` accepts."""
        if self.input_encoder is not None:
            return tuple(self.input_encoder.update_shape)
        return self.config.L_tiny, self.config.d_tiny

    @torch.no_grad()
    def translate(self, x: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        """Translates raw TinyLM update vectors into raw LLM update vectors.

        Runs without autograd; call `.eval()` first (checkpoints load in eval mode) or
        dropout stays active.

        Args:
            x: (B, L, d) or a single (L, d) raw update (`input_shape`), finite.
            use_cache: decode with the KV cache (see `GradTransformer.translate`).

        Returns:
            (B, L_llm, d_llm), or (L_llm, d_llm) for a single vector; float32.

        Raises:
            ValueError: on a wrong shape or non-finite values.
        """
        single = x.ndim == 2
        x = x.unsqueeze(0) if single else x
        L, d = self.input_shape
        if x.ndim != 3 or tuple(x.shape[1:]) != (L, d):
            raise ValueError(f"x must be (B, {L}, {d}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x holds non-finite values")
        if self.input_encoder is not None:  # raw updates -> what they make the TinyLM do
            x = self.input_encoder(x.detach().float().cpu())
        x = x.to(device=self.normalizer.x_mean.device, dtype=torch.float32)
        y = self.normalizer.denormalize_y(self.model.translate(self.normalizer.normalize_x(x), use_cache))
        return y[0] if single else y  # (B, L_llm, d_llm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as `translate(x)`."""
        return self.translate(x)


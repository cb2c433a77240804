"""A round's LLM update: aggregate and translate the organizations' vectors as the spec says
(with optional central DP noise), and write it as a PEFT adapter (stacked for
``weight_space``) plus a byte-for-byte reproducible zip of it (see :mod:`gt_ray.rounds`)."""

from __future__ import annotations

import copy
import logging
import math
import secrets
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gt_ray import storage
from gt_ray.aggregate import add_gaussian_noise, aggregate, mean_sensitivity, stack_lora_factors
from gt_ray.privacy import analytic_gaussian_sigma, clip_l2
from gt_ray.rounds.spec import RoundSpec
from gt_ray.updates import split_factors

if TYPE_CHECKING:
    from gt_ray.models import LoadedModel

logger = logging.getLogger(__name__)

Translate = Callable[[torch.Tensor], torch.Tensor]
"""Raw TinyLM vectors ``(B, L_tiny, d_tiny)`` -> raw LLM vectors ``(B, L_llm, d_llm)``."""
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
"""Fixed zip entry dates, so the same adapter always zips to the same bytes."""


# ----------------------------------------------------------------------------- the round's update


@dataclass
class RoundUpdate:
    """What closing a round computes."""

    update: torch.Tensor | None
    """The round's LLM update ``(L_llm, d_llm)``; ``None`` with ``weight_space``."""
    translated: torch.Tensor | None
    """Per-organization LLM vectors ``(n, L_llm, d_llm)`` in ``translate_then_aggregate``
    (clipped with ``weight_space``: exactly what the adapter stacks)."""
    weights: list[float]
    """Each organization's normalized share of the aggregate (for mean rules)."""
    sigma: float | None = None
    """Std of the central Gaussian noise, when the spec asks for DP."""


def compute_round_update(spec: RoundSpec, vectors: Sequence[torch.Tensor], n_examples: Sequence[int],
                         translate: Translate, llm_shape: tuple[int, int],
                         generator: torch.Generator | None = None) -> RoundUpdate:
    """Aggregate and translate the TinyLM vectors of one round as ``spec`` says.

    Args:
        spec: the round's spec.
        vectors: ``n`` TinyLM vectors ``(L_tiny, d_tiny)``, in a fixed organization order.
        n_examples: each organization's example count (weights of ``weighted_mean``).
        translate: raw TinyLM vectors ``(B, L_tiny, d_tiny)`` -> raw LLM vectors ``(B, L_llm, d_llm)``.
        llm_shape: ``(L_llm, d_llm)``, to check what ``translate`` returns.
        generator: source of the DP noise; default a generator with a secret seed
            (whoever knows the seed can remove the noise).

    Returns:
        The :class:`RoundUpdate`.

    Raises:
        ValueError: on bad vectors, weights, or a translation of the wrong shape or with
            non-finite values.
    """
    n = len(vectors)
    if n == 0:
        raise ValueError("a round needs at least one vector to aggregate")
    if len(n_examples) != n:
        raise ValueError(f"got {len(n_examples)} example counts for {n} vectors")
    weights = [float(w) for w in n_examples] if spec.rule == "weighted_mean" else None
    shares = [w / math.fsum(weights) for w in weights] if weights is not None else [1.0 / n] * n
    if spec.rule in ("median", "trimmed_mean"):
        shares = []  # a coordinate-wise rule has no per-organization share
    if spec.mode == "aggregate_then_translate":
        agg = aggregate(vectors, spec.rule, weights, spec.clip_norm, spec.trim_fraction)  # (L_tiny, d_tiny)
        agg, sigma = _add_central_noise(spec, agg, n, generator)
        update = _translate(translate, agg.unsqueeze(0), llm_shape)[0]  # (L_llm, d_llm)
        return RoundUpdate(update, None, shares, sigma)
    translated = _translate(translate, torch.stack(list(vectors)), llm_shape)  # (n, L_llm, d_llm)
    if spec.weight_space:
        if spec.clip_norm is not None:
            translated = torch.stack([clip_l2(t, spec.clip_norm)[0] for t in translated])
        return RoundUpdate(None, translated, shares)
    update = aggregate(list(translated), spec.rule, weights, spec.clip_norm, spec.trim_fraction)  # (L_llm, d_llm)
    update, sigma = _add_central_noise(spec, update, n, generator)
    return RoundUpdate(update, translated, shares, sigma)


def _translate(translate: Translate, x: torch.Tensor, llm_shape: tuple[int, int]) -> torch.Tensor:
    y = translate(x.float())
    want = (x.shape[0], *llm_shape)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != want:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"translate returned {got}, expected a tensor of shape {want}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("translate returned non-finite values")
    return y.detach().float().cpu()


def _add_central_noise(spec: RoundSpec, agg: torch.Tensor, n: int,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, float | None]:
    if spec.dp_epsilon is None:
        return agg, None
    sigma = analytic_gaussian_sigma(spec.dp_epsilon, spec.dp_delta, mean_sensitivity(spec.clip_norm, n))
    generator = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
    logger.info("central DP noise: sigma=%.4g for (%g, %g)-DP over %d organizations", sigma, spec.dp_epsilon,
                spec.dp_delta, n)
    return add_gaussian_noise(agg, sigma, generator), sigma


def write_stacked_adapter(directory: str | Path, llm: LoadedModel, updates: torch.Tensor,
                          weights: Sequence[float] | None = None, base_model_path: str | None = None) -> dict[str, Any]:
    """Write the exact (weighted) mean of ``n`` LoRA products as one PEFT adapter of rank ``n r``.

    Organization ``i``'s LoRA is the card's init plus ``updates[i]``; per target module the
    factors are stacked (:func:`gt_ray.aggregate.stack_lora_factors`) so that
    ``B_stack A_stack = sum_i w_i B_i A_i``. ``lora_alpha`` is multiplied by ``n`` (by
    ``sqrt(n)`` under rsLoRA) so PEFT's scaling of the product stays the card's.

    Args:
        directory: created if missing; gets ``adapter_config.json`` and ``adapter_model.safetensors``.
        llm: the card's LLM with its LoRA init attached (gives the LoRA config, layout, init).
        updates: ``(n, L_llm, d_llm)`` LLM update vectors.
        weights: ``n`` non-negative weights (normalized); ``None`` for the plain mean.
        base_model_path: recorded as ``base_model_name_or_path``.

    Returns:
        ``{"r": ..., "lora_alpha": ...}`` of the written adapter.

    Raises:
        ValueError: bad shapes or weights, or a LoRA config with per-module ranks.
    """
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    if updates.dim() != 3 or tuple(updates.shape[1:]) != llm.layout.shape:
        raise ValueError(f"updates must be (n, {llm.layout.n_layers}, {llm.layout.d_layer}), got {tuple(updates.shape)}")
    config = copy.deepcopy(next(iter(llm.model.peft_config.values())))
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("stacking needs one rank for every module; the LoRA config has rank/alpha patterns")
    n = updates.shape[0]
    factors = [split_factors(llm.init + u, llm.layout) for u in updates]  # n x {key: matrix}
    tensors: dict[str, torch.Tensor] = {}
    for entry in llm.layout.entries:
        if entry.factor != "lora_A":
            continue
        b_key = entry.key[: -len("lora_A.weight")] + "lora_B.weight"
        a_stack, b_stack = stack_lora_factors([f[entry.key] for f in factors], [f[b_key] for f in factors], weights)
        tensors[entry.key] = a_stack.contiguous()  # (n r, in)
        tensors[b_key] = b_stack.contiguous()  # (out, n r)
    rank = config.r * n
    config.lora_alpha = config.lora_alpha * (math.sqrt(n) if config.use_rslora else n)
    config.r = rank
    config.inference_mode = True
    if base_model_path is not None:
        config.base_model_name_or_path = str(base_model_path)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return {"r": rank, "lora_alpha": config.lora_alpha}


# ----------------------------------------------------------------------------- the adapter zip


def zip_directory(src: str | Path, dest: str | Path) -> None:
    """Zip the files of ``src`` into ``dest`` atomically (flat, sorted, fixed dates: the same
    files give the same bytes; subdirectories are left out).

    Args:
        src: the directory, e.g. an exported PEFT adapter.
        dest: the zip file, written through :func:`gt_ray.storage.open_output`.
    """
    with storage.open_output(dest) as f, zipfile.ZipFile(f, "w") as z:
        for p in sorted(Path(src).iterdir()):
            if p.is_file():
                info = zipfile.ZipInfo(p.name, date_time=ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                z.writestr(info, p.read_bytes())

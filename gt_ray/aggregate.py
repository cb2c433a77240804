"""Aggregation of several organizations' update vectors in one round.

Rules: ``mean``, ``weighted_mean`` (weights such as example counts), and the robust
coordinate-wise ``median`` and ``trimmed_mean``, with optional L2 clipping of each input
first (bounds what one poisoned or broken client can do), and central Gaussian noise on
the aggregate. :func:`stack_lora_factors` averages LoRA adapters exactly in weight space.

Central DP on the mean
----------------------
With every input clipped to L2 norm ``C`` and the **fixed** denominator ``n`` (the
public number of organizations in the round), the mean ``sum_i clip(v_i) / n`` moves by
at most ``C / n`` when one organization's vector is added or removed (``add_remove``,
the relation of DP-FedAvg, McMahan et al. 2018) and ``2 C / n`` when one is replaced;
:func:`mean_sensitivity` returns that, and
``privacy.analytic_gaussian_sigma(eps, delta, mean_sensitivity(C, n))`` calibrates
:func:`add_gaussian_noise`. The unit of privacy is one organization. This bound holds only
for the unweighted clipped mean: weights, the median and the trimmed mean need their own
analysis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from gt_ray.privacy import clip_l2, vector_sensitivity

logger = logging.getLogger(__name__)

AGGREGATION_RULES = ("mean", "weighted_mean", "median", "trimmed_mean")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are summed in float32; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_vectors(vectors: Sequence[torch.Tensor]) -> None:
    if len(vectors) == 0:
        raise ValueError("vectors is empty: need at least one update vector to aggregate")
    first = vectors[0]
    for i, v in enumerate(vectors):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ValueError(f"vector {i} is not a floating point tensor")
        if v.shape != first.shape:
            raise ValueError(
                f"vector {i} has shape {tuple(v.shape)} but vector 0 has shape "
                f"{tuple(first.shape)}"
            )
        if v.dtype != first.dtype:
            raise ValueError(f"vector {i} has dtype {v.dtype} but vector 0 has dtype {first.dtype}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"vector {i} contains non-finite values (NaN or inf)")


def _normalized_weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} vectors")
    w = [float(x) for x in weights]
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"weights must be finite and >= 0, got {w}")
    total = math.fsum(w)
    if total == 0:
        raise ValueError("weights sum to zero")
    return [x / total for x in w]


def _trim_count(n: int, trim_fraction: float) -> int:
    """Vectors dropped at each end of every coordinate by the trimmed mean."""
    k = math.floor(trim_fraction * n)
    if trim_fraction > 0 and n >= 3:
        k = max(k, 1)
    return k


def aggregate(
    vectors: Sequence[torch.Tensor],
    rule: str = "mean",
    weights: Sequence[float] | None = None,
    clip_norm: float | None = None,
    trim_fraction: float = 0.1,
) -> torch.Tensor:
    """Combine the update vectors of ``n`` organizations into one.

    Args:
        vectors: ``n >= 1`` tensors of one shape and dtype, e.g. ``(n_layers, d_layer)``.
        rule: ``mean``; ``weighted_mean`` (``sum_i w_i v_i / sum_i w_i``, needs
            ``weights``); ``median`` (coordinate-wise; the average of the two middle
            values for even ``n``); ``trimmed_mean`` (coordinate-wise: drop the
            ``floor(trim_fraction * n)`` largest and smallest values, at least one each
            side when ``n >= 3`` and ``trim_fraction > 0``, and average the rest).
        weights: ``n`` finite non-negative numbers (e.g. example counts), not all zero;
            only for ``weighted_mean``.
        clip_norm: if set, each input is first scaled to L2 norm ``<= clip_norm`` (over
            the whole vector), so no input moves the mean by more than ``clip_norm / n``.
        trim_fraction: for ``trimmed_mean``, in ``[0, 0.5)``.

    Returns:
        The aggregate, a new tensor of the inputs' shape, dtype and device.

    Raises:
        ValueError: empty list, shape or dtype mismatch, non-finite values, bad weights
            (wrong length, negative, zero sum, given to a rule that does not use them),
            unknown rule, bad ``clip_norm`` or ``trim_fraction``.
    """
    if rule not in AGGREGATION_RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; expected one of {AGGREGATION_RULES}")
    _check_vectors(vectors)
    n = len(vectors)
    if rule == "weighted_mean" and weights is None:
        raise ValueError("rule 'weighted_mean' needs weights (one per vector)")
    if rule != "weighted_mean" and weights is not None:
        raise ValueError(f"weights are only used by rule 'weighted_mean', not {rule!r}")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if clip_norm is not None:
        results = [clip_l2(v, clip_norm) for v in vectors]
        vectors = [r[0] for r in results]
        n_clipped = sum(norm > clip_norm for _, norm in results)
        logger.info("clipped %d of %d vectors to L2 norm %g", n_clipped, n, clip_norm)

    out_dtype = vectors[0].dtype
    stack = torch.stack([v.detach() for v in vectors]).to(_compute_dtype(out_dtype))  # (n, ...)
    if rule == "mean":
        result = stack.mean(dim=0)
    elif rule == "weighted_mean":
        w = torch.tensor(_normalized_weights(weights, n), dtype=stack.dtype, device=stack.device)
        result = torch.tensordot(w, stack, dims=1)  # (n,) x (n, ...) -> (...)
    else:
        # Sort once along the organization axis; torch.quantile has an input size limit
        # that real LLM vectors exceed.
        ordered = stack.sort(dim=0).values  # (n, ...)
        if rule == "median":
            mid = n // 2
            result = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        else:
            k = _trim_count(n, trim_fraction)
            result = ordered[k : n - k].mean(dim=0)
            logger.debug("trimmed mean: dropped %d of %d at each end", k, n)
    return result.to(out_dtype)


def mean_sensitivity(clip_norm: float, n_vectors: int, neighbouring: str = "add_remove") -> float:
    """L2 sensitivity of the clipped mean with a fixed denominator ``n_vectors``.

    Args:
        clip_norm: the L2 bound ``C`` every input was clipped to.
        n_vectors: the public, fixed number ``n`` of organizations the sum is divided by.
        neighbouring: ``add_remove`` (``C / n``) or ``replace`` (``2 C / n``); the unit
            of privacy is one organization.

    Returns:
        The sensitivity, to pass to ``privacy.analytic_gaussian_sigma``.

    Raises:
        ValueError: ``n_vectors < 1`` or a bad ``clip_norm`` / ``neighbouring``.
    """
    if not (isinstance(n_vectors, int) and n_vectors >= 1):
        raise ValueError(f"n_vectors must be an int >= 1, got {n_vectors}")
    return vector_sensitivity(clip_norm, neighbouring) / n_vectors


def add_gaussian_noise(
    aggregate: torch.Tensor, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """Add ``N(0, sigma^2)`` noise to every coordinate of an aggregate (central DP).

    Calibrate ``sigma`` with
    ``privacy.analytic_gaussian_sigma(eps, delta, mean_sensitivity(clip_norm, n))`` for
    the mean of inputs clipped to ``clip_norm`` (see the module docstring).

    Args:
        aggregate: float tensor of any shape, e.g. ``(n_layers, d_layer)``.
        sigma: noise std ``>= 0`` (``0`` returns a copy).
        generator: the source of the noise.

    Returns:
        A new tensor of ``aggregate``'s shape, dtype and device.

    Raises:
        ValueError: ``sigma`` negative or not finite, or ``aggregate`` not finite.
    """
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if not bool(torch.isfinite(aggregate).all()):
        raise ValueError("aggregate contains non-finite values (NaN or inf)")
    noise = torch.randn(
        aggregate.shape, generator=generator, dtype=torch.float64, device=generator.device
    )
    noisy = aggregate.detach().to(torch.float64) + sigma * noise.to(aggregate.device)
    return noisy.to(aggregate.dtype)


def stack_lora_factors(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA whose product is exactly the (weighted) mean of ``n`` LoRA products.

    ``sum_i w_i B_i A_i = B_stack @ A_stack`` with ``B_stack = [w_1 B_1 ... w_n B_n]``
    (side by side) and ``A_stack = [A_1; ...; A_n]`` (on top of each other). Averaging the
    ``A`` and ``B`` factors separately is not the same (``mean(B) @ mean(A)`` has cross
    terms ``B_i A_j``).

    The result has rank ``R = sum_i r_i`` (``n r`` for equal ranks). PEFT scales a LoRA
    product by ``lora_alpha / r``: to keep the same effective scaling when exporting the
    stacked factors with ``r = R``, set ``lora_alpha`` to ``alpha * R / r`` (or fold
    the scaling into ``B_stack``).

    Args:
        As: ``n`` tensors ``(r_i, in_features)``.
        Bs: ``n`` tensors ``(out_features, r_i)``.
        weights: ``n`` finite non-negative numbers, normalized to sum 1; ``None`` for
            ``1 / n`` each.

    Returns:
        ``(A_stack, B_stack)`` of shapes ``(R, in_features)`` and ``(out_features, R)``.

    Raises:
        ValueError: empty or unequal lists, shapes that do not chain, non-finite values,
            bad weights.
    """
    n = len(As)
    if n == 0:
        raise ValueError("As is empty: need at least one LoRA to stack")
    if len(Bs) != n:
        raise ValueError(f"got {n} A factors but {len(Bs)} B factors")
    in_features, out_features = As[0].shape[-1], Bs[0].shape[0]
    for i, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(
                f"LoRA {i}: A and B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise ValueError(
                f"LoRA {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not match "
                f"in_features={in_features}, out_features={out_features} of LoRA 0"
            )
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"LoRA {i}: B {tuple(b.shape)} and A {tuple(a.shape)} have different ranks"
            )
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"LoRA {i} contains non-finite values (NaN or inf)")
    w = [1.0 / n] * n if weights is None else _normalized_weights(weights, n)
    a_stack = torch.cat(list(As), dim=0)  # (R, in)
    b_stack = torch.cat([wi * b for wi, b in zip(w, Bs)], dim=1)  # (out, R)
    return a_stack, b_stack

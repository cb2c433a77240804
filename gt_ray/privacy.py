"""Differential privacy for a released update vector, and the DP-SGD accountant used by
the organization's fine-tune: clipping, sensitivity, noise calibration, the vector
mechanism. The per-organization budget ledger is :mod:`gt_ray.privacy_ledger`.

Unit of privacy
---------------
For everything in this module except :func:`dp_sgd_epsilon` the unit of privacy is
**one organization**: its whole private dataset, seen only through the one update vector
it releases. Two inputs are neighbours under one of two relations, named explicitly:

- ``"replace"``: one organization's dataset is swapped for any other dataset. A vector
  clipped to norm ``C`` can then move to any other point of the ball, so the sensitivity
  is ``2 C``. This is the relation for an organization releasing its own vector.
- ``"add_remove"``: the organization's vector is present in, or absent from, a sum over
  organizations. The sum moves by at most ``C``. This is the relation for central noise
  on an aggregate (see :mod:`gt_ray.aggregate`).

:func:`dp_sgd_epsilon` is different: DP-SGD inside an organization protects **one
training example** (add/remove under Poisson sampling, as opacus accounts it).

The intended flow of a release: ``ledger.check(org, eps, delta)`` before any noise is
drawn (:class:`gt_ray.privacy_ledger.PrivacyLedger`), then :func:`privatize`, then
``ledger.record(...)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

UNIT_OF_PRIVACY = "organization"
"""One organization's whole dataset, released only as one update vector."""
NEIGHBOURING_RELATIONS = ("replace", "add_remove")
MECHANISM_KINDS = ("gaussian", "laplace")

# Relative width at which the bisections stop; far below any meaningful change of epsilon.
_BISECTION_RTOL = 1e-12
_BISECTION_MAX_ITERS = 400


# --------------------------------------------------------------------------------------
# Clipping and sensitivity
# --------------------------------------------------------------------------------------


def _check_vector(v: torch.Tensor) -> None:
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise ValueError(f"expected a floating point tensor, got dtype {v.dtype}")
    if v.numel() == 0:
        raise ValueError("cannot privatize an empty tensor")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("vector contains non-finite values (NaN or inf)")


def check_positive(name: str, value: float) -> None:
    """Raises ValueError unless ``value`` is a finite real number > 0."""
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_release(epsilon: float, delta: float) -> None:
    """Raises ValueError unless ``0 <= epsilon < inf`` and ``0 <= delta < 1`` (one release's values)."""
    if not (isinstance(epsilon, numbers.Real) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must satisfy 0 <= delta < 1, got {delta}")


def _clip(v: torch.Tensor, clip_norm: float, p: int) -> tuple[torch.Tensor, float]:
    check_positive("clip_norm", clip_norm)
    # The norm is taken in float64 so that a large float32/bfloat16 vector is measured
    # accurately; the scaled result goes back to the input dtype and shape.
    norm = float(torch.linalg.vector_norm(v.detach().to(torch.float64), ord=p))
    if norm <= clip_norm:
        return v.clone(), norm
    clipped = (v.to(torch.float64) * (clip_norm / norm)).to(v.dtype)
    return clipped, norm


def clip_l2(v: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale ``v`` down so that its L2 norm (over all entries) is at most ``clip_norm``.

    Args:
        v: float tensor of any shape, e.g. an update vector ``(n_layers, d_layer)``;
            treated as one flattened vector.
        clip_norm: the bound ``C > 0``.

    Returns:
        ``(clipped, original_norm)``: a new tensor of ``v``'s shape and dtype, equal to
        ``v`` when ``||v||_2 <= C`` and to ``v * C / ||v||_2`` otherwise; and ``||v||_2``.

    Raises:
        ValueError: ``clip_norm`` is not a finite number > 0.
    """
    return _clip(v, clip_norm, 2)


def clip_l1(v: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale ``v`` down so that its L1 norm (over all entries) is at most ``clip_norm``.

    Args:
        v: float tensor of any shape; treated as one flattened vector.
        clip_norm: the bound ``C > 0``.

    Returns:
        ``(clipped, original_norm)``: a new tensor of ``v``'s shape and dtype with
        ``||clipped||_1 <= C``; and ``||v||_1``.

    Raises:
        ValueError: ``clip_norm`` is not a finite number > 0.
    """
    return _clip(v, clip_norm, 1)


def vector_sensitivity(clip_norm: float, neighbouring: str) -> float:
    """Sensitivity of releasing one organization's vector clipped to norm ``clip_norm``.

    The norm (L2 for the Gaussian mechanism, L1 for Laplace) is the one used to clip.

    Args:
        clip_norm: the clipping bound ``C > 0``.
        neighbouring: ``"replace"`` (one organization's dataset swapped for another:
            ``2 C``) or ``"add_remove"`` (its vector present in or absent from a sum:
            ``C``).

    Returns:
        The sensitivity ``2 C`` or ``C``.

    Raises:
        ValueError: unknown ``neighbouring`` or bad ``clip_norm``.
    """
    check_positive("clip_norm", clip_norm)
    if neighbouring == "replace":
        return 2.0 * clip_norm
    if neighbouring == "add_remove":
        return float(clip_norm)
    raise ValueError(
        f"neighbouring must be one of {NEIGHBOURING_RELATIONS}, got {neighbouring!r}"
    )


# --------------------------------------------------------------------------------------
# Gaussian mechanism calibration
# --------------------------------------------------------------------------------------


def _log_ndtr(x: float) -> float:
    """log Phi(x), accurate far into the lower tail (where Phi itself underflows)."""
    return float(torch.special.log_ndtr(torch.tensor(x, dtype=torch.float64)))


def gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """Exact delta of the Gaussian mechanism at a given epsilon (Balle & Wang 2018, Thm 8).

    With ``s = sigma / sensitivity`` (the noise multiplier), adding ``N(0, sigma^2 I)`` is
    ``(epsilon, delta)``-DP exactly for every ``delta >= delta(epsilon, s)``, where
    ``delta(epsilon, s) = Phi(1/(2s) - epsilon s) - e^epsilon Phi(-1/(2s) - epsilon s)``.

    Args:
        epsilon: ``>= 0``.
        noise_multiplier: ``sigma / sensitivity > 0``.

    Returns:
        ``delta`` in ``[0, 1]``; decreasing in both arguments.
    """
    a = 1.0 / (2.0 * noise_multiplier)
    b = epsilon * noise_multiplier
    # The second term is e^eps times a tail probability: combine them in log space so
    # that neither overflows (large epsilon) nor underflows to 0 too early.
    delta = math.exp(_log_ndtr(a - b)) - math.exp(epsilon + _log_ndtr(-a - b))
    return min(max(delta, 0.0), 1.0)


def _bisect_decreasing(f, target: float, lo: float, hi: float) -> float:
    """Smallest x in (lo, hi] with f(x) <= target, for f decreasing; returns a valid x."""
    for _ in range(_BISECTION_MAX_ITERS):
        if hi - lo <= _BISECTION_RTOL * hi:
            break
        mid = 0.5 * (lo + hi)
        if f(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest noise std making the Gaussian mechanism ``(epsilon, delta)``-DP.

    The analytic Gaussian mechanism of Balle & Wang, "Improving the Gaussian Mechanism
    for Differential Privacy: Analytical Calibration and Optimal Denoising" (ICML 2018):
    bisection on the exact condition of :func:`gaussian_delta`. Valid for every
    ``epsilon > 0`` (also ``epsilon >= 1``, where the classic formula is not), and never
    larger than :func:`classic_gaussian_sigma` where that one holds.

    Args:
        epsilon: ``> 0``.
        delta: ``0 < delta < 1``.
        sensitivity: L2 sensitivity ``> 0`` (see :func:`vector_sensitivity`).

    Returns:
        ``sigma``: the smallest std (up to a relative ``1e-12``, rounded up) with
        ``gaussian_delta(epsilon, sigma / sensitivity) <= delta``.

    Raises:
        ValueError: an argument is out of range.
    """
    check_positive("epsilon", epsilon)
    check_positive("sensitivity", sensitivity)
    if not 0 < delta < 1:
        raise ValueError(f"delta must satisfy 0 < delta < 1, got {delta}")

    def f(s: float) -> float:
        return gaussian_delta(epsilon, s)

    hi = 1.0
    while f(hi) > delta:
        hi *= 2.0
    lo = hi / 2.0
    while f(lo) <= delta:
        hi, lo = lo, lo / 2.0
    return _bisect_decreasing(f, delta, lo, hi) * sensitivity


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The textbook ``sigma = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon``.

    Dwork & Roth, "The Algorithmic Foundations of Differential Privacy", Theorem A.1,
    which holds only for ``epsilon < 1``. Kept for comparison; use
    :func:`analytic_gaussian_sigma` to calibrate.

    Args:
        epsilon: ``0 < epsilon < 1``.
        delta: ``0 < delta < 1``.
        sensitivity: L2 sensitivity ``> 0``.

    Returns:
        ``sigma``.

    Raises:
        ValueError: ``epsilon >= 1`` (the theorem does not hold) or another bad argument.
    """
    check_positive("epsilon", epsilon)
    check_positive("sensitivity", sensitivity)
    if epsilon >= 1:
        raise ValueError(
            f"the classic Gaussian mechanism bound only holds for epsilon < 1, got "
            f"{epsilon}; use analytic_gaussian_sigma"
        )
    if not 0 < delta < 1:
        raise ValueError(f"delta must satisfy 0 < delta < 1, got {delta}")
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def gaussian_epsilon(sigma: float, sensitivity: float, delta: float) -> float:
    """Smallest epsilon for which noise std ``sigma`` gives ``(epsilon, delta)``-DP.

    The inverse of :func:`analytic_gaussian_sigma` (same exact condition, bisection on
    epsilon), for reporting what a given noise level buys.

    Args:
        sigma: noise std ``> 0``.
        sensitivity: L2 sensitivity ``> 0``.
        delta: ``0 < delta < 1``.

    Returns:
        ``epsilon >= 0`` (up to a relative ``1e-12``, rounded up); ``0.0`` when the noise
        alone already gives ``(0, delta)``-DP.

    Raises:
        ValueError: an argument is out of range.
    """
    check_positive("sigma", sigma)
    check_positive("sensitivity", sensitivity)
    if not 0 < delta < 1:
        raise ValueError(f"delta must satisfy 0 < delta < 1, got {delta}")
    s = sigma / sensitivity

    def f(eps: float) -> float:
        return gaussian_delta(eps, s)

    if f(0.0) <= delta:
        return 0.0
    hi = 1.0
    while f(hi) > delta:
        hi *= 2.0
    return _bisect_decreasing(f, delta, 0.0, hi)


def laplace_scale(epsilon: float, sensitivity: float) -> float:
    """Scale ``b = sensitivity / epsilon`` of the Laplace mechanism (pure epsilon-DP).

    Args:
        epsilon: ``> 0``.
        sensitivity: L1 sensitivity ``> 0``.

    Returns:
        ``b``; each coordinate's noise has std ``sqrt(2) b``.

    Raises:
        ValueError: an argument is out of range.
    """
    check_positive("epsilon", epsilon)
    check_positive("sensitivity", sensitivity)
    return sensitivity / epsilon


# --------------------------------------------------------------------------------------
# The mechanism applied to one released vector
# --------------------------------------------------------------------------------------


@dataclass
class VectorMechanism:
    """How one organization privatizes its update vector before releasing it.

    The unit of privacy is the organization (its whole dataset -> one vector).
    """

    kind: Literal["gaussian", "laplace"] = "gaussian"
    """``gaussian``: L2 clipping + analytic Gaussian noise, ``(epsilon, delta)``-DP.
    ``laplace``: L1 clipping + Laplace noise, ``(epsilon, 0)``-DP."""
    epsilon: float = 1.0
    """Privacy parameter epsilon of this one release, ``> 0``."""
    delta: float = 1e-5
    """``0 < delta < 1`` for ``gaussian``; must be ``0.0`` for ``laplace``."""
    clip_norm: float = 1.0
    """Bound on the vector's norm (L2 for gaussian, L1 for laplace), ``> 0``."""
    neighbouring: Literal["replace", "add_remove"] = "replace"
    """``replace`` (sensitivity ``2 clip_norm``: the right one for an organization's own
    release) or ``add_remove`` (sensitivity ``clip_norm``: presence/absence in a sum)."""

    def __post_init__(self) -> None:
        if self.kind not in MECHANISM_KINDS:
            raise ValueError(f"kind must be one of {MECHANISM_KINDS}, got {self.kind!r}")
        check_positive("epsilon", self.epsilon)
        if self.kind == "gaussian" and not 0 < self.delta < 1:
            raise ValueError(
                f"delta must satisfy 0 < delta < 1 for the gaussian mechanism, "
                f"got {self.delta}"
            )
        if self.kind == "laplace" and self.delta != 0:
            raise ValueError(
                f"delta must be 0.0 for the laplace mechanism (it is pure epsilon-DP), "
                f"got {self.delta}"
            )
        check_positive("clip_norm", self.clip_norm)
        if self.neighbouring not in NEIGHBOURING_RELATIONS:
            raise ValueError(
                f"neighbouring must be one of {NEIGHBOURING_RELATIONS}, "
                f"got {self.neighbouring!r}"
            )

    @property
    def sensitivity(self) -> float:
        """Sensitivity of the clipped vector under ``neighbouring`` (L2 or L1)."""
        return vector_sensitivity(self.clip_norm, self.neighbouring)

    def noise_scale(self) -> float:
        """Gaussian ``sigma`` or Laplace ``b`` that this configuration calls for."""
        if self.kind == "gaussian":
            return analytic_gaussian_sigma(self.epsilon, self.delta, self.sensitivity)
        return laplace_scale(self.epsilon, self.sensitivity)


@dataclass
class PrivacyReport:
    """What one :func:`privatize` call guarantees; goes into the artifact's metadata."""

    mechanism: str
    """``gaussian`` or ``laplace``."""
    epsilon: float
    delta: float
    sigma: float | None
    """Gaussian noise std per coordinate (``None`` for laplace)."""
    laplace_scale: float | None
    """Laplace scale ``b`` per coordinate (``None`` for gaussian)."""
    clip_norm: float
    clip_norm_type: str
    """``l2`` or ``l1``."""
    sensitivity: float
    neighbouring: str
    unit: str
    """The unit of privacy: always ``organization`` here."""
    original_norm: float
    """Norm of the vector before clipping (itself not private: do not release it)."""
    clipped: bool
    """Whether clipping changed the vector."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields (keys sorted when dumped by the caller)."""
        return dataclasses.asdict(self)


def _gaussian_noise(n: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the generator's device, in float64, then moved to the vector's device.
    noise = torch.randn(n, generator=generator, dtype=torch.float64, device=generator.device)
    return noise * sigma


def _laplace_noise(n: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    # Laplace(b) = b * (E1 - E2) with E1, E2 ~ Exp(1): no log(0) edge case from inverting
    # a uniform, and it takes an explicit generator (torch.distributions does not).
    def exp_draw() -> torch.Tensor:
        return torch.empty(n, dtype=torch.float64, device=generator.device).exponential_(
            generator=generator
        )

    return scale * (exp_draw() - exp_draw())


def privatize(
    v: torch.Tensor, mech: VectorMechanism, generator: torch.Generator
) -> tuple[torch.Tensor, PrivacyReport]:
    """Clip an update vector and add calibrated noise, for release by one organization.

    Check the budget with :meth:`PrivacyLedger.check` before calling this, and record
    the release with :meth:`PrivacyLedger.record_report` after.

    Args:
        v: the update vector, float tensor of any shape (``(n_layers, d_layer)``);
            treated as flattened.
        mech: the mechanism configuration.
        generator: the source of the noise (pass one seeded from a secret, not a fixed
            public seed, for a real release).

    Returns:
        ``(noisy_v, report)``: a tensor of ``v``'s shape, dtype and device, and the
        :class:`PrivacyReport` of the guarantee.

    Raises:
        ValueError: ``v`` is not a finite, non-empty float tensor.
    """
    _check_vector(v)
    if mech.kind == "gaussian":
        clipped, norm = clip_l2(v, mech.clip_norm)
    else:
        clipped, norm = clip_l1(v, mech.clip_norm)
    scale = mech.noise_scale()
    flat = clipped.detach().reshape(-1).to(torch.float64)
    noise_fn = _gaussian_noise if mech.kind == "gaussian" else _laplace_noise
    noise = noise_fn(flat.numel(), scale, generator).to(flat.device)
    noisy = (flat + noise).to(v.dtype).reshape(v.shape)
    report = PrivacyReport(
        mechanism=mech.kind,
        epsilon=float(mech.epsilon),
        delta=float(mech.delta),
        sigma=scale if mech.kind == "gaussian" else None,
        laplace_scale=scale if mech.kind == "laplace" else None,
        clip_norm=float(mech.clip_norm),
        clip_norm_type="l2" if mech.kind == "gaussian" else "l1",
        sensitivity=mech.sensitivity,
        neighbouring=mech.neighbouring,
        unit=UNIT_OF_PRIVACY,
        original_norm=norm,
        clipped=norm > mech.clip_norm,
    )
    logger.info(
        "privatized vector: mechanism=%s epsilon=%g delta=%g noise_scale=%g clipped=%s",
        mech.kind, mech.epsilon, mech.delta, scale, report.clipped,
    )
    return noisy, report


# --------------------------------------------------------------------------------------
# DP-SGD accounting (unit: one training example inside an organization)
# --------------------------------------------------------------------------------------


def dp_sgd_epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon spent by DP-SGD, from opacus' accountant (as its PrivacyEngine reports it).

    The unit of privacy here is **one training example** of the organization's data
    (add/remove under Poisson sampling), not the organization.

    Args:
        sample_rate: Poisson sampling rate per step, ``0 < q <= 1`` (``1 / len(loader)``
            in opacus).
        noise_multiplier: noise std / per-example clipping norm, ``> 0``.
        steps: optimizer steps taken, ``>= 0``.
        delta: ``0 < delta < 1``.
        accountant: an opacus accountant: ``rdp``, ``prv`` or ``gdp``.

    Returns:
        ``epsilon`` (``0.0`` for no steps).

    Raises:
        ValueError: an argument is out of range or the accountant is unknown.
    """
    from opacus.accountants import create_accountant  # lazy: importing opacus costs ~1.5 s

    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must satisfy 0 < sample_rate <= 1, got {sample_rate}")
    check_positive("noise_multiplier", noise_multiplier)
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must satisfy 0 < delta < 1, got {delta}")
    acc = create_accountant(accountant)
    if steps == 0:
        return 0.0
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta))

"""Differential privacy for a released update vector, a per-organization budget ledger,
and the DP-SGD accountant used by the organization's fine-tune.

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
drawn, then :func:`privatize`, then ``ledger.record(...)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

UNIT_OF_PRIVACY = "organization"
"""One organization's whole dataset, released only as one update vector."""
NEIGHBOURING_RELATIONS = ("replace", "add_remove")
MECHANISM_KINDS = ("gaussian", "laplace")
LEDGER_FORMAT = "gt_ray.privacy_ledger/1"
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 257)) + [512, 1024]
"""Renyi orders used to convert the ledger's Gaussian releases to (epsilon, delta)."""

# Relative width at which the bisections stop; far below any meaningful change of epsilon.
_BISECTION_RTOL = 1e-12
_BISECTION_MAX_ITERS = 400


class BudgetExceededError(ValueError):
    """A release would take an organization past its privacy budget."""


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


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_release(epsilon: float, delta: float) -> None:
    if not (isinstance(epsilon, numbers.Real) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must satisfy 0 <= delta < 1, got {delta}")


def _clip(v: torch.Tensor, clip_norm: float, p: int) -> tuple[torch.Tensor, float]:
    _check_positive("clip_norm", clip_norm)
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
    _check_positive("clip_norm", clip_norm)
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
    _check_positive("epsilon", epsilon)
    _check_positive("sensitivity", sensitivity)
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
    _check_positive("epsilon", epsilon)
    _check_positive("sensitivity", sensitivity)
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
    _check_positive("sigma", sigma)
    _check_positive("sensitivity", sensitivity)
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
    _check_positive("epsilon", epsilon)
    _check_positive("sensitivity", sensitivity)
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
        _check_positive("epsilon", self.epsilon)
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
        _check_positive("clip_norm", self.clip_norm)
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
# Budget ledger
# --------------------------------------------------------------------------------------


@dataclass
class LedgerEntry:
    """One release by one organization."""

    round_id: str
    epsilon: float
    delta: float
    mechanism: str
    """``gaussian``, ``laplace`` or any other label (e.g. ``dp_sgd``)."""
    noise_multiplier: float | None = None
    """``sigma / sensitivity`` of a Gaussian release; enables the RDP total."""


@dataclass
class BudgetSpent:
    """Totals of one organization's releases."""

    epsilon: float
    """Sum of epsilons: basic composition, an upper bound."""
    delta: float
    """Sum of deltas: basic composition, an upper bound."""
    n_releases: int
    gaussian_rdp_epsilon: float | None
    """Epsilon of the Gaussian releases alone (those with a noise multiplier), composed
    with Renyi DP (opacus' analysis) at ``delta = gaussian_rdp_delta``; tighter than basic
    composition for many releases. ``None`` when there are none. Not used by ``check``."""
    gaussian_rdp_delta: float | None


class PrivacyLedger:
    """Per-organization privacy budget, persisted as a JSON file.

    Totals use **basic (sequential) composition** (Dwork & Roth, "The Algorithmic
    Foundations of Differential Privacy", Theorem 3.16): ``k`` releases that are
    ``(eps_i, delta_i)``-DP together are ``(sum eps_i, sum delta_i)``-DP. This is an upper
    bound: advanced composition or RDP (see :class:`BudgetSpent`) is tighter, but the
    budget is enforced on the basic total so that mixed mechanisms stay sound.

    The file is rewritten atomically (temp file + ``os.replace``) on every record. One
    writer per file: two processes recording into the same ledger concurrently can lose
    an entry.

    Args:
        path: the JSON file; loaded if it exists.
        eps_budget: total epsilon each organization may spend, ``> 0``.
        delta_budget: total delta each organization may spend, ``0 <= delta_budget < 1``.

    Raises:
        ValueError: bad budgets, or the file is not a ledger.
    """

    def __init__(self, path: str | os.PathLike, eps_budget: float, delta_budget: float):
        _check_positive("eps_budget", eps_budget)
        if not 0 <= delta_budget < 1:
            raise ValueError(f"delta_budget must satisfy 0 <= delta_budget < 1, got {delta_budget}")
        self.path = Path(path)
        self.eps_budget = float(eps_budget)
        self.delta_budget = float(delta_budget)
        self._entries: dict[str, list[LedgerEntry]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = json.loads(self.path.read_text())
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{self.path} is not a privacy ledger (format {LEDGER_FORMAT})")
        self._entries = {
            org: [LedgerEntry(**e) for e in entries]
            for org, entries in data["organizations"].items()
        }

    def _save(self) -> None:
        data = {
            "format": LEDGER_FORMAT,
            "unit": UNIT_OF_PRIVACY,
            "organizations": {
                org: [dataclasses.asdict(e) for e in entries]
                for org, entries in self._entries.items()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def entries(self, org_id: str) -> list[LedgerEntry]:
        """The releases recorded for ``org_id``, oldest first (a copy)."""
        return list(self._entries.get(org_id, []))

    def spent(self, org_id: str) -> BudgetSpent:
        """Totals spent by ``org_id`` so far (zeros for an unknown organization).

        Args:
            org_id: the organization.

        Returns:
            :class:`BudgetSpent`.
        """
        entries = self._entries.get(org_id, [])
        rdp_eps = rdp_delta = None
        multipliers = [e.noise_multiplier for e in entries if e.noise_multiplier is not None]
        if multipliers and self.delta_budget > 0:
            # Imported here: importing opacus costs ~1.5 s, which the provider service
            # and aggregation should not pay unless they ask for RDP totals.
            from opacus.accountants.analysis import rdp as rdp_analysis

            # One unsampled Gaussian release of noise multiplier z: q=1, one step.
            rdp = sum(
                np.asarray(
                    rdp_analysis.compute_rdp(
                        q=1.0, noise_multiplier=z, steps=1, orders=RDP_ORDERS
                    )
                )
                for z in multipliers
            )
            eps, _ = rdp_analysis.get_privacy_spent(
                orders=RDP_ORDERS, rdp=rdp, delta=self.delta_budget
            )
            rdp_eps, rdp_delta = float(eps), self.delta_budget
        return BudgetSpent(
            epsilon=math.fsum(e.epsilon for e in entries),
            delta=math.fsum(e.delta for e in entries),
            n_releases=len(entries),
            gaussian_rdp_epsilon=rdp_eps,
            gaussian_rdp_delta=rdp_delta,
        )

    def check(self, org_id: str, epsilon: float, delta: float) -> None:
        """Refuse a release that would take ``org_id`` past the budget.

        Call it before any noise is drawn.

        Args:
            org_id: the organization.
            epsilon: epsilon of the planned release.
            delta: delta of the planned release.

        Raises:
            BudgetExceededError: basic-composition totals would exceed ``eps_budget`` or
                ``delta_budget``.
            ValueError: ``epsilon`` or ``delta`` out of range.
        """
        _check_release(epsilon, delta)
        entries = self._entries.get(org_id, [])
        total_eps = math.fsum([e.epsilon for e in entries] + [epsilon])
        total_delta = math.fsum([e.delta for e in entries] + [delta])
        if total_eps > self.eps_budget or total_delta > self.delta_budget:
            spent = self.spent(org_id)
            raise BudgetExceededError(
                f"privacy budget exceeded for organization {org_id!r}: spent "
                f"epsilon={spent.epsilon:.6g}, delta={spent.delta:.6g} over "
                f"{spent.n_releases} releases; this release asks epsilon={epsilon:.6g}, "
                f"delta={delta:.6g}; the budget is epsilon={self.eps_budget:.6g}, "
                f"delta={self.delta_budget:.6g} (basic composition)"
            )

    def record(
        self,
        org_id: str,
        round_id: str,
        *,
        epsilon: float,
        delta: float,
        mechanism: str,
        noise_multiplier: float | None = None,
    ) -> None:
        """Record a release that has happened, and save the file.

        A release is recorded even if it exceeds the budget (the spending happened; a
        warning is logged): call :meth:`check` first to prevent that.

        Args:
            org_id: the organization.
            round_id: the round; one release per organization and round.
            epsilon: ``>= 0``.
            delta: ``0 <= delta < 1``.
            mechanism: a label, e.g. ``gaussian``.
            noise_multiplier: ``sigma / sensitivity`` for a Gaussian release.

        Raises:
            ValueError: bad values, or ``round_id`` is already recorded for ``org_id``.
        """
        _check_release(epsilon, delta)
        if noise_multiplier is not None:
            _check_positive("noise_multiplier", noise_multiplier)
        entries = self._entries.setdefault(org_id, [])
        if any(e.round_id == round_id for e in entries):
            raise ValueError(
                f"organization {org_id!r} already has a release recorded for round {round_id!r}"
            )
        entries.append(
            LedgerEntry(
                round_id=str(round_id),
                epsilon=float(epsilon),
                delta=float(delta),
                mechanism=mechanism,
                noise_multiplier=None if noise_multiplier is None else float(noise_multiplier),
            )
        )
        self._save()
        spent = self.spent(org_id)
        if spent.epsilon > self.eps_budget or spent.delta > self.delta_budget:
            logger.warning(
                "organization %r is over its privacy budget: epsilon=%g delta=%g",
                org_id, spent.epsilon, spent.delta,
            )

    def record_report(self, org_id: str, round_id: str, report: PrivacyReport) -> None:
        """:meth:`record` the release described by a :func:`privatize` report."""
        self.record(
            org_id,
            round_id,
            epsilon=report.epsilon,
            delta=report.delta,
            mechanism=report.mechanism,
            noise_multiplier=(
                None if report.sigma is None else report.sigma / report.sensitivity
            ),
        )


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
    from opacus.accountants import create_accountant  # lazy: see PrivacyLedger.spent

    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must satisfy 0 < sample_rate <= 1, got {sample_rate}")
    _check_positive("noise_multiplier", noise_multiplier)
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must satisfy 0 < delta < 1, got {delta}")
    acc = create_accountant(accountant)
    if steps == 0:
        return 0.0
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta))

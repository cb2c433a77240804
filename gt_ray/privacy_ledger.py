"""The per-organization privacy budget ledger: every release of an organization's update
vector, persisted as a JSON file, and checked against a budget before any noise is drawn.

The unit of privacy is **one organization** (see :mod:`gt_ray.privacy`). The intended flow
of a release: :meth:`PrivacyLedger.check` before any noise is drawn, then
:func:`gt_ray.privacy.privatize`, then :meth:`PrivacyLedger.record_report`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gt_ray import storage
from gt_ray.privacy import UNIT_OF_PRIVACY, PrivacyReport, check_positive, check_release

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "gt_ray.privacy_ledger/1"
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 257)) + [512, 1024]
"""Renyi orders used to convert the ledger's Gaussian releases to (epsilon, delta)."""


class BudgetExceededError(ValueError):
    """A release would take an organization past its privacy budget."""


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

    The file is rewritten atomically (:func:`gt_ray.storage.write_text`: temp file, fsync,
    ``os.replace``) on every record. One writer per file: two processes recording into the
    same ledger concurrently can lose an entry.

    Args:
        path: the JSON file; loaded if it exists.
        eps_budget: total epsilon each organization may spend, ``> 0``.
        delta_budget: total delta each organization may spend, ``0 <= delta_budget < 1``.

    Raises:
        ValueError: bad budgets, or the file is not a ledger.
    """

    def __init__(self, path: str | os.PathLike, eps_budget: float, delta_budget: float):
        check_positive("eps_budget", eps_budget)
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
        storage.write_text(self.path, json.dumps(data, indent=2, sort_keys=True), private=True)

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
        check_release(epsilon, delta)
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
        check_release(epsilon, delta)
        if noise_multiplier is not None:
            check_positive("noise_multiplier", noise_multiplier)
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

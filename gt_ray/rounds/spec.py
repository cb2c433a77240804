"""What a round is: its spec, its state as written to ``round.json``, receipts, errors, and
the names of the files a round store holds (see :mod:`gt_ray.rounds`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gt_ray.aggregate import AGGREGATION_RULES
from gt_ray.wire import ROBUST_RULES, _is_number, check_id

ROUND_MODES = ("aggregate_then_translate", "translate_then_aggregate")
DEFAULT_MODE = "aggregate_then_translate"
"""See :mod:`gt_ray.rounds` for why."""
ROUND_STATUSES = ("open", "closed")
STORE_FORMAT = "gt-ray-round-store-v1"
ROUND_FORMAT = "gt-ray-round-v1"
STORE_FILE = "store.json"
ROUND_FILE = "round.json"
LOCK_FILE = ".lock"
ROUNDS_DIR = "rounds"
SUBMISSIONS_DIR = "submissions"
RESULT_DIR = "result"
UPDATE_FILE = "llm_update.safetensors"
TRANSLATED_FILE = "translated.safetensors"
TRANSLATED_TENSOR = "updates"
ADAPTER_DIR = "adapter"
ADAPTER_ZIP = "adapter.zip"


class RoundError(Exception):
    """Base of the errors a round operation raises for a request that cannot be served."""


class UnknownRoundError(RoundError):
    """No round has this id."""


class RoundConflictError(RoundError):
    """The request contradicts the round's state (slot taken, key reused, closed, quorum)."""


class OrgNotExpectedError(RoundError):
    """The round lists its organizations and this one is not among them."""


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class RoundSpec:
    """How one round aggregates; fixed when the round is opened."""

    rule: str = "mean"
    """One of :data:`gt_ray.aggregate.AGGREGATION_RULES`; ``weighted_mean`` weighs each
    submission by its ``n_examples``."""
    mode: str = DEFAULT_MODE
    """``aggregate_then_translate`` or ``translate_then_aggregate`` (see :mod:`gt_ray.rounds`)."""
    weight_space: bool = False
    """Export the exact (weighted) mean of the LoRA products as one stacked rank ``n r``
    LoRA; needs ``translate_then_aggregate`` and ``mean`` or ``weighted_mean``."""
    clip_norm: float | None = None
    """Clip every vector to this L2 norm before aggregating (TinyLM vectors in
    ``aggregate_then_translate``, LLM vectors otherwise)."""
    trim_fraction: float = 0.1
    """For ``trimmed_mean``: fraction dropped at each end, in ``[0, 0.5)``."""
    expected_orgs: tuple[str, ...] | None = None
    """The organizations allowed to submit; ``None`` allows every authenticated one."""
    quorum: int | None = None
    """Submissions needed to close; default ``len(expected_orgs)``, or 1 without a list."""
    dp_epsilon: float | None = None
    """Central Gaussian noise on the clipped mean for ``(dp_epsilon, dp_delta)``-DP with
    one organization as the unit (add/remove); needs ``clip_norm`` and ``rule='mean'``."""
    dp_delta: float | None = None
    """The delta of the central noise, in ``(0, 1)``."""
    accept_outliers: bool = False
    """Take vectors whose norm is outside the store's :class:`NormBound`; only with a
    robust rule (:data:`ROBUST_RULES`)."""

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATION_RULES:
            raise ValueError(f"rule must be one of {AGGREGATION_RULES}, got {self.rule!r}")
        if self.mode not in ROUND_MODES:
            raise ValueError(f"mode must be one of {ROUND_MODES}, got {self.mode!r}")
        if not isinstance(self.weight_space, bool):
            raise ValueError(f"weight_space must be true or false, got {self.weight_space!r}")
        if self.weight_space and (self.mode != "translate_then_aggregate" or self.rule not in ("mean", "weighted_mean")):
            raise ValueError("weight_space needs mode 'translate_then_aggregate' and rule 'mean' or 'weighted_mean' "
                             "(a median of LoRA products is not a LoRA product)")
        if self.clip_norm is not None and not (_is_number(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a finite number > 0, got {self.clip_norm!r}")
        if not (_is_number(self.trim_fraction) and 0 <= self.trim_fraction < 0.5):
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if self.expected_orgs is not None:
            orgs = tuple(self.expected_orgs)
            if not orgs:
                raise ValueError("expected_orgs must name at least one organization (or be null for any)")
            for org in orgs:
                check_id("expected_orgs entry", org)
            if len(set(orgs)) != len(orgs):
                raise ValueError(f"expected_orgs lists an organization twice: {list(orgs)}")
            object.__setattr__(self, "expected_orgs", orgs)
        if self.quorum is not None:
            if isinstance(self.quorum, bool) or not isinstance(self.quorum, int) or self.quorum < 1:
                raise ValueError(f"quorum must be an integer >= 1, got {self.quorum!r}")
            if self.expected_orgs is not None and self.quorum > len(self.expected_orgs):
                raise ValueError(f"quorum {self.quorum} exceeds the {len(self.expected_orgs)} expected organizations")
        if not isinstance(self.accept_outliers, bool):
            raise ValueError(f"accept_outliers must be true or false, got {self.accept_outliers!r}")
        if self.accept_outliers and self.rule not in ROBUST_RULES:
            raise ValueError(f"accept_outliers needs a robust rule ({' or '.join(ROBUST_RULES)}): with rule "
                             f"{self.rule!r} one vector far out moves the aggregate without bound")
        if self.accept_outliers and self.rule == "trimmed_mean" and self.trim_fraction == 0:
            raise ValueError("accept_outliers with trimmed_mean needs trim_fraction > 0 (0 trims nothing)")
        if (self.dp_epsilon is None) != (self.dp_delta is None):
            raise ValueError("dp_epsilon and dp_delta go together")
        if self.dp_epsilon is not None:
            if not (_is_number(self.dp_epsilon) and self.dp_epsilon > 0):
                raise ValueError(f"dp_epsilon must be a finite number > 0, got {self.dp_epsilon!r}")
            if not (_is_number(self.dp_delta) and 0 < self.dp_delta < 1):
                raise ValueError(f"dp_delta must be in (0, 1), got {self.dp_delta!r}")
            if self.clip_norm is None or self.rule != "mean" or self.weight_space:
                raise ValueError("central DP noise needs clip_norm, rule 'mean' and no weight_space: the sensitivity "
                                 "bound holds for the unweighted clipped mean only")

    @property
    def min_submissions(self) -> int:
        """How many submissions the round needs before it can close."""
        if self.quorum is not None:
            return self.quorum
        return len(self.expected_orgs) if self.expected_orgs is not None else 1

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["expected_orgs"] = None if self.expected_orgs is None else list(self.expected_orgs)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundSpec:
        """Build a spec from :meth:`to_dict` output.

        Raises:
            ValueError: on unknown keys or bad values.
        """
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown RoundSpec keys: {sorted(unknown)}")
        return cls(**data)


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Receipt:
    """What an organization gets back for a submission (the HTTP API's receipt)."""

    receipt_id: str
    round_id: str
    org_id: str
    sha256: str
    """Hex sha256 of the submitted file bytes."""
    received_at: str
    duplicate: bool = False
    """True when this is the first receipt returned again (nothing new was stored)."""

    def to_dict(self) -> dict[str, Any]:
        """The receipt as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass
class Submission:
    """One accepted vector, as recorded in ``round.json``."""

    receipt_id: str
    sha256: str
    n_examples: int
    received_at: str
    key_hashes: list[str] = field(default_factory=list)
    """sha256 of every idempotency key that maps to this submission."""


@dataclass
class RoundState:
    """The content of one ``round.json``."""

    round_id: str
    card_id: str
    spec: RoundSpec
    created_at: str
    status: str = "open"
    submissions: dict[str, Submission] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    def receipt(self, org_id: str, duplicate: bool) -> Receipt:
        """The receipt of ``org_id``'s submission."""
        s = self.submissions[org_id]
        return Receipt(s.receipt_id, self.round_id, org_id, s.sha256, s.received_at, duplicate)

    @property
    def ready_to_close(self) -> bool:
        """Open with at least the submissions the spec needs."""
        return self.status == "open" and len(self.submissions) >= self.spec.min_submissions

    def to_dict(self) -> dict[str, Any]:
        """The state as the JSON document written to ``round.json``."""
        return {"format": ROUND_FORMAT, "round_id": self.round_id, "card_id": self.card_id,
                "spec": self.spec.to_dict(), "created_at": self.created_at, "status": self.status,
                "submissions": {org: dataclasses.asdict(s) for org, s in sorted(self.submissions.items())},
                "result": self.result}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundState:
        """Parse a ``round.json`` document.

        Raises:
            ValueError: if it is not a round document.
        """
        if data.get("format") != ROUND_FORMAT:
            raise ValueError(f"not a gt-ray round (format {data.get('format')!r})")
        try:
            return cls(round_id=data["round_id"], card_id=data["card_id"], spec=RoundSpec.from_dict(data["spec"]),
                       created_at=data["created_at"], status=data["status"],
                       submissions={org: Submission(**s) for org, s in data["submissions"].items()},
                       result=data["result"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed round document ({e})") from None

"""Aggregation rounds on the provider side: round state, persistence, and the round's LLM update.

No Ray and no HTTP here: ``serve/`` wraps this module, and everything in it runs and is
tested in a plain Python process (the translator is passed in as a callable).

A round
-------
The provider opens a round with a :class:`RoundSpec`; organizations submit TinyLM update
vectors (:meth:`RoundStore.submit`, the bytes of the file ``gt-ray org finetune`` wrote);
:meth:`RoundStore.close` computes the round's LLM update through a ``translate`` callable;
:meth:`RoundStore.export_adapter` writes it as a PEFT adapter directory plus a zip of it.

Modes
-----
- ``aggregate_then_translate`` (**the default**): aggregate the TinyLM vectors, translate
  the aggregate once. This is what the paper does, and it is the default because (1) the
  aggregation rule, the clipping and the central DP noise act on what the organizations
  actually sent, in the space where their own vector mechanism clipped, so a poisoned
  vector is trimmed away *before* it reaches the (nonlinear, unbounded) translator, and
  noise added to the aggregate stays DP through the translation (post-processing);
  (2) it costs one translation per round, not one per organization. The price: the
  translator sees an average of updates, which is in its training distribution only as
  far as the shadow corpus' task mixtures cover such averages (to first order the mean of
  small updates is the update on the pooled data, so they mostly do).
- ``translate_then_aggregate``: translate every vector, aggregate the LLM vectors. For a
  linear translator and the (weighted) mean both modes agree.
- ``weight_space`` (a flag on ``translate_then_aggregate`` with ``mean``/``weighted_mean``):
  averaging LoRA factors is not averaging LoRA products (``mean(B) mean(A)`` has cross
  terms), so the adapter instead stacks every organization's factors into one LoRA of rank
  ``n r`` whose product is exactly the (weighted) mean of the products ``B_i A_i``
  (:func:`gt_ray.aggregate.stack_lora_factors`); ``lora_alpha`` is scaled so that PEFT's
  ``lora_alpha / r`` stays the card's.

State directory
---------------
::

    {state_dir}/store.json                                 the card this store belongs to
    {state_dir}/rounds/{round_id}/round.json               spec, status, receipts, result
    {state_dir}/rounds/{round_id}/submissions/{org}.safetensors   accepted bytes, verbatim
    {state_dir}/rounds/{round_id}/result/llm_update.safetensors   the round's LLM update
    {state_dir}/rounds/{round_id}/result/translated.safetensors   per-organization LLM vectors
    {state_dir}/rounds/{round_id}/result/adapter/ and adapter.zip the PEFT adapter

Every file is written under a temporary name, fsynced and ``os.replace``d into place;
``round.json`` is written last and is the commit point (a vector file it does not list is
an orphan of a crash and is overwritten by the next accepted submission). Writers hold a
per-round ``flock``, so threads and processes sharing the directory take turns, and every
operation re-reads ``round.json``: a restarted service loses no accepted submission.

What a submission must be
-------------------------
Besides a valid file for the card's TinyLM layout (:func:`parse_update_bytes`): not all
zeros (a fine-tune that learned nothing, which would only dilute a mean), and, when the
store has a :class:`NormBound`, an L2 norm inside the range of the shadow corpus' TinyLM
updates widened by a factor. The bound comes from ``input_norms.json`` beside the translator
checkpoint (:func:`write_norm_bound`, :func:`load_norm_bound`). A round whose rule is
robust (``median``, ``trimmed_mean``) may set ``accept_outliers``: one outlier cannot move
such a rule far, and the round may want to see what arrives.

Idempotency
-----------
Per organization and round: a submission whose ``Idempotency-Key`` (or, without a key,
whose exact bytes) the organization already used returns the first receipt again with
``duplicate=True``, also after the round closed; the same key with other bytes, or other
bytes for an organization that already holds a slot, is a :class:`RoundConflictError`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from gt_ray.aggregate import AGGREGATION_RULES, add_gaussian_noise, aggregate, mean_sensitivity, stack_lora_factors
from gt_ray.privacy import UNIT_OF_PRIVACY, analytic_gaussian_sigma, clip_l2
from gt_ray.updates import export_peft_adapter, split_factors
from gt_ray.wire import (ROBUST_RULES, NormBound, _is_number, check_id, check_update_content,
                          parse_update_bytes, update_to_bytes)

if TYPE_CHECKING:
    from gt_ray.models import LoadedModel, PairCard

logger = logging.getLogger(__name__)

ROUND_MODES = ("aggregate_then_translate", "translate_then_aggregate")
DEFAULT_MODE = "aggregate_then_translate"
"""See the module docstring for why."""
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
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
"""Fixed zip entry dates, so the same adapter always zips to the same bytes."""

Translate = Callable[[torch.Tensor], torch.Tensor]
"""Raw TinyLM vectors ``(B, L_tiny, d_tiny)`` -> raw LLM vectors ``(B, L_llm, d_llm)``."""


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
    """``aggregate_then_translate`` or ``translate_then_aggregate`` (module docstring)."""
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


# ----------------------------------------------------------------------------- vector bytes


# ----------------------------------------------------------------------------- what a vector may hold


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


# ----------------------------------------------------------------------------- files


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _write_atomic(path: Path, blob: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _zip_directory(src: Path, dest: Path) -> None:
    """Zip the files of ``src`` (flat, sorted, fixed dates: the same files give the same bytes)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as z:
            for p in sorted(src.iterdir()):
                if p.is_file():
                    info = zipfile.ZipInfo(p.name, date_time=ZIP_DATE)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    z.writestr(info, p.read_bytes())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: serializes threads (each opens its own file) and processes."""
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- the store


class RoundStore:
    """The rounds of one pair card, persisted in a state directory (see the module docstring).

    Args:
        state_dir: created if missing.
        card: the pair card; a directory written for another card is refused.
        norm_bound: the norms a submission may have (see :func:`load_norm_bound`); ``None``
            checks only that it is not all zeros.

    Raises:
        ValueError: if ``state_dir`` belongs to another card or is not a round store.
    """

    def __init__(self, state_dir: str | Path, card: PairCard, norm_bound: NormBound | None = None) -> None:
        self.root = Path(state_dir).expanduser().resolve()
        self.norm_bound = norm_bound
        self.card_id = card.card_id
        self.tiny_fingerprint, self.tiny_shape = card.tiny.layout_fingerprint, (card.tiny.n_layers, card.tiny.d_layer)
        self.llm_fingerprint, self.llm_shape = card.llm.layout_fingerprint, (card.llm.n_layers, card.llm.d_layer)
        self.llm_path = card.llm.path
        self.recipe_fingerprint = card.recipe_fingerprint  # None on cards written before recipes
        (self.root / ROUNDS_DIR).mkdir(parents=True, exist_ok=True)
        identity = {"format": STORE_FORMAT, "card_id": self.card_id, "tiny_fingerprint": self.tiny_fingerprint,
                    "llm_fingerprint": self.llm_fingerprint}
        with _flock(self.root / LOCK_FILE):
            path = self.root / STORE_FILE
            if path.is_file():
                try:
                    found = json.loads(path.read_text())
                except json.JSONDecodeError:
                    raise ValueError(f"{path} is not JSON: not a gt-ray round store") from None
                if found != identity:
                    raise ValueError(f"state dir {self.root} belongs to pair card {found.get('card_id')!r}, "
                                     f"not {self.card_id!r}: use another --state-dir")
            else:
                _write_json(path, identity)

    # --- paths and state

    def round_dir(self, round_id: str) -> Path:
        """The directory of a round (the id is checked: it becomes a path)."""
        check_id("round_id", round_id)
        return self.root / ROUNDS_DIR / round_id

    def _read(self, round_id: str) -> RoundState:
        path = self.round_dir(round_id) / ROUND_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UnknownRoundError(f"unknown round {round_id!r}") from None
        state = RoundState.from_dict(json.loads(text))
        if state.card_id != self.card_id:
            raise ValueError(f"round {round_id!r} belongs to pair card {state.card_id!r}, not {self.card_id!r}")
        return state

    def _write(self, state: RoundState) -> None:
        _write_json(self.round_dir(state.round_id) / ROUND_FILE, state.to_dict())

    @contextlib.contextmanager
    def _locked(self, round_id: str) -> Iterator[RoundState]:
        """Hold the round's lock and yield its freshly read state."""
        self._read(round_id)  # an unknown round raises before a lock file is created
        with _flock(self.round_dir(round_id) / LOCK_FILE):
            yield self._read(round_id)

    def get(self, round_id: str) -> RoundState:
        """The round's current state.

        Raises:
            UnknownRoundError: no such round. ValueError: a bad id.
        """
        return self._read(round_id)

    def round_ids(self) -> list[str]:
        """Ids of every round in the store, sorted."""
        return sorted(p.parent.name for p in (self.root / ROUNDS_DIR).glob(f"*/{ROUND_FILE}"))

    # --- operations

    def create_round(self, spec: RoundSpec, round_id: str | None = None) -> tuple[RoundState, bool]:
        """Open a round; opening it again with the same spec is a no-op.

        Args:
            spec: how it aggregates.
            round_id: the id (default a random ``r-...`` one).

        Returns:
            ``(state, created)``; ``created`` is False when the round already existed.

        Raises:
            RoundConflictError: the id exists with another spec. ValueError: a bad id.
        """
        round_id = round_id if round_id is not None else f"r-{secrets.token_hex(6)}"
        directory = self.round_dir(round_id)
        with _flock(self.root / LOCK_FILE):
            if (directory / ROUND_FILE).is_file():
                state = self._read(round_id)
                if state.spec != spec:
                    raise RoundConflictError(f"round {round_id!r} already exists with another spec")
                return state, False
            (directory / SUBMISSIONS_DIR).mkdir(parents=True, exist_ok=True)
            state = RoundState(round_id, self.card_id, spec, _now())
            self._write(state)
        logger.info("opened round %s (rule=%s mode=%s weight_space=%s)", round_id, spec.rule, spec.mode,
                    spec.weight_space)
        return state, True

    def submit(self, round_id: str, org_id: str, blob: bytes, n_examples: int,
               idempotency_key: str | None = None) -> Receipt:
        """Accept an organization's TinyLM vector file into a round (idempotent).

        Args:
            round_id: the round.
            org_id: the (authenticated) organization.
            blob: the update-vector file's bytes.
            n_examples: the organization's example count (``weighted_mean``'s weight).
            idempotency_key: the client's key; ``None`` makes the bytes themselves the key.

        Returns:
            The receipt; ``duplicate=True`` when it was accepted before.

        Raises:
            UnknownRoundError: no such round.
            ValueError: an invalid vector, id or ``n_examples``, metadata naming another
                organization, round or example count, an all-zero vector, or a norm outside
                the store's bound in a round that does not accept outliers.
            OrgNotExpectedError: the round does not list this organization.
            RoundConflictError: the round is closed, the key was used for other bytes, or
                the organization already submitted other bytes.
        """
        spec = self._read(round_id).spec  # unknown round first: 404 before any validation
        check_id("org_id", org_id)
        if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
            raise ValueError(f"n_examples must be an integer >= 1, got {n_examples!r}")
        tensor, meta = parse_update_bytes(blob, self.tiny_fingerprint, self.tiny_shape)
        check_update_content(tensor, None if spec.accept_outliers else self.norm_bound)
        for key, expected in (("org_id", org_id), ("round_id", round_id), ("n_examples", n_examples)):
            if meta.get(key) is not None and meta[key] != expected:
                raise ValueError(f"the vector's metadata says {key}={meta[key]!r}, the request {expected!r}")
        recipe = meta.get("recipe_fingerprint")
        if self.recipe_fingerprint is not None and recipe is not None and recipe != self.recipe_fingerprint:
            raise RoundConflictError(f"the vector was fine-tuned with another recipe (fingerprint {str(recipe)[:12]}) "
                                     f"than the pair card's ({self.recipe_fingerprint[:12]}): its translation would "
                                     "be meaningless; fine-tune with the card's recipe (gt-ray org finetune's defaults)")
        sha = _sha256(blob)
        key_hash = _sha256(idempotency_key.encode()) if idempotency_key is not None else None
        with self._locked(round_id) as state:
            existing = state.submissions.get(org_id)
            if existing is not None and (existing.sha256 == sha or key_hash in existing.key_hashes):
                if existing.sha256 != sha:
                    raise RoundConflictError("this Idempotency-Key was already used for a different vector")
                if key_hash is not None and key_hash not in existing.key_hashes:
                    if state.status != "open":
                        return state.receipt(org_id, duplicate=True)
                    existing.key_hashes.append(key_hash)
                    self._write(state)
                return state.receipt(org_id, duplicate=True)
            if state.status != "open":
                raise RoundConflictError(f"round {round_id!r} is closed")
            if state.spec.expected_orgs is not None and org_id not in state.spec.expected_orgs:
                raise OrgNotExpectedError(f"organization {org_id!r} is not expected in round {round_id!r}")
            if existing is not None:
                raise RoundConflictError(f"organization {org_id!r} already submitted a different vector to round "
                                         f"{round_id!r} (sha256 {existing.sha256[:12]}...)")
            _write_atomic(self.round_dir(round_id) / SUBMISSIONS_DIR / f"{org_id}.safetensors", blob)
            state.submissions[org_id] = Submission(f"rcpt-{secrets.token_hex(10)}", sha, n_examples, _now(),
                                                   [key_hash] if key_hash is not None else [])
            self._write(state)  # the commit point
        logger.info("accepted round=%s org=%s sha256=%s... (%d/%d)", round_id, org_id, sha[:12],
                    len(state.submissions), state.spec.min_submissions)
        return state.receipt(org_id, duplicate=False)

    def load_submission(self, state: RoundState, org_id: str) -> torch.Tensor:
        """An accepted TinyLM vector, re-validated and checked against its receipt's sha256.

        Raises:
            ValueError: the file is missing, changed on disk, or invalid.
        """
        path = self.round_dir(state.round_id) / SUBMISSIONS_DIR / f"{org_id}.safetensors"
        blob = path.read_bytes()
        if _sha256(blob) != state.submissions[org_id].sha256:
            raise ValueError(f"{path} changed on disk since it was accepted (sha256 differs from the receipt)")
        tensor, _ = parse_update_bytes(blob, self.tiny_fingerprint, self.tiny_shape)
        return tensor

    def close(self, round_id: str, translate: Translate, generator: torch.Generator | None = None) -> RoundState:
        """Close a round: aggregate and translate its vectors and write the result (idempotent).

        Args:
            round_id: the round.
            translate: raw TinyLM vectors ``(B, L_tiny, d_tiny)`` -> raw LLM vectors ``(B, L_llm, d_llm)``.
            generator: source of the central DP noise (default: a secret seed).

        Returns:
            The closed state; ``state.result`` describes the result files.

        Raises:
            UnknownRoundError: no such round.
            RoundConflictError: fewer submissions than the spec needs.
            ValueError: a stored vector is invalid or the translation is.
        """
        with self._locked(round_id) as state:
            if state.status == "closed":
                return state
            if not state.ready_to_close:
                raise RoundConflictError(f"round {round_id!r} has {len(state.submissions)} of the "
                                         f"{state.spec.min_submissions} submissions it needs to close")
            orgs = sorted(state.submissions)
            vectors = [self.load_submission(state, org) for org in orgs]
            counts = [state.submissions[org].n_examples for org in orgs]
            out = compute_round_update(state.spec, vectors, counts, translate, self.llm_shape, generator)
            result_dir = self.round_dir(round_id) / RESULT_DIR
            result: dict[str, Any] = {
                "closed_at": _now(), "orgs": orgs, "n_submissions": len(orgs), "weights": out.weights,
                "update_file": None, "update_sha256": None, "update_norm": None, "translated_file": None,
                "dp": None if out.sigma is None else {
                    "epsilon": state.spec.dp_epsilon, "delta": state.spec.dp_delta, "sigma": out.sigma,
                    "clip_norm": state.spec.clip_norm, "unit": UNIT_OF_PRIVACY, "neighbouring": "add_remove"},
                "adapter": None,
            }
            meta = {"model_side": "llm", "card_id": self.card_id, "round_id": round_id, "orgs": orgs,
                    "rule": state.spec.rule, "mode": state.spec.mode}
            if out.translated is not None:
                blob = save_safetensors_bytes({TRANSLATED_TENSOR: out.translated.contiguous()},
                                              metadata={"orgs": json.dumps(orgs), "fingerprint": self.llm_fingerprint,
                                                        "clipped": json.dumps(state.spec.weight_space
                                                                              and state.spec.clip_norm is not None)})
                _write_atomic(result_dir / TRANSLATED_FILE, blob)
                result["translated_file"] = f"{RESULT_DIR}/{TRANSLATED_FILE}"
            if out.update is not None:
                blob = update_to_bytes(out.update, self.llm_fingerprint, meta)
                _write_atomic(result_dir / UPDATE_FILE, blob)
                result.update(update_file=f"{RESULT_DIR}/{UPDATE_FILE}", update_sha256=_sha256(blob),
                              update_norm=float(out.update.norm()))
            state.status, state.result = "closed", result
            self._write(state)
        logger.info("closed round %s over %d organizations", round_id, len(orgs))
        return state

    def load_result(self, state: RoundState) -> torch.Tensor:
        """The closed round's LLM update ``(L_llm, d_llm)``, or the per-organization
        ``(n, L_llm, d_llm)`` vectors of a ``weight_space`` round.

        Raises:
            RoundConflictError: the round is not closed. ValueError: a damaged file.
        """
        if state.status != "closed":
            raise RoundConflictError(f"round {state.round_id!r} is not closed")
        result_dir = self.round_dir(state.round_id) / RESULT_DIR
        if state.spec.weight_space:
            return load_safetensors_bytes((result_dir / TRANSLATED_FILE).read_bytes())[TRANSLATED_TENSOR]
        blob = (result_dir / UPDATE_FILE).read_bytes()
        if _sha256(blob) != state.result["update_sha256"]:
            raise ValueError(f"{result_dir / UPDATE_FILE} changed on disk since the round closed")
        return parse_update_bytes(blob, self.llm_fingerprint, self.llm_shape)[0]

    def export_adapter(self, round_id: str, llm: LoadedModel) -> RoundState:
        """Write a closed round's result as a PEFT adapter directory and its zip (idempotent).

        Args:
            round_id: a closed round.
            llm: the card's LLM with the card's LoRA init (``load_card_side(card, "llm")``);
                its LoRA weights are put back to the init afterwards.

        Returns:
            The state; ``state.result["adapter"]`` names the zip, its sha256, rank and alpha.

        Raises:
            UnknownRoundError, RoundConflictError (not closed), ValueError (another model).
        """
        if llm.layout.fingerprint != self.llm_fingerprint:
            raise ValueError("the LLM's LoRA layout is not the card's: cannot export")
        with self._locked(round_id) as state:
            result_dir = self.round_dir(round_id) / RESULT_DIR
            if state.result is not None and state.result["adapter"] is not None and (result_dir / ADAPTER_ZIP).is_file():
                return state
            result = self.load_result(state)
            tmp = Path(tempfile.mkdtemp(prefix=f".{ADAPTER_DIR}.", dir=result_dir))
            try:
                if state.spec.weight_space:
                    weights = state.result["weights"]
                    info = write_stacked_adapter(tmp, llm, result, weights, self.llm_path)
                    kind = "stacked"
                else:
                    try:
                        export_peft_adapter(llm.model, llm.layout, llm.init, result, tmp, self.llm_path)
                    finally:
                        llm.reset()
                    config = next(iter(llm.model.peft_config.values()))
                    info, kind = {"r": config.r, "lora_alpha": config.lora_alpha}, "update"
                final = result_dir / ADAPTER_DIR
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _zip_directory(final, result_dir / ADAPTER_ZIP)
            state.result["adapter"] = {"kind": kind, **info, "zip": f"{RESULT_DIR}/{ADAPTER_ZIP}",
                                       "sha256": _sha256((result_dir / ADAPTER_ZIP).read_bytes()),
                                       "base_model": self.llm_path}
            self._write(state)
        logger.info("exported round %s as a PEFT adapter (%s, r=%s)", round_id, kind, info["r"])
        return state

    def adapter_zip(self, round_id: str) -> Path:
        """The path of a round's exported adapter zip.

        Raises:
            UnknownRoundError; RoundConflictError when it has not been exported.
        """
        state = self._read(round_id)
        path = self.round_dir(round_id) / RESULT_DIR / ADAPTER_ZIP
        if state.result is None or state.result["adapter"] is None or not path.is_file():
            raise RoundConflictError(f"round {round_id!r} has no adapter yet: close it first")
        return path

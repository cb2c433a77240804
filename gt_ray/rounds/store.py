"""The rounds of one pair card on disk: :class:`RoundStore`, its per-round ``flock`` and the
operations open, submit, close and export (layout, commit point and idempotency in
:mod:`gt_ray.rounds`). Every file goes through :mod:`gt_ray.storage`'s atomic writes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from gt_ray import storage
from gt_ray.privacy import UNIT_OF_PRIVACY
from gt_ray.rounds.spec import (ADAPTER_DIR, ADAPTER_ZIP, LOCK_FILE, RESULT_DIR, ROUND_FILE, ROUNDS_DIR, STORE_FILE,
                                STORE_FORMAT, SUBMISSIONS_DIR, TRANSLATED_FILE, TRANSLATED_TENSOR, UPDATE_FILE,
                                OrgNotExpectedError, Receipt, RoundConflictError, RoundSpec, RoundState, Submission,
                                UnknownRoundError)
from gt_ray.rounds.update import Translate, compute_round_update, write_stacked_adapter, zip_directory
from gt_ray.updates import export_peft_adapter
from gt_ray.wire import (NormBound, check_id, check_update_content, parse_update_bytes, safetensors_bytes,
                          update_to_bytes)

if TYPE_CHECKING:
    from gt_ray.models import LoadedModel, PairCard

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    """The rounds of one pair card, persisted in a state directory (see :mod:`gt_ray.rounds`).

    Args:
        state_dir: created if missing.
        card: the pair card; a directory written for another card is refused.
        norm_bound: the norms a submission may have (see :func:`gt_ray.wire.load_norm_bound`);
            ``None`` checks only that it is not all zeros.

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
                storage.write_json(path, identity, private=True)

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
        storage.write_json(self.round_dir(state.round_id) / ROUND_FILE, state.to_dict(), private=True)

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
        sha = storage.sha256_bytes(blob)
        key_hash = storage.sha256_bytes(idempotency_key.encode()) if idempotency_key is not None else None
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
            storage.write_bytes(self.round_dir(round_id) / SUBMISSIONS_DIR / f"{org_id}.safetensors", blob, private=True)
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
        if storage.sha256_bytes(blob) != state.submissions[org_id].sha256:
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
                blob = safetensors_bytes({TRANSLATED_TENSOR: out.translated.contiguous()},
                                         metadata={"orgs": json.dumps(orgs), "fingerprint": self.llm_fingerprint,
                                                   "clipped": json.dumps(state.spec.weight_space
                                                                         and state.spec.clip_norm is not None)})
                storage.write_bytes(result_dir / TRANSLATED_FILE, blob, private=True)
                result["translated_file"] = f"{RESULT_DIR}/{TRANSLATED_FILE}"
            if out.update is not None:
                blob = update_to_bytes(out.update, self.llm_fingerprint, meta)
                storage.write_bytes(result_dir / UPDATE_FILE, blob, private=True)
                result.update(update_file=f"{RESULT_DIR}/{UPDATE_FILE}", update_sha256=storage.sha256_bytes(blob),
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
        if storage.sha256_bytes(blob) != state.result["update_sha256"]:
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
            zip_directory(final, result_dir / ADAPTER_ZIP)
            state.result["adapter"] = {"kind": kind, **info, "zip": f"{RESULT_DIR}/{ADAPTER_ZIP}",
                                       "sha256": storage.sha256(result_dir / ADAPTER_ZIP),
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

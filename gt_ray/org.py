"""The organization side: a private LoRA fine-tune of the card's TinyLM, its upload, and a
check of the round's adapter on the organization's own test data.

What an organization runs on its own machine. No Ray and no provider code: the private
data never leaves this process, only the update vector file does.

    gt-ray org finetune --card pair_card.json --data private.jsonl --out vector.safetensors \\
        [--model-path DIR] [--steps N --lr X --batch-size B] \\
        [--dp-epsilon E --dp-delta D --max-grad-norm C] \\
        [--vector-epsilon E --vector-delta D --vector-clip C --vector-mechanism gaussian|laplace \\
         --neighbouring replace|add_remove --ledger ledger.json --eps-budget E --delta-budget D] \\
        [--round R --org-id ORG] [--seed S]
    gt-ray org submit --endpoint https://provider.example --token-file token.txt \\
        --round R --org-id ORG [--idempotency-key K] [--max-attempts 5] vector.safetensors
    gt-ray org evaluate --card pair_card.json --adapter r1-adapter.zip --data test.jsonl \
        [--model-path DIR] [--dtype bfloat16] [--batch-size 8] [--device cuda]

``evaluate`` prints two lines, the LLM alone and the LLM with the adapter (exact-match
accuracy and mean answer-token NLL on the test file): how an organization decides whether
to use the round's update. It needs the card (which LLM, which data format) and nothing
else of the provider's.

Data
----
``--data`` is a local ``.jsonl``/``.parquet`` file with ``question``/``answer`` columns
(:func:`gt_ray.tasks.load_examples`; a card built from data files names the columns,
prompt and answer templates and chat-template mode of its corpus in
``recipe["data_format"]``, and the organization's rows are read the same way), or, at the
tiny scale, a generated dataset::

    generated:k=3,mix=caesar:0.5/add:0.5[,split=private_train][,n=256][,seed=0]

``k`` is the dataset's secret task parameter (0..9), ``mix`` its task mixture (``task:weight``
pairs joined by ``/``; a bare task name weighs 1; weights are normalized), ``split`` one of
the private splits (an organization's data is private; ``public`` is refused), ``n`` the
number of examples (default ``FinetuneConfig.n_examples``) and ``seed`` the generator seed.

Privacy
-------
Two mechanisms with two different units of privacy, both optional:

- DP-SGD (``--dp-epsilon``) through opacus protects **one training example**; the spent
  epsilon comes from opacus' accountant and is written into the vector's metadata.
- The vector mechanism (``--vector-epsilon``, :func:`gt_ray.privacy.privatize`) clips the
  final update vector and adds noise; it protects the **organization's whole dataset**.
  Every release is checked against a per-organization budget in a ledger file before any
  noise is drawn, and recorded in it before the file is written.

The vector file goes to the provider as is, so its metadata holds nothing about the data
beyond its size: not the file name, not a generated dataset's spec (its ``k`` and mixture
*are* the private information), not the pre-clipping norm (not private, see
:class:`gt_ray.privacy.PrivacyReport`), and not the seed when any DP is on (the seed drives
the noise; whoever knows it can subtract the noise). ``n_examples`` is released as is and
is not covered by either guarantee.

HTTP API (the provider service implements it)
----------------------------------------------
``POST {endpoint}/v1/rounds/{round_id}/submissions`` with headers
``Authorization: Bearer TOKEN``, ``Idempotency-Key: K``, ``Content-Type: application/json``
and the JSON body (never pickled)::

    {"org_id": str, "n_examples": int, "vector_b64": base64 of the safetensors file's bytes}

- ``200``/``201``: the receipt, JSON
  ``{"receipt_id": str, "round_id": str, "org_id": str, "sha256": str, "received_at": str,
  "duplicate": bool}``; ``sha256`` is the hex sha256 of the decoded vector file bytes and
  ``duplicate`` is true when the key was seen before (the first receipt is returned again;
  no second submission is created). The client checks ``sha256``, ``org_id`` and ``round_id``.
- ``4xx``: JSON ``{"detail": message}`` (``401`` bad token, ``404`` unknown round, ``409``
  the key or the organization's slot in the round is taken by a different vector, ``413``
  too large, ``422`` invalid vector). Not retried.
- ``502``/``503``/``504`` and connection errors: retried with exponential backoff (at most
  ``max_attempts`` tries, a ``Retry-After`` header is honoured up to the backoff cap),
  always with the same ``Idempotency-Key``.

The default idempotency key is ``sha256("gt-ray-submission-v1", org_id, round_id, file
bytes)`` (length-prefixed parts), so running the same command twice never creates a
second submission.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import logging
import math
import random
import re
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence
from urllib.parse import quote

import requests
import torch

from gt_ray import tasks
from gt_ray.config import DPConfig, FinetuneConfig
from gt_ray.privacy import (
    MECHANISM_KINDS,
    NEIGHBOURING_RELATIONS,
    PrivacyReport,
    VectorMechanism,
    privatize,
)
from gt_ray.privacy_ledger import PrivacyLedger
from gt_ray.wire import HEADER_VALUE, check_id, load_update, save_update

if TYPE_CHECKING:
    from gt_ray.models import LoadedModel, PairCard

logger = logging.getLogger(__name__)

GENERATED_PREFIX = "generated:"
"""``--data`` values starting with this describe a generated dataset, not a file."""
RETRY_STATUSES = (502, 503, 504)
RECEIPT_KEYS = ("receipt_id", "round_id", "org_id", "sha256", "received_at", "duplicate")
SUBMISSIONS_PATH = "/v1/rounds/{round_id}/submissions"
IDEMPOTENCY_DOMAIN = b"gt-ray-submission-v1"
PRIVATE_REPORT_FIELDS = ("original_norm", "clipped")
"""PrivacyReport fields computed from the raw vector: kept local, never written."""


class FinetuneError(Exception):
    """The fine-tune ran but gave no usable update vector (it diverged, or the weights did not move)."""


class SubmissionError(Exception):
    """The provider refused a submission, or it could not be delivered.

    Attributes:
        status: the HTTP status of the last answer (``None`` if there was none).
        detail: the server's ``detail`` message, or the last connection error.
        attempts: how many requests were made.
    """

    def __init__(self, message: str, status: int | None = None, detail: str = "", attempts: int = 0):
        super().__init__(message)
        self.status, self.detail, self.attempts = status, detail, attempts


# ----------------------------------------------------------------------------- data


def parse_generated_spec(text: str) -> tasks.DatasetSpec:
    """Parse ``k=3,mix=caesar:0.5/add:0.5,split=private_train,n=256,seed=7`` (prefix optional).

    ``ks=caesar:3/add:7`` gives one secret per task instead (every task of ``mix`` needs one);
    ``k`` then defaults to the secret of the heaviest task.

    Args:
        text: the spec, with or without the ``generated:`` prefix.

    Returns:
        The :class:`gt_ray.tasks.DatasetSpec` (mixture weights normalized to sum 1).

    Raises:
        ValueError: unknown or repeated keys, a missing ``k`` or ``mix``, an unknown task,
            a bad number, or a split that is not private.
    """
    body = text[len(GENERATED_PREFIX):] if text.startswith(GENERATED_PREFIX) else text
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ValueError(f"generated data spec {text!r}: expected key=value, got {part!r}")
        if key not in ("split", "k", "ks", "mix", "n", "seed"):
            raise ValueError(f"generated data spec {text!r}: unknown key {key!r} (known: split, k, ks, mix, n, seed)")
        if key in fields:
            raise ValueError(f"generated data spec {text!r}: {key!r} given twice")
        fields[key] = value.strip()
    missing = [k for k in ("k", "mix") if k not in fields and not (k == "k" and "ks" in fields)]
    if missing:
        raise ValueError(f"generated data spec {text!r}: missing {', '.join(missing)} "
                         "(e.g. generated:k=3,mix=caesar:0.5/add:0.5,n=256,seed=7)")
    split = fields.get("split", tasks.PRIVATE_SPLITS[0])
    if split not in tasks.PRIVATE_SPLITS:
        raise ValueError(f"generated data spec {text!r}: split must be one of the private splits "
                         f"{list(tasks.PRIVATE_SPLITS)}, got {split!r}: an organization's data is private")
    secrets = None
    if "ks" in fields:
        secrets = {}
        for item in fields["ks"].split("/"):
            name, _, value = item.partition(":")
            secrets[name.strip()] = _spec_int(text, f"ks[{name.strip()}]", value)
    given = [(f"ks[{t}]", v) for t, v in (secrets or {}).items()]
    if "k" in fields:
        given.append(("k", _spec_int(text, "k", fields["k"])))
    for name, k in given:
        if not 0 <= k < tasks.N_PARAMS:
            raise ValueError(f"generated data spec {text!r}: {name} must be in 0..{tasks.N_PARAMS - 1}, got {k}")
    n = _spec_int(text, "n", fields.get("n", str(FinetuneConfig.n_examples)))
    if n < 1:
        raise ValueError(f"generated data spec {text!r}: n must be >= 1, got {n}")
    seed = _spec_int(text, "seed", fields.get("seed", "0"))
    mixture: dict[str, float] = {}
    for item in fields["mix"].split("/"):
        name, _, weight = item.partition(":")
        name = name.strip()
        if name not in tasks.TASKS:
            raise ValueError(f"generated data spec {text!r}: unknown task {name!r}; known: {sorted(tasks.TASKS)}")
        if name in mixture:
            raise ValueError(f"generated data spec {text!r}: task {name!r} listed twice in mix")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"generated data spec {text!r}: bad weight {weight!r} for task {name!r}") from None
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"generated data spec {text!r}: weight of {name!r} must be > 0, got {weight!r}")
        mixture[name] = w
    if secrets is not None and set(secrets) != set(mixture):
        raise ValueError(f"generated data spec {text!r}: ks must give one secret for each task of mix")
    total = math.fsum(mixture.values())
    k = _spec_int(text, "k", fields["k"]) if "k" in fields else secrets[max(mixture, key=mixture.get)]
    return tasks.DatasetSpec(split=split, secret_k=k, mixture={t: w / total for t, w in mixture.items()},
                             n=n, seed=seed, secrets=secrets)


def _spec_int(text: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"generated data spec {text!r}: {key} must be an integer, got {value!r}") from None


def load_org_examples(source: str, data_format: dict[str, Any] | None = None) -> tuple[list[tasks.Example], dict[str, Any]]:
    """Load an organization's data from a file or a generated-data spec.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` path, or ``generated:SPEC`` (see the
            module docstring).
        data_format: how file rows become examples (:func:`gt_ray.tasks.data_format`, the
            pair card's ``recipe["data_format"]``, so the organization's prompts match the
            corpus'); ``None``: :func:`gt_ray.tasks.load_examples`' defaults.

    Returns:
        ``(examples, description)``: the description says what kind of data it was and
        nothing about its content (no file name, no generated spec), since it is written
        into the released vector's metadata.

    Raises:
        ValueError: a missing or unparsable file, missing columns, an unknown extension,
            or a bad or non-private generated spec.
    """
    if source.startswith(GENERATED_PREFIX):
        spec = parse_generated_spec(source)
        return tasks.generate_dataset(spec), {"kind": "generated", "split": spec.split}
    path = Path(source).expanduser()
    examples = tasks.load_examples(path, **(data_format or {}))
    return examples, {"kind": "file", "format": path.suffix.lstrip(".")}


def card_data_format(card: PairCard | str | Path) -> dict[str, Any] | None:
    """The card's ``recipe["data_format"]`` (a card built from data files has one), read
    from a card object or, without importing the model stack, from its JSON file."""
    recipe = card.recipe if hasattr(card, "recipe") else _card_recipe(str(card))
    fmt = (recipe or {}).get("data_format")
    return dict(fmt) if isinstance(fmt, dict) else None


# ------------------------------------------------------------------------- fine-tune


def finetune_org(card: PairCard | str | Path, data: str, out: str | Path, *, model_path: str | Path | None = None,
                 cfg: FinetuneConfig | None = None, dp: DPConfig | None = None,
                 vector: VectorMechanism | None = None, ledger: PrivacyLedger | None = None,
                 org_id: str | None = None, round_id: str | None = None, seed: int | None = None,
                 on_progress: Callable[[int, int, float], None] | None = None,
                 allow_recipe_mismatch: bool = False) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the card's TinyLM on private data and write the (privatized) update vector.

    Order of work: load and check the data; with ``vector``, refuse a release the ledger
    would not allow (before any noise, DP-SGD's included, is drawn); load the TinyLM and
    check it against the card; fine-tune from the card's LoRA init (DP-SGD if ``dp`` is
    enabled); with ``vector``, check the budget again, privatize and record the release in
    the ledger; write the vector file (atomically).

    Args:
        card: the pair card, or the path of its JSON file.
        data: a data file path or ``generated:SPEC`` (see :func:`load_org_examples`).
        out: where to write the update vector (safetensors).
        model_path: local directory of the card's TinyLM (default: the card's path).
        cfg: fine-tuning settings; its last snapshot step must be ``cfg.steps`` (snapshots
            are where ``on_progress`` is called). Default: the card's recipe
            (:func:`follow_recipe`), or ``FinetuneConfig(snapshot_steps=[steps])`` for a card
            without one. Settings that differ from the card's recipe are refused.
        dp: DP-SGD settings (unit: one example); ``delta`` must be below ``1 / n_examples``.
        vector: the vector mechanism (unit: the organization); needs ``ledger``, ``org_id``
            and ``round_id``.
        ledger: the organization's privacy ledger (one release per round).
        org_id, round_id: this organization and round (recorded in the metadata).
        seed: seed of batch sampling and of all noise; ``None`` draws a secret one. Under
            any DP it is not written to the metadata.
        on_progress: called as ``on_progress(step, total_steps, mean_loss)`` at snapshots.
        allow_recipe_mismatch: fine-tune with ``cfg`` even where it differs from the card's
            recipe (recorded in the metadata; the provider may refuse such a vector).

    Returns:
        ``(path, metadata)``: the written file and the metadata stored in it.

    Raises:
        ValueError: bad data, a card/model mismatch, bad options, a round already
            released, or :class:`gt_ray.privacy_ledger.BudgetExceededError` (a ``ValueError``)
            when the release would exceed the budget. Nothing is written then.
        FinetuneError: fine-tuning diverged or the LoRA weights did not move (nothing is
            written, nothing is recorded in the ledger).
    """
    t0 = time.time()
    if cfg is not None and cfg.snapshot_steps[-1] != cfg.steps:
        raise ValueError(f"the last snapshot step must be the last step {cfg.steps}, got {cfg.snapshot_steps}")
    for name, value in (("org_id", org_id), ("round_id", round_id)):
        if value is not None:
            check_id(name, value)
    if vector is not None and (ledger is None or org_id is None or round_id is None):
        raise ValueError("the vector mechanism needs a ledger, an org_id and a round_id")
    if Path(out).is_dir():
        raise ValueError(f"{out} is a directory: give the file name of the vector to write")
    use_dp = dp is not None and dp.enabled

    examples, data_desc = load_org_examples(data, card_data_format(card))
    n = len(examples)
    if use_dp and dp.delta >= 1.0 / n:
        raise ValueError(f"DP-SGD delta={dp.delta:g} must be below 1/n_examples={1.0 / n:.3g} "
                         "(a larger delta allows leaking an example outright)")
    if vector is not None:
        _precheck_release(ledger, org_id, round_id, vector)

    # Imported only now: peft takes seconds to import, and ``gt-ray org submit`` and the
    # checks above (which catch most user mistakes) should not wait for it.
    from gt_ray.finetune import FinetuneFailedError, FinetuneResult, iter_finetune
    from gt_ray.models import PairCard, recipe_fingerprint

    if not isinstance(card, PairCard):
        card = PairCard.load(card)
    cfg, mismatch = follow_recipe(card, cfg, allow_recipe_mismatch)
    cfg = dataclasses.replace(cfg, n_examples=n)
    lm = load_org_model(card, model_path)
    private = use_dp or vector is not None
    if seed is None:
        seed = secrets.randbits(63)
    result = FinetuneResult([], [])
    logger.info("fine-tuning the TinyLM on %d examples for %d steps (DP-SGD %s)", n, cfg.steps,
                "on" if use_dp else "off")
    try:
        for snap in iter_finetune(lm, examples, cfg, seed, dp, result):
            if on_progress is not None:
                on_progress(snap.step, cfg.steps, snap.loss)
    except FinetuneFailedError as e:
        raise FinetuneError(f"{e} (try a larger --lr or more --steps; nothing was written)") from None
    update = result.final.update  # (n_layers, d_layer)

    report = None
    if vector is not None:
        ledger.check(org_id, vector.epsilon, vector.delta)  # before the noise is drawn
        gen = torch.Generator().manual_seed(derive_seed(seed, "vector-noise"))
        update, report = privatize(update, vector, gen)
        logger.info("vector mechanism: pre-clip norm %.4g, clip %.4g (the pre-clip norm stays local)",
                    report.original_norm, vector.clip_norm)
        ledger.record_report(org_id, round_id, report)  # recorded before anything is written

    metadata = {
        "model_side": "tiny",
        "card_id": card.card_id,
        "fingerprint": card.tiny.layout_fingerprint,
        "org_id": org_id,
        "round_id": round_id,
        "n_examples": n,
        "data": data_desc,
        "steps": cfg.steps,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "recipe_fingerprint": recipe_fingerprint({**dataclasses.asdict(cfg), "dtype": _card_dtype(card)}),
        "recipe_mismatch": mismatch,
        "seed": None if private else seed,
        "seed_withheld": private,
        "dp_sgd": ({**result.dp_dict(), "max_grad_norm": dp.max_grad_norm, "target_epsilon": dp.target_epsilon}
                   if use_dp else result.dp_dict()),
        "vector_mechanism": None if report is None else public_report(report),
    }
    path = save_update(out, update, card.tiny.layout_fingerprint, metadata)
    logger.info("wrote %s in %.1f s", path, time.time() - t0)
    return path, metadata


def follow_recipe(card: PairCard, cfg: FinetuneConfig | None,
                  allow_mismatch: bool = False) -> tuple[FinetuneConfig, bool]:
    """The fine-tune settings for ``card``: its recipe when ``cfg`` is ``None``; a given
    ``cfg`` is checked against the recipe's steps, lr, batch size and weight decay.

    Returns:
        ``(settings, differs)``; ``differs`` is True only when allowed.

    Raises:
        ValueError: ``cfg`` differs from the card's recipe and ``allow_mismatch`` is False.
    """
    recipe = card.recipe
    if cfg is None:
        if recipe is None:
            return FinetuneConfig(snapshot_steps=[FinetuneConfig.steps]), False
        return FinetuneConfig(steps=recipe["steps"], lr=recipe["lr"], batch_size=recipe["batch_size"],
                              weight_decay=recipe["weight_decay"], snapshot_steps=[recipe["steps"]]), False
    if recipe is None:
        return cfg, False
    diffs = [f"{k} {_fmt(getattr(cfg, k))} (card: {_fmt(recipe[k])})"
             for k in ("steps", "lr", "batch_size", "weight_decay") if getattr(cfg, k) != recipe[k]]
    if diffs and not allow_mismatch:
        raise ValueError(f"fine-tune recipe differs from pair card {card.card_id}'s: {'; '.join(diffs)}; "
                         "pass --allow-recipe-mismatch to use it anyway (the provider may refuse the vector)")
    return cfg, bool(diffs)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _card_dtype(card: PairCard) -> str:
    return card.recipe["dtype"] if card.recipe is not None else "float32"


def load_org_model(card: PairCard, model_path: str | Path | None = None) -> LoadedModel:
    """Load the card's TinyLM with the card's LoRA init, in the card recipe's dtype,
    refusing one that differs.

    Args:
        card: the pair card.
        model_path: local model directory (default: the path in the card).

    Returns:
        The :class:`gt_ray.models.LoadedModel`.

    Raises:
        ValueError: no model directory there, or its weights, LoRA layout or init differ
            from the card's.
    """
    from gt_ray.models import load_card_side

    path = Path(model_path if model_path is not None else card.tiny.path).expanduser()
    if not (path / "config.json").is_file():
        hint = "" if model_path is not None else " (the path in the card; pass --model-path for a local copy)"
        raise ValueError(f"no Hugging Face model directory at {path}{hint}")
    try:
        return load_card_side(card, "tiny", dtype=_card_dtype(card), path=path)
    except ValueError as e:
        raise ValueError(f"refusing the TinyLM at {path}: it does not match pair card {card.card_id} ({e})") from None


def _precheck_release(ledger: PrivacyLedger, org_id: str, round_id: str, vector: VectorMechanism) -> None:
    if any(e.round_id == round_id for e in ledger.entries(org_id)):
        raise ValueError(f"organization {org_id!r} already released a vector for round {round_id!r} "
                         f"(ledger {ledger.path}); one release per round")
    ledger.check(org_id, vector.epsilon, vector.delta)


def open_ledger(path: str | Path, eps_budget: float, delta_budget: float) -> PrivacyLedger:
    """Open (or start) a privacy ledger file, with a clean error for a damaged one.

    Raises:
        ValueError: bad budgets, or the file is not a ledger.
    """
    try:
        return PrivacyLedger(path, eps_budget, delta_budget)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid privacy ledger ({e})") from None


def public_report(report: PrivacyReport) -> dict[str, Any]:
    """A :class:`gt_ray.privacy.PrivacyReport` as a dict without its non-private fields."""
    return {k: v for k, v in report.to_dict().items() if k not in PRIVATE_REPORT_FIELDS}


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose, derived from the run's seed (independent streams)."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{purpose}".encode()).digest()[:8], "big") >> 1


def progress_steps(steps: int, n: int = 10) -> list[int]:
    """About ``n`` evenly spaced snapshot steps ending at ``steps`` (for a progress bar)."""
    return sorted({max(1, round(steps * i / n)) for i in range(1, n + 1)})


# -------------------------------------------------------------------------- evaluate

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What a PEFT adapter directory (and the service's adapter zip) holds."""


def unpack_adapter(adapter: str | Path, into: str | Path) -> Path:
    """The directory of a PEFT adapter given as a directory or as the service's zip
    (extracted into ``into``; only its flat, known file names are read).

    Raises:
        ValueError: missing, not a directory or zip, or without the adapter's files.
    """
    src = Path(adapter).expanduser()
    if src.is_dir():
        directory = src
    elif src.is_file():
        import zipfile

        directory = Path(into)
        try:
            with zipfile.ZipFile(src) as z:
                for name in ADAPTER_FILES:
                    if name in z.namelist():
                        (directory / name).write_bytes(z.read(name))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise ValueError(f"adapter {src}: not a readable zip file ({e}); give the zip from "
                             "/v1/rounds/R/adapter or its unpacked directory") from None
    else:
        raise ValueError(f"adapter not found: {src}")
    missing = [n for n in ADAPTER_FILES if not (directory / n).is_file()]
    if missing:
        raise ValueError(f"adapter {src}: not a PEFT adapter ({', '.join(missing)} missing)")
    return directory


def _adapter_tensors(directory: Path, src: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(directory / ADAPTER_FILES[1]))
    except Exception as e:  # safetensors raises its own error types for a bad file
        raise ValueError(f"adapter {src}: {ADAPTER_FILES[1]} is not a readable safetensors file ({e})") from None
    bad = [k for k, t in tensors.items() if not torch.isfinite(t.float()).all()]
    if bad:
        raise ValueError(f"adapter {src}: non-finite values in {bad[:3]}")
    return tensors


def evaluate_adapter(card: PairCard | str | Path, adapter: str | Path, data: str, *, model_path: str | Path | None = None,
                     dtype: str = "float32", batch_size: int = 8, device: str | None = None) -> dict[str, Any]:
    """Score the card's LLM with a round's adapter against the LLM alone on the
    organization's own test data (exact match and answer NLL, teacher-forced: see
    :func:`gt_ray.tasks.answer_token_stats`).

    Only the card is needed from the provider: it names the LLM (its weights' sha256, so a
    local copy at ``model_path`` is checked) and the data format of its corpus (the test
    file's rows become prompts as the corpus' did).

    Args:
        card: the pair card, or the path of its JSON file.
        adapter: the round's adapter, a directory or the service's zip.
        data: a test ``.jsonl``/``.parquet`` file, or ``generated:SPEC``.
        model_path: local directory of the card's LLM (default: the card's path).
        dtype: weights dtype (float32, bfloat16, float16).
        batch_size: examples per forward pass.
        device: torch device (default: CUDA when available, else the CPU).

    Returns:
        ``{"llm": Scores, "llm+adapter": Scores, "n_examples": int, "card_id": str}``.

    Raises:
        ValueError: bad or empty data, a missing model, weights that are not the card's
            LLM, a missing or corrupt adapter, or an adapter that does not fit the LLM.
    """
    import tempfile

    from gt_ray.models import DTYPES, PairCard, load_model, weights_sha256

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    examples, _ = load_org_examples(data, card_data_format(card))  # cheap checks first
    if not isinstance(card, PairCard):
        card = PairCard.load(card)
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    with tempfile.TemporaryDirectory(prefix="gt-ray-adapter-") as tmp:  # the adapter first: cheap to check
        directory = unpack_adapter(adapter, tmp)
        tensors = _adapter_tensors(directory, adapter)
        try:
            config = json.loads((directory / ADAPTER_FILES[0]).read_text())
            lora = LoraConfig.from_pretrained(str(directory))
        except Exception as e:  # json and peft raise several types for a foreign config
            raise ValueError(f"adapter {adapter}: {ADAPTER_FILES[0]} is not a LoRA adapter config ({e})") from None
    path = Path(model_path if model_path is not None else card.llm.path).expanduser()
    if not (path / "config.json").is_file():
        hint = "" if model_path is not None else " (the path in the card; pass --model-path for a local copy)"
        raise ValueError(f"no Hugging Face model directory at {path}{hint}")
    if weights_sha256(path) != card.llm.weights_sha256:
        raise ValueError(f"the model at {path} is not pair card {card.card_id}'s LLM (weights sha256 differs)")
    model, tokenizer = load_model(path, dtype)
    lora.base_model_name_or_path = str(path)  # the organization's copy of the card's LLM (checked above)
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        raise ValueError(f"adapter {adapter} does not fit pair card {card.card_id}'s LLM ({e})") from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise ValueError(f"adapter {adapter} does not fit pair card {card.card_id}'s LLM: "
                         f"{len(diff)} LoRA tensor(s) differ in name or shape, e.g. {diff[0]} "
                         f"(adapter r={config.get('r')}, target_modules={config.get('target_modules')})")
    set_peft_model_state_dict(peft_model, tensors)
    from gt_ray.evaluate import score

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peft_model.to(dev).eval()

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return peft_model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()

    with peft_model.disable_adapter():
        base = score(logits, tokenizer, examples, batch_size)
    adapted = score(logits, tokenizer, examples, batch_size)
    return {"llm": base, "llm+adapter": adapted, "n_examples": len(examples), "card_id": card.card_id}


# ---------------------------------------------------------------------------- submit


def default_idempotency_key(org_id: str, round_id: str, vector_bytes: bytes) -> str:
    """The default idempotency key: sha256 over (domain, org_id, round_id, file bytes)."""
    h = hashlib.sha256()
    for part in (IDEMPOTENCY_DOMAIN, org_id.encode(), round_id.encode(), vector_bytes):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def submit_vector(endpoint: str, token: str, round_id: str, org_id: str, vector: str | Path, *,
                  idempotency_key: str | None = None, max_attempts: int = 5, backoff_s: float = 0.5,
                  max_backoff_s: float = 8.0, timeout_s: float = 30.0,
                  session: requests.Session | None = None) -> dict[str, Any]:
    """Send an update vector file to the provider (see the module docstring for the API).

    The file is validated locally first and never sent if invalid. Connection errors and
    502/503/504 answers are retried with exponential backoff and jitter, every attempt
    with the same ``Idempotency-Key``; other answers are not retried.

    Args:
        endpoint: the provider's base URL (``http://`` or ``https://``).
        token: the bearer token (never logged).
        round_id, org_id: the round and this organization.
        vector: the update vector file written by :func:`finetune_org`.
        idempotency_key: the key (default: :func:`default_idempotency_key` of the file).
        max_attempts: requests at most, ``>= 1``.
        backoff_s: delay after the first failure; doubles after each, capped at ``max_backoff_s``.
        timeout_s: per-request read timeout.
        session: a ``requests.Session`` to use (default: a new one).

    Returns:
        The receipt dict (``receipt_id``, ``round_id``, ``org_id``, ``sha256``,
        ``received_at``, ``duplicate``).

    Raises:
        ValueError: an invalid vector file, bad ids, token, key or endpoint; or metadata that
            names another organization or round.
        SubmissionError: the server refused (4xx, 500), the receipt does not match what
            was sent, or all attempts failed.
    """
    check_id("org_id", org_id)
    check_id("round_id", round_id)
    if not HEADER_VALUE.fullmatch(token or ""):
        raise ValueError("the token must be non-empty printable ASCII without whitespace")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"endpoint must start with http:// or https://, got {endpoint!r}")
    path = Path(vector)
    _, meta = load_update(path)  # refuses a missing, foreign or non-finite vector file
    n_examples = meta.get("n_examples")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"{path}: metadata has no valid n_examples ({n_examples!r}); "
                         "write the vector with `gt-ray org finetune`")
    for key, expected in (("org_id", org_id), ("round_id", round_id)):
        if meta.get(key) is not None and meta[key] != expected:
            raise ValueError(f"{path} was made for {key}={meta[key]!r}, not {expected!r}")
    blob = path.read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    key = idempotency_key or default_idempotency_key(org_id, round_id, blob)
    if not HEADER_VALUE.fullmatch(key) or len(key) > 255:
        raise ValueError("the idempotency key must be 1-255 printable ASCII characters without whitespace")
    if endpoint.startswith("http://") and not re.match(r"http://(127\.0\.0\.1|localhost|\[::1\])[:/]?", endpoint):
        logger.warning("sending the token over plain http to %s: use https outside a test setup", endpoint)

    url = endpoint.rstrip("/") + SUBMISSIONS_PATH.format(round_id=quote(round_id, safe=""))
    body = json.dumps({"org_id": org_id, "n_examples": n_examples,
                       "vector_b64": base64.b64encode(blob).decode("ascii")}).encode()
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key,
               "Content-Type": "application/json", "Accept": "application/json"}
    jitter = random.Random(secrets.randbits(64))
    own_session = session is None
    session = session or requests.Session()
    last = ""
    try:
        for attempt in range(1, max_attempts + 1):
            retry_after = None
            try:
                resp = session.post(url, data=body, headers=headers, timeout=(min(10.0, timeout_s), timeout_s),
                                    allow_redirects=False)
            except requests.exceptions.SSLError as e:
                raise SubmissionError(f"TLS error talking to {endpoint}: {e}", detail=str(e), attempts=attempt) from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code in (200, 201):
                    return _check_receipt(resp, sha, org_id, round_id, attempt)
                detail = _detail(resp)
                if resp.status_code not in RETRY_STATUSES:
                    raise SubmissionError(f"the provider refused the submission: HTTP {resp.status_code}: {detail}",
                                          status=resp.status_code, detail=detail, attempts=attempt)
                last = f"HTTP {resp.status_code}: {detail}"
                retry_after = _retry_after(resp)
            if attempt == max_attempts:
                break
            delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1)) * jitter.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, min(retry_after, max_backoff_s))
            logger.warning("submission attempt %d/%d failed (%s); retrying in %.2f s with the same idempotency key",
                           attempt, max_attempts, last, delay)
            time.sleep(delay)
    finally:
        if own_session:
            session.close()
    raise SubmissionError(f"could not submit after {max_attempts} attempts (last: {last}); re-running the same "
                          "command is safe: it sends the same idempotency key", detail=last, attempts=max_attempts)


def _detail(resp: requests.Response) -> str:
    try:
        detail = resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        detail = resp.text
    detail = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True)
    detail = " ".join(detail.split())
    return detail[:500] or resp.reason or "no detail"


def _retry_after(resp: requests.Response) -> float | None:
    try:
        value = float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _check_receipt(resp: requests.Response, sha: str, org_id: str, round_id: str, attempt: int) -> dict[str, Any]:
    try:
        receipt = resp.json()
    except ValueError:
        receipt = None
    if not isinstance(receipt, dict):
        raise SubmissionError(f"HTTP {resp.status_code} without a JSON receipt", status=resp.status_code,
                              attempts=attempt)
    missing = [k for k in RECEIPT_KEYS if k not in receipt]
    if missing:
        raise SubmissionError(f"the receipt lacks {missing}", status=resp.status_code, attempts=attempt)
    if receipt["sha256"] != sha or receipt["org_id"] != org_id or str(receipt["round_id"]) != round_id:
        raise SubmissionError(
            f"the receipt does not match what was sent (sha256 {str(receipt['sha256'])[:12]}... vs {sha[:12]}..., "
            f"org {receipt['org_id']!r}, round {receipt['round_id']!r})", status=resp.status_code, attempts=attempt)
    logger.info("submitted on attempt %d: receipt %s%s", attempt, receipt["receipt_id"],
                " (the provider already had it)" if receipt["duplicate"] else "")
    return receipt


# ------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become one ``error:`` line (exit 2) in main."""

    def error(self, message: str):
        raise ValueError(f"{self.prog}: {message} (see --help)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``gt-ray org`` argument parser (``finetune``, ``evaluate`` and ``submit``)."""
    parser = _Parser(prog="gt-ray org", description="An organization's private fine-tune and its upload.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{finetune,evaluate,submit}")

    f = sub.add_parser("finetune", help="fine-tune the card's TinyLM on private data, write the update vector",
                       description="Fine-tune the card's TinyLM on private data and write the update vector.")
    f.add_argument("--card", required=True, metavar="CARD.json", help="the provider's pair card JSON")
    f.add_argument("--data", required=True, metavar="FILE|generated:SPEC", help="private .jsonl/.parquet file, or generated:k=3,mix=caesar:0.5/add:0.5,n=256,seed=7")
    f.add_argument("--out", required=True, metavar="VECTOR.safetensors", help="update vector file to write (.safetensors)")
    f.add_argument("--model-path", metavar="DIR", help="local directory of the card's TinyLM (default: the card's path)")
    f.add_argument("--round", dest="round_id", metavar="R", help="round id (in the metadata; required with --vector-epsilon)")
    f.add_argument("--org-id", metavar="ORG", help="organization id (in the metadata; required with --vector-epsilon)")
    g = f.add_argument_group("fine-tuning (defaults: the card's recipe, else gt_ray.config.FinetuneConfig)")
    g.add_argument("--steps", type=_positive_int, metavar="N")
    g.add_argument("--lr", type=_positive_float, metavar="X")
    g.add_argument("--batch-size", type=_positive_int, metavar="B")
    g.add_argument("--allow-recipe-mismatch", action="store_true",
                   help="use --steps/--lr/--batch-size even where they differ from the card's recipe")
    g.add_argument("--seed", type=int, metavar="S", help="seed of sampling and noise (default: a secret random one; "
                   "under DP it is not written to the vector, keep it private)")
    g = f.add_argument_group("DP-SGD, unit of privacy: one example (defaults: gt_ray.config.DPConfig)")
    g.add_argument("--dp-epsilon", type=_positive_float, metavar="E", help="train with DP-SGD to this epsilon")
    g.add_argument("--dp-delta", type=_positive_float, metavar="D")
    g.add_argument("--max-grad-norm", type=_positive_float, metavar="C", help="per-example clipping norm")
    g = f.add_argument_group("vector mechanism and its budget ledger, unit of privacy: the organization "
                          "(defaults: gt_ray.privacy.VectorMechanism)")
    g.add_argument("--vector-epsilon", type=_positive_float, metavar="E", help="privatize the final update with this epsilon")
    g.add_argument("--vector-delta", type=_nonneg_float, metavar="D", help="delta of the release (0 for laplace)")
    g.add_argument("--vector-clip", type=_positive_float, metavar="C", help="norm bound (L2 for gaussian, L1 for laplace)")
    g.add_argument("--vector-mechanism", choices=MECHANISM_KINDS)
    g.add_argument("--neighbouring", choices=NEIGHBOURING_RELATIONS)
    g.add_argument("--ledger", metavar="LEDGER.json", help="privacy ledger JSON (created if missing); required with --vector-epsilon")
    g.add_argument("--eps-budget", type=_positive_float, metavar="E", help="total epsilon the organization may spend")
    g.add_argument("--delta-budget", type=_nonneg_float, metavar="D", help="total delta (required for gaussian)")
    f.set_defaults(func=_cmd_finetune)

    e = sub.add_parser("evaluate", help="score the LLM with a round's adapter against the LLM alone on your test data",
                       description="Score the card's LLM with a round's adapter against the LLM alone on the "
                                   "organization's own test data: exact-match accuracy and answer NLL, one line each.")
    e.add_argument("--card", required=True, metavar="CARD.json", help="the provider's pair card JSON")
    e.add_argument("--adapter", required=True, metavar="DIR|ZIP", help="the round's adapter: the zip from "
                   "/v1/rounds/R/adapter or its unpacked directory")
    e.add_argument("--data", required=True, metavar="FILE|generated:SPEC", help="private test .jsonl/.parquet file")
    e.add_argument("--model-path", metavar="DIR", help="local directory of the card's LLM (default: the card's path)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights dtype (default float32)")
    e.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="examples per forward pass (default 8)")
    e.add_argument("--device", metavar="DEV", help="torch device (default: cuda when available, else cpu)")
    e.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("submit", help="send an update vector to the provider, with retries",
                       description="Send an update vector to the provider (idempotent, retried).")
    s.add_argument("vector", help="update vector file written by `gt-ray org finetune`")
    s.add_argument("--endpoint", required=True, metavar="URL", help="provider base URL, e.g. https://provider.example")
    t = s.add_mutually_exclusive_group(required=True)
    t.add_argument("--token", metavar="TOKEN", help="bearer token (visible in the process list: prefer --token-file)")
    t.add_argument("--token-file", metavar="F", help="file holding the bearer token")
    s.add_argument("--round", dest="round_id", required=True, metavar="R")
    s.add_argument("--org-id", required=True, metavar="ORG")
    s.add_argument("--idempotency-key", metavar="K", help="default: sha256 of (org id, round, vector file bytes)")
    s.add_argument("--max-attempts", type=_positive_int, default=5, metavar="N", help="requests at most (default 5)")
    s.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS", help="seconds per request (default 30)")
    s.set_defaults(func=_cmd_submit)
    return parser


def _cmd_finetune(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    dp = _dp_config(args)
    vector = _vector_mechanism(args)
    ledger = None
    if vector is not None:
        missing = [flag for flag, v in (("--ledger", args.ledger), ("--eps-budget", args.eps_budget),
                                        ("--round", args.round_id), ("--org-id", args.org_id)) if v is None]
        if args.delta_budget is None and vector.kind == "gaussian":
            missing.append("--delta-budget")
        if missing:
            raise ValueError(f"--vector-epsilon needs {', '.join(missing)}")
        delta_budget = args.delta_budget if args.delta_budget is not None else 0.0
        ledger = open_ledger(args.ledger, args.eps_budget, delta_budget)
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size))
                 if v is not None}
    recipe = _card_recipe(args.card) or {}
    settings = {**{k: recipe[k] for k in ("steps", "lr", "batch_size", "weight_decay") if k in recipe}, **overrides}
    cfg = FinetuneConfig(**settings, snapshot_steps=progress_steps(settings.get("steps", FinetuneConfig.steps)))
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    if args.seed is not None and (dp is not None or vector is not None):
        logger.warning("--seed fixes the DP noise: whoever learns the seed can remove it; keep it private")

    t0 = time.time()
    bar = tqdm(total=cfg.steps, desc="fine-tune", unit="step", disable=None)

    def on_progress(step: int, total: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        path, meta = finetune_org(args.card, args.data, args.out, model_path=args.model_path, cfg=cfg, dp=dp,
                                  vector=vector, ledger=ledger, org_id=args.org_id, round_id=args.round_id,
                                  seed=seed, on_progress=on_progress,
                                  allow_recipe_mismatch=args.allow_recipe_mismatch)
    finally:
        bar.close()
    update, _ = load_update(path, expected_fingerprint=meta["fingerprint"])  # read back what was written
    lines: list[tuple[str, Any]] = [
        ("path", path), ("card_id", meta["card_id"]), ("fingerprint", meta["fingerprint"]),
        ("org_id", meta["org_id"]), ("round", meta["round_id"]), ("n_examples", meta["n_examples"]),
        ("steps", meta["steps"]), ("update_norm", float(update.norm())), ("seed", seed),
        ("recipe_fingerprint", meta["recipe_fingerprint"]), ("recipe_mismatch", meta["recipe_mismatch"]),
    ]
    sgd = meta["dp_sgd"]
    lines += ([("dp_sgd_epsilon", sgd["epsilon"]), ("dp_sgd_delta", sgd["delta"]),
               ("dp_sgd_noise_multiplier", sgd["noise_multiplier"]), ("dp_sgd_unit", sgd["privacy_unit"])]
              if sgd["dp"] else [("dp_sgd", "off")])
    rep = meta["vector_mechanism"]
    if rep is None:
        lines.append(("vector_mechanism", "off"))
    else:
        spent = ledger.spent(args.org_id)
        lines += [("vector_mechanism", rep["mechanism"]), ("vector_epsilon", rep["epsilon"]),
                  ("vector_delta", rep["delta"]), ("vector_noise_scale", rep["sigma"] or rep["laplace_scale"]),
                  ("vector_clip", rep["clip_norm"]), ("vector_unit", rep["unit"]), ("ledger", ledger.path),
                  ("ledger_spent_epsilon", spent.epsilon), ("ledger_spent_delta", spent.delta),
                  ("ledger_releases", spent.n_releases), ("ledger_eps_budget", ledger.eps_budget),
                  ("ledger_delta_budget", ledger.delta_budget)]
        if spent.gaussian_rdp_epsilon is not None:
            lines.append(("ledger_gaussian_rdp_epsilon", spent.gaussian_rdp_epsilon))
    lines.append(("seconds", round(time.time() - t0, 1)))
    for key, value in lines:
        if value is None:
            continue
        print(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    t0 = time.time()
    out = evaluate_adapter(args.card, args.adapter, args.data, model_path=args.model_path, dtype=args.dtype,
                           batch_size=args.batch_size, device=args.device)
    for name in ("llm", "llm+adapter"):
        s = out[name]
        print(f"model={name} accuracy={s.accuracy:.4f} answer_nll={s.nll:.4f} n_examples={s.n}")
    logger.info("card %s, %.1f s", out["card_id"], time.time() - t0)


def _card_recipe(card_path: str) -> dict[str, Any] | None:
    """The recipe in a card JSON, read without importing the model stack (finetune_org
    checks the whole card); None if absent or unreadable (finetune_org reports that)."""
    try:
        recipe = json.loads(Path(card_path).read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None
    return recipe if isinstance(recipe, dict) else None


def _dp_config(args: argparse.Namespace) -> DPConfig | None:
    if args.dp_epsilon is None:
        stray = [flag for flag, v in (("--dp-delta", args.dp_delta), ("--max-grad-norm", args.max_grad_norm))
                 if v is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} given without --dp-epsilon")
        return None
    extra = {k: v for k, v in (("delta", args.dp_delta), ("max_grad_norm", args.max_grad_norm)) if v is not None}
    return DPConfig(enabled=True, target_epsilon=args.dp_epsilon, **extra)


def _vector_mechanism(args: argparse.Namespace) -> VectorMechanism | None:
    flags = (("--vector-delta", args.vector_delta), ("--vector-clip", args.vector_clip),
             ("--vector-mechanism", args.vector_mechanism), ("--neighbouring", args.neighbouring),
             ("--ledger", args.ledger), ("--eps-budget", args.eps_budget), ("--delta-budget", args.delta_budget))
    if args.vector_epsilon is None:
        stray = [flag for flag, v in flags if v is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} given without --vector-epsilon")
        return None
    kind = args.vector_mechanism or VectorMechanism.kind
    kwargs: dict[str, Any] = {"kind": kind, "epsilon": args.vector_epsilon}
    if args.vector_delta is not None:
        kwargs["delta"] = args.vector_delta
    elif kind == "laplace":
        kwargs["delta"] = 0.0  # pure epsilon-DP; VectorMechanism's default delta is the gaussian one
    if args.vector_clip is not None:
        kwargs["clip_norm"] = args.vector_clip
    if args.neighbouring is not None:
        kwargs["neighbouring"] = args.neighbouring
    return VectorMechanism(**kwargs)


def _cmd_submit(args: argparse.Namespace) -> None:
    if args.token_file is not None:
        token_path = Path(args.token_file).expanduser()
        if not token_path.is_file():
            raise ValueError(f"token file not found: {token_path}")
        token = token_path.read_text().strip()
    else:
        token = args.token
    receipt = submit_vector(args.endpoint, token, args.round_id, args.org_id, args.vector,
                            idempotency_key=args.idempotency_key, max_attempts=args.max_attempts,
                            timeout_s=args.timeout)
    print(json.dumps(receipt, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> None:
    """``gt-ray org finetune|submit``: user mistakes print one ``error:`` line and exit 2.

    Raises:
        SystemExit: 2 on a ``ValueError``, ``OSError``, :class:`FinetuneError` or
            :class:`SubmissionError`.
    """
    if not logging.getLogger().handlers:  # run directly, not through jobs.cli (which sets it up)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        args.func(args)
    except (ValueError, OSError, FinetuneError, SubmissionError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

"""An organization's private LoRA fine-tune of the card's TinyLM, and the update vector
file it releases.

What an organization runs on its own machine. No Ray and no provider code: the private
data never leaves this process, only the update vector file does.

Privacy
-------
Two mechanisms with two different units of privacy, both optional:

- DP-SGD (``dp``, :class:`gt_ray.config.DPConfig`) through opacus protects **one training
  example**; the spent epsilon comes from opacus' accountant and is written into the
  vector's metadata.
- The vector mechanism (``vector``, :func:`gt_ray.privacy.privatize`) clips the final
  update vector and adds noise; it protects the **organization's whole dataset**. Every
  release is checked against a per-organization budget in a ledger file
  (:class:`gt_ray.privacy_ledger.PrivacyLedger`) before any noise is drawn, and recorded
  in it before the file is written.

The vector file goes to the provider as is, so its metadata holds nothing about the data
beyond its size: not the file name, not a generated dataset's spec (its ``k`` and mixture
*are* the private information), not the pre-clipping norm (not private, see
:class:`gt_ray.privacy.PrivacyReport`), and not the seed when any DP is on (the seed drives
the noise; whoever knows it can subtract the noise). ``n_examples`` is released as is and
is not covered by either guarantee.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from gt_ray import tasks
from gt_ray.config import DPConfig, FinetuneConfig
from gt_ray.org.data import card_data_format, load_org_examples
from gt_ray.privacy import PrivacyReport, VectorMechanism, privatize
from gt_ray.privacy_ledger import PrivacyLedger
from gt_ray.storage import sha256_bytes
from gt_ray.wire import check_id, save_update

if TYPE_CHECKING:
    from gt_ray.models import LoadedModel, PairCard

logger = logging.getLogger(__name__)

PRIVATE_REPORT_FIELDS = ("original_norm", "clipped")
"""PrivacyReport fields computed from the raw vector: kept local, never written."""


class FinetuneError(Exception):
    """The fine-tune ran but gave no usable update vector (it diverged, or the weights did not move)."""


def finetune_org(card: PairCard | str | Path, data: str | Path | tasks.DatasetSpec, out: str | Path, *,
                 model_path: str | Path | None = None, cfg: FinetuneConfig | None = None, dp: DPConfig | None = None,
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
        data: a data file path, a generated dataset's :class:`gt_ray.tasks.DatasetSpec`, or
            ``generated:SPEC`` (see :func:`gt_ray.org.data.load_org_examples`).
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
    return int(sha256_bytes(f"{seed}|{purpose}".encode())[:16], 16) >> 1  # the digest's first 8 bytes


def progress_steps(steps: int, n: int = 10) -> list[int]:
    """About ``n`` evenly spaced snapshot steps ending at ``steps`` (for a progress bar)."""
    return sorted({max(1, round(steps * i / n)) for i in range(1, n + 1)})

"""LoRA fine-tuning from the card's init, yielding update-vector snapshots; optional DP-SGD.

Every fine-tune starts from the card's LoRA init, and that is checked, not assumed. The
update vector at a snapshot is (LoRA parameters after that step) - (card init).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from gt_ray.config import DPConfig, FinetuneConfig
from gt_ray.models import LoadedModel, lm_loss
from gt_ray.tasks import Batch, Example, encode_examples
from gt_ray.updates import read_lora

logger = logging.getLogger(__name__)

PRIVACY_UNIT = "example"
"""DP-SGD's unit of privacy: one training example (add/remove one example from the data)."""


class FinetuneFailedError(RuntimeError):
    """The fine-tune ran but its update is unusable: not finite, or the LoRA weights did not move."""


@dataclass
class Snapshot:
    """The update vector after ``step`` optimizer steps."""

    step: int
    update: torch.Tensor  # (n_layers, d_layer) float32
    loss: float  # mean training loss over the steps since the previous snapshot


@dataclass
class FinetuneResult:
    """What a fine-tune produced, with its DP accounting when DP was on."""

    snapshots: list[Snapshot]
    losses: list[float]
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    privacy_unit: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def final(self) -> Snapshot:
        return self.snapshots[-1]

    def dp_dict(self) -> dict:
        if self.epsilon is None:
            return {"dp": False}
        return {"dp": True, "epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "privacy_unit": self.privacy_unit, "accountant": self.extra.get("accountant")}


def iter_finetune(lm: LoadedModel, examples: Sequence[Example], cfg: FinetuneConfig, seed: int,
                  dp: DPConfig | None = None, result: FinetuneResult | None = None,
                  loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None) -> Iterator[Snapshot]:
    """Fine-tune ``lm``'s LoRA from the card init, yielding a snapshot at each snapshot step.

    The model is reset to the card's init first (and checked), so one loaded model serves
    many fine-tunes. Batches are drawn with replacement by a generator seeded with
    ``seed``; under DP, opacus' Poisson sampling with rate batch_size / n instead.

    Args:
        lm: model with the card's LoRA attached.
        examples: the training data (any length >= 1).
        cfg: steps, lr, batch size, snapshot steps.
        seed: seed of batch sampling (and DP noise).
        dp: DP-SGD settings; ``None`` or disabled trains without DP.
        result: if given, filled with losses and DP accounting as training goes.
        loss_fn: ``(model, batch) -> scalar`` in place of the answer NLL
            (:func:`gt_ray.models.lm_loss`), e.g. a distillation loss; not with DP.

    Yields:
        Snapshot per ``cfg.snapshot_steps``.

    Raises:
        FinetuneFailedError: if the LoRA weights did not move (a silent-failure mode seen
            with opacus + peft upstream), or the update is not finite.
    """
    if not examples:
        raise ValueError("no training examples")
    result = result if result is not None else FinetuneResult([], [])
    lm.reset()
    if not torch.equal(read_lora(lm.model, lm.layout), lm.init):
        raise RuntimeError("LoRA parameters are not at the card's init after reset")
    device = next(lm.model.parameters()).device
    data = encode_examples(lm.tokenizer, examples)
    data = Batch(data.input_ids.to(device), data.attention_mask.to(device), data.labels.to(device))
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    use_dp = dp is not None and dp.enabled
    if use_dp and loss_fn is not None:
        raise ValueError("a custom loss_fn is not supported with DP-SGD (opacus clips the answer NLL's gradients)")
    loss_fn = loss_fn or lm_loss
    model = lm.model
    model.train()
    if use_dp:
        model, opt, batches = _make_private(lm, data, opt, cfg, dp, gen, result)
    else:
        batches = _replacement_batches(data, cfg.batch_size, gen)
    model.train()
    window: list[float] = []
    snap_at = set(cfg.snapshot_steps)
    try:
        for step in range(1, cfg.steps + 1):
            batch = next(batches)
            opt.zero_grad(set_to_none=True)
            if batch.input_ids.shape[0] > 0:  # Poisson sampling may draw an empty batch
                loss = loss_fn(model, batch)
                loss.backward()
                window.append(loss.item())
                result.losses.append(window[-1])
            opt.step()
            if step in snap_at:
                update = read_lora(lm.model, lm.layout) - lm.init
                _check_moved(update, step)
                snap = Snapshot(step, update, sum(window) / max(1, len(window)))
                window = []
                result.snapshots.append(snap)
                yield snap
    finally:
        model.eval()
        if use_dp:
            model._close()  # remove opacus hooks so the model serves the next fine-tune
            result.epsilon = float(result.extra.pop("engine").get_epsilon(dp.delta))


def finetune(lm: LoadedModel, examples: Sequence[Example], cfg: FinetuneConfig, seed: int,
             dp: DPConfig | None = None, loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None
             ) -> FinetuneResult:
    """Run :func:`iter_finetune` to the end and return every snapshot with DP accounting."""
    result = FinetuneResult([], [])
    for _ in iter_finetune(lm, examples, cfg, seed, dp, result, loss_fn):
        pass
    return result


def _check_moved(update: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(update).all()):
        raise FinetuneFailedError(f"update at step {step} has non-finite values: training diverged")
    if float(update.abs().max()) == 0.0:
        raise FinetuneFailedError(f"LoRA weights did not move by step {step}: the update is zero")


def _index(data: Batch, idx: torch.Tensor) -> Batch:
    return Batch(data.input_ids[idx], data.attention_mask[idx], data.labels[idx])


def _replacement_batches(data: Batch, batch_size: int, gen: torch.Generator) -> Iterator[Batch]:
    n = data.input_ids.shape[0]
    while True:
        yield _index(data, torch.randint(0, n, (batch_size,), generator=gen).to(data.input_ids.device))


def _make_private(lm: LoadedModel, data: Batch, opt, cfg: FinetuneConfig, dp: DPConfig,
                  gen: torch.Generator, result: FinetuneResult):
    """Wrap model and optimizer with opacus; the data loader samples Poisson batches."""
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    n = data.input_ids.shape[0]
    sample_rate = min(1.0, cfg.batch_size / n)
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        sigma = get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.delta,
                                     sample_rate=sample_rate, steps=cfg.steps, accountant=dp.accountant)
    dataset = torch.utils.data.TensorDataset(data.input_ids, data.attention_mask, data.labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, generator=gen)
    engine = PrivacyEngine(accountant=dp.accountant, secure_mode=False)
    model, opt, loader = engine.make_private(module=lm.model, optimizer=opt, data_loader=loader,
                                             noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm,
                                             poisson_sampling=True, noise_generator=gen)
    result.noise_multiplier, result.sample_rate, result.delta = float(sigma), sample_rate, dp.delta
    result.privacy_unit = PRIVACY_UNIT
    result.extra.update(engine=engine, accountant=dp.accountant)
    logger.info("DP-SGD: sigma=%.3f q=%.4f steps=%d unit=%s", sigma, sample_rate, cfg.steps, PRIVACY_UNIT)

    def batches() -> Iterator[Batch]:
        while True:
            for ids, mask, labels in loader:
                yield Batch(ids, mask, labels)

    return model, opt, batches()

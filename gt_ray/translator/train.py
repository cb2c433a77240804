"""Training a Grad-Transformer: the optimizer, one epoch, validation, early stopping and
`train_translator`, which returns the best weights as a `Translator`.

Never imports ray: `jobs/train_translator.py` and `jobs/tune_translator.py` hand Ray Train's
`prepare_model` / `prepare_data_loader` and a reporting callback to `train_translator`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gt_ray.translator.config import TrainConfig, TranslatorConfig
from gt_ray.translator.model import GradTransformer, Normalizer, Translator

logger = logging.getLogger(__name__)


def make_optimizer(
    model: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (decay on matrices only) and a linear-warmup-then-constant schedule.

    Args:
        model: the model (or its DDP wrapper).
        cfg: the training config.

    Returns:
        (optimizer, scheduler); step the scheduler once per optimizer step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    warmup = cfg.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    )
    return optimizer, scheduler


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    function: FunctionLoss | None = None,
) -> float:
    """One pass over normalized pairs: teacher-forced MSE, or the function objective.

    Works unchanged on a DDP-wrapped model with a distributed loader.

    Args:
        model: GradTransformer or DDP(GradTransformer), put in train mode here.
        loader: yields (x, y), (x, y, subset_id) or (x, y, subset_id, paired) batches,
            (B, L_tiny, d_tiny) and (B, L_llm, d_llm) normalized, (B,) long, (B,) float: 1
            where the row's LLM vector is real, 0 for a TinyLM-only row (its ``y`` is a
            placeholder that only the MSE term would read, so it is masked there).
        optimizer: the optimizer.
        scheduler: stepped once per optimizer step, if given.
        grad_clip: max global grad norm, or None.
        function: with it, the loss is the LLM's answer loss with the decoded update
            plus `function.mse_weight` x MSE (needs subset ids in the batches).

    Returns:
        Mean training loss over this worker's samples.
    """
    model.train()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y, *rest in loader:
        x, y = x.to(device), y.to(device)
        if function is None:
            pred = model(x, y, rest[0].to(device) if rest else None)  # (B, L_llm, d_llm), teacher-forced
            loss = F.mse_loss(pred, y)
        else:
            pred = model(x, None, rest[0].to(device))  # (B, L_llm, d_llm), decoded as at inference
            raw = function.denormalize(pred)
            loss = function.loss(raw, rest[0].tolist()) + function.mse_weight * _masked_mse(pred, y, rest[1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


class _Rows(torch.utils.data.Dataset):
    """Training rows (x, y, subset id, paired) whose normalized LLM targets are held for the
    paired rows only: a TinyLM-only row's ``y`` is a zero placeholder that only the masked MSE
    term reads, so thousands of TinyLM-only rows cost no (L_llm, d_llm) block each.

    Args:
        x: (N, L_tiny, d_tiny) normalized inputs.
        y_paired: (P, L_llm, d_llm) normalized targets of the paired rows, in row order.
        paired: (N,) bool with P True.
        subsets: (N,) subset ids.
    """

    def __init__(self, x: torch.Tensor, y_paired: torch.Tensor, paired: torch.Tensor, subsets: torch.Tensor) -> None:
        if int(paired.sum()) != y_paired.shape[0]:
            raise ValueError(f"{int(paired.sum())} paired rows but {y_paired.shape[0]} targets")
        self.x, self.y, self.subsets, self.paired = x, y_paired, subsets.long(), paired.float()
        self.target_row = torch.full((x.shape[0],), -1, dtype=torch.long)  # row -> index into y, -1: none
        self.target_row[paired] = torch.arange(y_paired.shape[0])
        self.placeholder = torch.zeros(y_paired.shape[1:], dtype=y_paired.dtype)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        j = int(self.target_row[i])
        return self.x[i], self.y[j] if j >= 0 else self.placeholder, self.subsets[i], self.paired[i]


def _masked_mse(pred: torch.Tensor, y: torch.Tensor, paired: list[torch.Tensor]) -> torch.Tensor:
    """MSE over the rows whose LLM vector is real (all rows when no mask is given); 0 for a
    batch of TinyLM-only rows."""
    if not paired:
        return F.mse_loss(pred, y)
    w = paired[0].to(pred.device, pred.dtype)  # (B,)
    per_row = (pred - y).pow(2).flatten(1).mean(1)  # (B,)
    return (per_row * w).sum() / w.sum().clamp(min=1)


@torch.no_grad()
def evaluate_mse(model: nn.Module, loader: DataLoader, autoregressive: bool = True) -> float:
    """Validation MSE in normalized space.

    Args:
        model: GradTransformer or a DDP wrapper of one, put in eval mode here.
        loader: yields normalized (x, y) batches.
        autoregressive: score cached decoding (what inference does) rather than teacher forcing.

    Returns:
        Mean MSE over the loader's samples.
    """
    net: GradTransformer = getattr(model, "module", model)  # decoding needs no DDP sync
    net.eval()
    device = next(net.parameters()).device
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        pred = net.translate(x) if autoregressive else net(x, y)  # (B, L_llm, d_llm)
        total += F.mse_loss(pred, y, reduction="sum").item() / y[0].numel()
        count += x.shape[0]
    return total / max(count, 1)


@dataclass
class FunctionLoss:
    """The function objective inside training: a `FunctionObjective` (LLM + examples),
    the normalizer to go back to raw vectors, and the draw's randomness."""

    objective: Any  # gt_ray.translator.function_loss.FunctionObjective (untyped: no LLM code unless used)
    normalizer: Normalizer
    mse_weight: float
    rng: Any

    def denormalize(self, pred: torch.Tensor) -> torch.Tensor:
        return self.normalizer.denormalize_y(pred)

    def loss(self, raw: torch.Tensor, subset_ids: list[int]) -> torch.Tensor:
        return self.objective.train_loss(raw, subset_ids, self.rng)


@torch.no_grad()
def evaluate_answer_scores(model: nn.Module, x: torch.Tensor, subset_ids: list[int], normalizer: Normalizer,
                           objective: Any, batch_size: int = 64) -> dict[str, float]:
    """Validation answer NLL and exact-match accuracy of the LLM with the decoded updates
    (what inference produces).

    Args:
        model: GradTransformer or a DDP wrapper of one.
        x: normalized TinyLM vectors of the validation rows, (M, L_tiny, d_tiny).
        subset_ids: the rows' subsets, len M.
        normalizer: maps the decoded output back to raw vectors.
        objective: a `gt_ray.translator.function_loss.FunctionObjective`.
    """
    net: GradTransformer = getattr(model, "module", model)
    net.eval()
    device = next(net.parameters()).device
    raw = torch.cat([normalizer.denormalize_y(net.translate(x[i:i + batch_size].to(device)))
                     for i in range(0, x.shape[0], batch_size)])
    return objective.val_scores(raw, subset_ids)


@dataclass
class EarlyStopping:
    """Tracks the best validation loss and its weights; says when patience ran out."""

    patience: int
    """Epochs without improvement before stopping."""
    min_delta: float = 0.0
    """Required improvement over the best loss."""
    best_loss: float = math.inf
    """Best validation loss so far."""
    best_epoch: int = -1
    """Epoch of best_loss."""
    best_state: dict[str, torch.Tensor] | None = None
    """CPU copy of the model's state dict at best_epoch."""
    bad_epochs: int = 0
    """Epochs since the last improvement."""

    def step(self, epoch: int, val_loss: float, model: nn.Module) -> bool:
        """Records an epoch's validation loss.

        Args:
            epoch: the epoch index.
            val_loss: its validation loss.
            model: the model (or DDP wrapper) whose weights to keep if it is the best.

        Returns:
            True when training should stop.
        """
        if val_loss < self.best_loss - self.min_delta:
            net = getattr(model, "module", model)
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def _check_pairs(x: torch.Tensor, y: torch.Tensor, cfg: TranslatorConfig, split: str) -> None:
    if x.ndim != 3 or tuple(x.shape[1:]) != (cfg.L_tiny, cfg.d_tiny):
        raise ValueError(f"{split}_x must be (N, {cfg.L_tiny}, {cfg.d_tiny}), got {tuple(x.shape)}")
    if y.ndim != 3 or tuple(y.shape[1:]) != (cfg.L_llm, cfg.d_llm):
        raise ValueError(f"{split}_y must be (N, {cfg.L_llm}, {cfg.d_llm}), got {tuple(y.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{split}_x and {split}_y need the same non-zero row count, got {x.shape[0]} and {y.shape[0]}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"{split} pairs hold non-finite values")


EpochCallback = Callable[[int, float, float], bool | None]


def train_translator(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: TrainConfig,
    model_config: TranslatorConfig | None = None,
    on_epoch: EpochCallback | None = None,
    device: str | torch.device = "cpu",
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    prepare_train_loader: Callable[[DataLoader], DataLoader] | None = None,
    train_subsets: torch.Tensor | None = None,
    val_subsets: torch.Tensor | None = None,
    function: Any = None,
    train_paired: torch.Tensor | None = None,
    val_paired: torch.Tensor | None = None,
    input_encoder: Any = None,
) -> tuple[Translator, list[dict[str, float]]]:
    """Trains a translator with early stopping on a validation loss; returns the best weights.

    The validation loss is the answer NLL of the LLM with the decoded updates on the
    validation subsets' examples when ``function`` is given, else the validation MSE.
    Deterministic given cfg.seed (on CPU); the caller's global RNG state is left untouched.

    Args:
        train_x: raw TinyLM vectors, (N, L_tiny, d_tiny).
        train_y: raw LLM vectors, (N, L_llm, d_llm).
        val_x: (M, L_tiny, d_tiny).
        val_y: (M, L_llm, d_llm).
        cfg: the training config.
        model_config: the architecture; None uses TranslatorConfig defaults. Missing layouts are
            taken from the data.
        on_epoch: called as on_epoch(epoch, train_loss, val_loss) after every epoch (e.g. to
            report to Ray Train/Tune); returning True stops training.
        device: where to train.
        prepare_model: wraps the model for data-parallel training (e.g. Ray Train's
            ``prepare_model``, which moves it to the worker's device and wraps it in DDP).
        prepare_train_loader: shards the training loader across workers (e.g. Ray
            Train's ``prepare_data_loader``). Validation is never sharded: every worker
            scores the whole validation set, so all take the same early-stopping decision.
        train_subsets: (N,) subset id of each training row; needed by the function
            objective and by snapshot sampling (default: every row its own subset).
        val_subsets: (M,) subset id of each validation row (needed with ``function``).
        function: a `gt_ray.translator.function_loss.FunctionObjective` holding the frozen LLM and the
            subsets' examples; required by ``cfg.objective == "function"``.
        train_paired: (N,) bool, False for rows of TinyLM-only subsets (their ``train_y``
            is a placeholder): the function loss trains on them, the MSE term, the
            normalizer's LLM statistics and a retrieval head's bank use paired rows only.
            Default: every row paired.
        val_paired: (M,) bool, the same for validation rows (validation MSE on paired rows;
            answer scores on every validation subset).
        input_encoder: with ``model_config.input == "behaviour"``, the encoder that made
            ``train_x`` / ``val_x`` (behaviour tokens) from raw updates; the returned translator
            keeps it, so it translates raw updates.

    Returns:
        (translator in eval mode on `device`, history): one dict per epoch with epoch,
        train_loss, val_loss (the early-stopping figure), val_nll, val_tf_loss, val_ar_loss,
        lr, seconds.

    Raises:
        ValueError: on inconsistent shapes or non-finite values, the function objective
            without ``function`` / subset ids, or TinyLM-only rows without the function
            objective.
    """
    model_config = model_config or TranslatorConfig()
    if not model_config.has_layouts:
        model_config = model_config.with_layouts(
            d_tiny=train_x.shape[-1], L_tiny=train_x.shape[-2], d_llm=train_y.shape[-1], L_llm=train_y.shape[-2]
        )
    _check_pairs(train_x, train_y, model_config, "train")
    _check_pairs(val_x, val_y, model_config, "val")
    if cfg.objective == "function" and function is None:
        raise ValueError("objective 'function' needs a FunctionObjective (the LLM and the subsets' examples)")
    if train_subsets is None:
        train_subsets = torch.arange(train_x.shape[0])
    if function is not None and val_subsets is None:
        raise ValueError("scoring on validation answer NLL needs val_subsets")
    if train_subsets.shape[0] != train_x.shape[0] or (val_subsets is not None and val_subsets.shape[0] != val_x.shape[0]):
        raise ValueError("train_subsets / val_subsets need one id per row")
    train_paired = torch.ones(train_x.shape[0], dtype=torch.bool) if train_paired is None else train_paired.bool()
    val_paired = torch.ones(val_x.shape[0], dtype=torch.bool) if val_paired is None else val_paired.bool()
    if train_paired.shape[0] != train_x.shape[0] or val_paired.shape[0] != val_x.shape[0]:
        raise ValueError("train_paired / val_paired need one flag per row")
    if cfg.objective != "function" and not (bool(train_paired.all()) and bool(val_paired.all())):
        raise ValueError("TinyLM-only rows (no LLM vector) train only with the function objective")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        normalizer = Normalizer.fit(train_x, train_y[train_paired], model_config.normalization, model_config.norm_eps,
                                   model_config.input_norm_eps)
        last_row = {int(s): i for i, s in enumerate(train_subsets.tolist()) if train_paired[i]}  # last paired snapshot
        if model_config.head == "retrieval":
            model_config = dataclasses.replace(model_config, bank_size=len(last_row))
        core = GradTransformer(model_config)
        if model_config.head == "retrieval":
            idx = torch.tensor(list(last_row.values()))
            core.set_bank(normalizer.normalize_x(train_x[idx].float()), normalizer.normalize_y(train_y[idx].float()),
                          torch.tensor(list(last_row)))
        core = core.to(device)
        model = prepare_model(core) if prepare_model is not None else core
        device = next(core.parameters()).device
        normalizer = normalizer.to(device)
        train_set = _Rows(normalizer.normalize_x(train_x.float().to(device)).cpu(),
                          normalizer.normalize_y(train_y[train_paired].float().to(device)).cpu(), train_paired,
                          train_subsets)
        val_xn = normalizer.normalize_x(val_x.float().to(device)).cpu()
        val_set = TensorDataset(val_xn[val_paired], normalizer.normalize_y(val_y[val_paired].float().to(device)).cpu())
        generator = torch.Generator().manual_seed(cfg.seed)
        rows_of: dict[int, list[int]] = {}
        for i, sid in enumerate(train_subsets.tolist()):
            rows_of.setdefault(sid, []).append(i)

        def epoch_loader() -> DataLoader:
            data = train_set
            if cfg.sample_snapshots:  # one random snapshot of each subset this epoch
                data = torch.utils.data.Subset(train_set, [rng.choice(rows_of[s]) for s in sorted(rows_of)])
            loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=generator)
            return prepare_train_loader(loader) if prepare_train_loader is not None else loader

        train_loader = epoch_loader()
        val_loader = DataLoader(val_set, batch_size=max(cfg.batch_size, 64))
        optimizer, scheduler = make_optimizer(model, cfg)
        stopper = EarlyStopping(cfg.patience, cfg.min_delta)
        fn_loss = None
        if cfg.objective == "function":
            fn_loss = FunctionLoss(function, normalizer, cfg.mse_weight, rng)
        if val_subsets is not None:  # answer NLL on each validation subset's last snapshot only
            last_val = {int(s): i for i, s in enumerate(val_subsets.tolist())}
            val_ids, val_nll_x = list(last_val), val_xn[list(last_val.values())]
        history: list[dict[str, float]] = []

        for epoch in range(cfg.max_epochs):
            t0 = time.perf_counter()
            if cfg.sample_snapshots and epoch > 0:
                train_loader = epoch_loader()
            train_loss = train_epoch(model, train_loader, optimizer, scheduler, cfg.grad_clip, fn_loss)
            has_val_pairs = len(val_set) > 0  # validation MSE needs LLM vectors
            val_tf = evaluate_mse(model, val_loader, autoregressive=False) if has_val_pairs else math.nan
            val_ar = (evaluate_mse(model, val_loader, autoregressive=True)
                      if cfg.val_autoregressive and has_val_pairs else math.nan)
            val_nll = val_acc = math.nan
            if function is not None:
                scores = evaluate_answer_scores(model, val_nll_x, val_ids, normalizer, function)
                val_nll, val_acc = scores["nll"], scores["accuracy"]
                # accuracy is coarse: the NLL, scaled far below one example's worth, breaks ties
                val_loss = val_nll if cfg.select_on == "nll" else (1 - val_acc) + 1e-4 * val_nll
            else:
                val_loss = val_ar if cfg.val_autoregressive else val_tf
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_nll": val_nll,
                    "val_accuracy": val_acc,
                    "val_tf_loss": val_tf,
                    "val_ar_loss": val_ar,
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": time.perf_counter() - t0,
                }
            )
            logger.info("epoch=%d train_loss=%.6g val_loss=%.6g val_tf_loss=%.6g val_accuracy=%.3f epoch_seconds=%.0f",
                        epoch, train_loss, val_loss, val_tf, val_acc, time.perf_counter() - t0)
            if not math.isfinite(train_loss):
                logger.warning("training diverged at epoch %d (train_loss=%s); stopping", epoch, train_loss)
                break
            stop = stopper.step(epoch, val_loss, core)
            if on_epoch is not None and on_epoch(epoch, train_loss, val_loss):
                logger.info("stop requested by on_epoch at epoch %d", epoch)
                break
            if stop:
                logger.info(
                    "early stop at epoch %d; best epoch %d val_loss=%.6g", epoch, stopper.best_epoch, stopper.best_loss
                )
                break

    if stopper.best_state is not None:
        core.load_state_dict(stopper.best_state)
    translator = Translator(model_config, core, normalizer.to(device), train_config=cfg, input_encoder=input_encoder)
    best = stopper.best_loss if math.isfinite(stopper.best_loss) else None
    translator.metadata.update({"best_epoch": stopper.best_epoch, "best_val_loss": best,
                                "selected_on": f"val_answer_{cfg.select_on}" if function is not None else "val_mse"})
    return translator.eval(), history

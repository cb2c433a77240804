"""Tests for gt_ray.translator.train: tiny seeded CPU models, the whole file runs in seconds."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gt_ray.translator.config import TrainConfig
from gt_ray.translator.train import EarlyStopping, evaluate_mse, train_translator
from tests.translator_helpers import D_LLM, L_LLM, linear_pairs, one_thread, tiny_config  # noqa: F401


def test_training_beats_the_mean_baseline():
    train_x, train_y = linear_pairs(256, seed=10)
    val_x, val_y = linear_pairs(64, seed=11)
    cfg = TrainConfig(lr=3e-3, batch_size=32, max_epochs=12, patience=12, seed=0, warmup=10)
    translator, history = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=tiny_config())
    # Judge in normalized space, where every coordinate counts the same (raw MSE would be
    # the few large-scale coordinates only).
    norm = translator.normalizer
    pred = norm.normalize_y(translator.translate(val_x))
    target = norm.normalize_y(val_y)
    baseline = torch.nn.functional.mse_loss(torch.zeros_like(target), target).item()  # predicts the train mean
    mse = torch.nn.functional.mse_loss(pred, target).item()
    assert mse < 0.5 * baseline, (mse, baseline)
    assert min(h["val_loss"] for h in history) == pytest.approx(mse, rel=1e-4)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_training_is_deterministic_and_keeps_caller_rng():
    train_x, train_y = linear_pairs(64, seed=0)
    val_x, val_y = linear_pairs(16, seed=1)
    cfg = TrainConfig(lr=1e-3, batch_size=16, max_epochs=2, seed=7)
    model_cfg = tiny_config(dropout=0.1)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, hist_a = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=model_cfg)
    assert torch.equal(torch.rand(1), before)
    b, hist_b = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=model_cfg)
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]
    assert torch.equal(a.translate(val_x), b.translate(val_x))


def test_early_stopping_stops_and_restores_best_weights():
    # Targets independent of inputs: validation MSE cannot keep improving.
    train_x, _ = linear_pairs(64, seed=0)
    val_x, _ = linear_pairs(32, seed=1)
    train_y, val_y = torch.randn(64, L_LLM, D_LLM), torch.randn(32, L_LLM, D_LLM)
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_epochs=60, patience=2, seed=0, val_autoregressive=False)
    translator, history = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=tiny_config())
    assert len(history) < cfg.max_epochs
    best = min(history, key=lambda h: h["val_loss"])
    assert history[-1]["epoch"] == best["epoch"] + cfg.patience
    norm = translator.normalizer
    loader = DataLoader(TensorDataset(norm.normalize_x(val_x), norm.normalize_y(val_y)), batch_size=64)
    assert evaluate_mse(translator.model, loader, autoregressive=False) == pytest.approx(best["val_loss"], rel=1e-5)
    assert translator.metadata["best_epoch"] == best["epoch"]


def test_early_stopping_tracker():
    model = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2)
    assert [stopper.step(e, loss, model) for e, loss in enumerate([3.0, 2.0, 2.5, 1.0, 1.5, 1.2])] == [
        False, False, False, False, False, True
    ]
    assert (stopper.best_epoch, stopper.best_loss) == (3, 1.0)


def test_on_epoch_callback_reports_and_can_stop():
    train_x, train_y = linear_pairs(32, seed=0)
    val_x, val_y = linear_pairs(8, seed=1)
    seen = []

    def on_epoch(epoch, train_loss, val_loss):
        seen.append((epoch, train_loss, val_loss))
        return epoch == 1

    cfg = TrainConfig(batch_size=16, max_epochs=10, seed=0)
    _, history = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=tiny_config(), on_epoch=on_epoch)
    assert [s[0] for s in seen] == [0, 1]
    assert [(h["train_loss"], h["val_loss"]) for h in history] == [s[1:] for s in seen]


def test_training_rejects_mismatched_layouts():
    x, y = linear_pairs(8, seed=0)
    with pytest.raises(ValueError, match=r"val_y must be \(N, 5, 40\)"):
        train_translator(x, y, x, y[:, :4], TrainConfig(max_epochs=1), model_config=tiny_config())


def test_sampled_snapshots_take_one_row_per_subset_each_epoch():
    x, y = linear_pairs(12, seed=0)
    subsets = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])  # 3 subsets x 4 snapshots
    seen: list[list[int]] = []

    def record(loader):
        seen.append([int(s) for _, _, s, *_ in loader.dataset])
        return loader

    cfg = TrainConfig(lr=1e-3, batch_size=2, max_epochs=3, patience=3, sample_snapshots=True)
    train_translator(x, y, x[:4], y[:4], cfg, model_config=tiny_config(), train_subsets=subsets, prepare_train_loader=record)
    assert len(seen) == 3 and all(sorted(s) == [0, 1, 2] for s in seen)
    seen.clear()
    train_translator(x, y, x[:4], y[:4], TrainConfig(lr=1e-3, batch_size=2, max_epochs=2, patience=2), model_config=tiny_config(),
                     train_subsets=subsets, prepare_train_loader=record)
    assert len(seen) == 1 and len(seen[0]) == 12  # every row, one loader


def test_train_config_checks_the_objective():
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainConfig(objective="kl")
    with pytest.raises(ValueError, match="mse_weight must be >= 0"):
        TrainConfig(mse_weight=-1)
    x, y = linear_pairs(8, seed=0)
    with pytest.raises(ValueError, match="needs a FunctionObjective"):
        train_translator(x, y, x, y, TrainConfig(objective="function", max_epochs=1), model_config=tiny_config())

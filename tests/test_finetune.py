import random

import pytest
import torch

from gt_ray import tasks
from gt_ray.config import DPConfig, FinetuneConfig
from gt_ray.finetune import PRIVACY_UNIT, finetune, iter_finetune
from gt_ray.models import load_with_lora
from gt_ray.privacy import dp_sgd_epsilon
from gt_ray.updates import read_lora

CFG = FinetuneConfig(lr=3e-3, steps=12, batch_size=8, n_examples=48, snapshot_steps=[6, 9, 12])


def _data(seed, split="public", n=48):
    spec = tasks.draw_dataset_spec(random.Random(seed), split, ["caesar", "index", "add"], n, 0.5)
    return tasks.generate_dataset(spec)


@pytest.fixture
def lm(tiny_path, lora):
    return load_with_lora(tiny_path, lora, seed=7)


def test_snapshots_are_nonzero_finite_and_distinct(lm):
    res = finetune(lm, _data(1), CFG, seed=0)
    assert [s.step for s in res.snapshots] == [6, 9, 12]
    for s in res.snapshots:
        assert s.update.shape == lm.layout.shape
        assert torch.isfinite(s.update).all() and s.update.abs().max() > 0
    assert not torch.equal(res.snapshots[0].update, res.snapshots[-1].update)
    # the final snapshot is exactly the model's LoRA minus the card's init
    torch.testing.assert_close(res.final.update, read_lora(lm.model, lm.layout) - lm.init, rtol=0, atol=0)


def test_same_seed_same_update_and_different_subsets_differ(lm):
    a = finetune(lm, _data(1), CFG, seed=0).final.update
    b = finetune(lm, _data(1), CFG, seed=0).final.update  # reset to the card init in between
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = finetune(lm, _data(2), CFG, seed=0).final.update
    assert (a - c).norm() > 1e-3 * a.norm()


def test_iter_finetune_yields_while_training(lm):
    steps = [s.step for s in iter_finetune(lm, _data(1), CFG, seed=0)]
    assert steps == [6, 9, 12]


def test_dp_finetune_reports_opacus_epsilon_and_moves(lm):
    dp = DPConfig(enabled=True, noise_multiplier=1.1, delta=1e-5, max_grad_norm=1.0)
    res = finetune(lm, _data(3), CFG, seed=0, dp=dp)
    assert res.privacy_unit == PRIVACY_UNIT == "example"
    assert res.sample_rate == pytest.approx(8 / 48)
    expected = dp_sgd_epsilon(sample_rate=8 / 48, noise_multiplier=1.1, steps=CFG.steps, delta=1e-5)
    assert res.epsilon == pytest.approx(expected, rel=1e-9)
    assert 0 < res.epsilon < float("inf")
    assert res.final.update.abs().max() > 0  # the LoRA weights moved under DP


def test_dp_target_epsilon_is_met(lm):
    dp = DPConfig(enabled=True, target_epsilon=4.0, delta=1e-5)
    res = finetune(lm, _data(3), CFG, seed=0, dp=dp)
    assert res.epsilon == pytest.approx(4.0, rel=0.02)
    # opacus hooks are gone afterwards: a plain fine-tune still works on the same model
    assert finetune(lm, _data(3), CFG, seed=0).final.update.abs().max() > 0


def test_empty_data_is_refused(lm):
    with pytest.raises(ValueError, match="no training examples"):
        finetune(lm, [], CFG, seed=0)


def test_fine_tuning_learns_the_secret(tiny_path, lora):
    """A few dozen steps on one easy task lower the answer NLL on held-out inputs."""
    from gt_ray.evaluate import score_model

    lm = load_with_lora(tiny_path, lora, seed=7)
    spec = tasks.DatasetSpec("public", 4, {"caesar": 1.0}, 64, 5)
    test = tasks.generate_dataset(spec, n=64, split="private_test")
    before = score_model(lm.model, lm.tokenizer, test).nll
    finetune(lm, tasks.generate_dataset(spec), FinetuneConfig(lr=1e-2, steps=40, batch_size=16, n_examples=64,
                                                               snapshot_steps=[40]), seed=0)
    after = score_model(lm.model, lm.tokenizer, test).nll
    assert after < before - 0.1

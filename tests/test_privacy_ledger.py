"""The per-organization privacy budget ledger: budget checks, persistence, RDP totals."""

import json

import pytest
import torch

from gt_ray.privacy import VectorMechanism, privatize
from gt_ray.privacy_ledger import BudgetExceededError, PrivacyLedger


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ledger_refuses_release_over_budget(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", eps_budget=1.0, delta_budget=1e-5)
    for i in range(10):  # 10 x 0.1 reaches the budget exactly (fsum, no rounding drift)
        ledger.check("org-a", 0.1, 1e-6)
        ledger.record("org-a", f"round-{i}", epsilon=0.1, delta=1e-6, mechanism="gaussian")
    assert ledger.spent("org-a").epsilon == pytest.approx(1.0)
    with pytest.raises(
        BudgetExceededError,
        match=r"privacy budget exceeded for organization 'org-a': spent epsilon=1, delta=1e-05 "
        r"over 10 releases; this release asks epsilon=0.1, delta=1e-06",
    ):
        ledger.check("org-a", 0.1, 1e-6)
    # Another organization has its own budget.
    ledger.check("org-b", 1.0, 1e-5)


def test_ledger_refuses_on_delta(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", eps_budget=10.0, delta_budget=1e-5)
    ledger.record("org", "r0", epsilon=1.0, delta=1e-5, mechanism="gaussian")
    with pytest.raises(BudgetExceededError, match=r"budget is epsilon=10, delta=1e-05"):
        ledger.check("org", 1.0, 1e-7)
    ledger.check("org", 1.0, 0.0)  # a Laplace release still fits


def test_ledger_persists_across_reload(tmp_path):
    path = tmp_path / "sub" / "ledger.json"
    ledger = PrivacyLedger(path, eps_budget=5.0, delta_budget=1e-4)
    mech = VectorMechanism(epsilon=2.0, delta=1e-5)
    ledger.check("org-a", mech.epsilon, mech.delta)
    _, report = privatize(torch.ones(2, 3), mech, _gen())
    ledger.record_report("org-a", "round-0", report)
    ledger.record("org-b", "round-0", epsilon=0.5, delta=0.0, mechanism="laplace")
    assert [f.name for f in path.parent.iterdir()] == ["ledger.json"]  # the temp file was renamed away

    reloaded = PrivacyLedger(path, eps_budget=5.0, delta_budget=1e-4)
    assert reloaded.entries("org-a") == ledger.entries("org-a")
    spent = reloaded.spent("org-a")
    assert (spent.epsilon, spent.delta, spent.n_releases) == (2.0, 1e-5, 1)
    assert reloaded.entries("org-a")[0].noise_multiplier == pytest.approx(report.sigma / report.sensitivity)
    assert reloaded.spent("org-b").epsilon == 0.5
    with pytest.raises(BudgetExceededError, match=r"organization 'org-a'"):
        reloaded.check("org-a", 3.5, 1e-5)
    with pytest.raises(ValueError, match=r"organization 'org-a' already has a release recorded for round 'round-0'"):
        reloaded.record("org-a", "round-0", epsilon=0.1, delta=0.0, mechanism="laplace")


def test_ledger_rejects_foreign_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match=r"is not a privacy ledger"):
        PrivacyLedger(path, eps_budget=1.0, delta_budget=1e-5)


def test_ledger_rdp_total_tighter_than_basic(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", eps_budget=100.0, delta_budget=1e-5)
    mech = VectorMechanism(epsilon=1.0, delta=1e-7)
    for i in range(20):
        _, report = privatize(torch.ones(4), mech, _gen(i))
        ledger.record_report("org", f"r{i}", report)
    spent = ledger.spent("org")
    assert spent.epsilon == pytest.approx(20.0)
    assert spent.gaussian_rdp_delta == 1e-5
    assert 0 < spent.gaussian_rdp_epsilon < spent.epsilon
    assert ledger.spent("unknown").n_releases == 0



def test_ledger_validates_release_values(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", eps_budget=1.0, delta_budget=1e-5)
    with pytest.raises(ValueError, match=r"^epsilon must be a finite number >= 0, got -0.1$"):
        ledger.check("org", -0.1, 0.0)
    with pytest.raises(ValueError, match=r"^delta must satisfy 0 <= delta < 1, got 1.5$"):
        ledger.record("org", "r0", epsilon=0.1, delta=1.5, mechanism="gaussian")
    with pytest.raises(ValueError, match=r"^eps_budget must be a finite number > 0, got 0$"):
        PrivacyLedger(tmp_path / "other.json", eps_budget=0, delta_budget=1e-5)

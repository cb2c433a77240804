import numpy as np
import pytest

from gt_ray.stats import paired_bootstrap, per_task_accuracy, task_weight_totals


def _pairs(n: int, true_diff: float, seed: int):
    """Per-organization accuracies of two methods: a shared difficulty, a true mean
    difference, and independent noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.2, 0.8, n)
    b = difficulty + rng.normal(0, 0.05, n)
    return b + true_diff + rng.normal(0, 0.1, n), b


def test_bootstrap_interval_holds_the_true_difference_and_is_seeded():
    a, b = _pairs(200, 0.1, seed=0)
    out = paired_bootstrap(a, b, n_boot=4000, seed=3)
    assert out["n"] == 200 and out["mean_diff"] == pytest.approx(float(np.mean(a - b)))
    assert out["lo"] < 0.1 < out["hi"] and out["lo"] < out["mean_diff"] < out["hi"]
    assert 0 < out["lo"]  # a real difference is resolved with 200 organizations
    assert paired_bootstrap(a, b, n_boot=4000, seed=3) == out
    assert paired_bootstrap(a, b, n_boot=4000, seed=4) != out


def test_bootstrap_interval_narrows_with_more_organizations():
    width = {}
    for n in (25, 400):
        a, b = _pairs(n, 0.1, seed=1)
        r = paired_bootstrap(a, b, n_boot=2000)
        width[n] = r["hi"] - r["lo"]
    assert width[400] < width[25] / 2.5  # ~ 1/sqrt(n): a factor 4


def test_bootstrap_pairing_cancels_the_shared_difficulty():
    a, b = _pairs(30, 0.1, seed=2)
    paired = paired_bootstrap(a, b, n_boot=2000)
    rng = np.random.default_rng(0)
    unpaired = paired_bootstrap(a, rng.permutation(b), n_boot=2000)  # difficulty no longer shared
    assert paired["hi"] - paired["lo"] < (unpaired["hi"] - unpaired["lo"]) / 1.5


def test_bootstrap_cluster_resamples_an_organizations_rows_together():
    a, b = _pairs(8, 0.1, seed=3)  # ids 0..7 sort as strings the way they sort as numbers
    one_row = paired_bootstrap(a, b, n_boot=2000)
    rows = 3  # e.g. one row per translator seed, here identical
    copies = paired_bootstrap(np.repeat(a, rows), np.repeat(b, rows), n_boot=2000, cluster=np.repeat(np.arange(8), rows))
    assert copies["n"] == 8
    assert copies == pytest.approx(one_row)
    naive = paired_bootstrap(np.repeat(a, rows), np.repeat(b, rows), n_boot=2000)  # 24 "independent" rows: too narrow
    assert naive["hi"] - naive["lo"] < (one_row["hi"] - one_row["lo"]) * 0.75


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="a and b must be 1-D of one length"):
        paired_bootstrap([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="no rows to bootstrap"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="cluster has 1 ids for 2 rows"):
        paired_bootstrap([0.1, 0.2], [0.0, 0.0], cluster=[0])
    with pytest.raises(ValueError, match="a and b must be finite"):
        paired_bootstrap([0.1, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="n_boot must be >= 1, got 0"):
        paired_bootstrap([0.1], [0.0], n_boot=0)


def test_per_task_split_recovers_noiseless_per_task_accuracy():
    names = ["caesar", "rotate", "index", "add", "delete"]
    truth = np.array([0.05, 0.4, 0.95, 0.9, 1.0])
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.full(5, 0.5), size=24)  # (24, 5) mixtures
    mixtures = [{t: float(x) for t, x in zip(names, row) if x > 0.01} for row in w]  # small weights dropped: 0
    dense = np.array([[m.get(t, 0.0) for t in names] for m in mixtures])
    acc = dense @ truth
    got = per_task_accuracy(mixtures, acc.tolist())
    assert set(got) == set(names)
    np.testing.assert_allclose([got[t] for t in names], truth, atol=1e-9)
    totals = task_weight_totals(mixtures)
    np.testing.assert_allclose([totals[t] for t in names], dense.sum(0))


def test_per_task_split_rejects_bad_input():
    with pytest.raises(ValueError, match="2 weight rows for 1 accuracies"):
        per_task_accuracy([{"a": 1.0}, {"a": 1.0}], [0.5])
    with pytest.raises(ValueError, match="no organizations to split by task"):
        per_task_accuracy([], [])
    with pytest.raises(ValueError, match="task weights have rank 2 < 3 tasks"):
        per_task_accuracy([{"a": 0.5, "b": 0.5}, {"a": 0.2, "c": 0.8}], [0.5, 0.6])
    with pytest.raises(ValueError, match="weights and accuracies must be finite"):
        per_task_accuracy([{"a": 1.0}], [float("inf")])

import pytest
import torch

from gt_ray.baselines import MeanUpdate, NearestNeighbour, RidgeMap, load_baseline, save_baseline
from gt_ray.updates import LayoutEntry, UpdateLayout, split_factors

SCALE = 8.0  # lora_alpha / rank = 16 / 2


def _layout() -> UpdateLayout:
    """2 layers; q: A (2, 4), B (4, 2); v: A (2, 4), B (2, 2) -> d_layer 28."""
    entries = []
    for layer in range(2):
        for module, shapes in (("q_proj", ((2, 4), (4, 2))), ("v_proj", ((2, 4), (2, 2)))):
            for factor, shape in zip(("lora_A", "lora_B"), shapes):
                key = f"model.layers.{layer}.self_attn.{module}.{factor}.weight"
                entries.append(LayoutEntry(key, shape, layer, module, factor))
    return UpdateLayout(tuple(entries), 2, 28)


def _init(layout: UpdateLayout, seed: int = 0) -> torch.Tensor:
    """A random, B zero (the card's convention)."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(layout.shape, generator=g, dtype=torch.float64)
    for key, mat in split_factors(init, layout).items():
        if ".lora_B." in key:
            mat.zero_()
    return init


def _linear_data(n_subsets=20, rows=3, d_x=(2, 3), d_y=(2, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_subsets * rows
    X = torch.randn(n, *d_x, generator=g, dtype=torch.float64)
    W = torch.randn(d_x[0] * d_x[1], d_y[0] * d_y[1], generator=g, dtype=torch.float64)
    b = torch.randn(d_y[0] * d_y[1], generator=g, dtype=torch.float64)
    Y = X.reshape(n, -1) @ W + b
    return X, Y.reshape(n, *d_y), torch.arange(n_subsets).repeat_interleave(rows)


# ------------------------------------------------------------------------------ baselines


def test_mean_update_predicts_training_mean(tmp_path):
    X, Y, ids = _linear_data()
    model = MeanUpdate().fit(X, Y, ids)
    pred = model.predict(X[:4])
    assert pred.shape == (4, 2, 5)
    torch.testing.assert_close(pred, Y.mean(0).expand(4, 2, 5))
    loaded, meta = load_baseline(save_baseline(model, tmp_path / "mean.safetensors", {"fingerprints": {"llm": "x"}}))
    torch.testing.assert_close(loaded.predict(X[:4]), pred)
    assert meta == {"fingerprints": {"llm": "x"}}


def test_ridge_recovers_linear_map_on_noiseless_data():
    X, Y, _ = _linear_data(n_subsets=35, rows=2)
    model = RidgeMap(lam=1e-6).fit(X[:60], Y[:60])  # N = 60 > D_x = 6: primal path
    assert not model.dual_
    torch.testing.assert_close(model.predict(X[60:]), Y[60:], rtol=1e-4, atol=1e-4)


def test_ridge_dual_equals_primal_and_closed_form(tmp_path):
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(12, 2, 10, generator=g), torch.randn(12, 3, 4, generator=g)  # N = 12 < D_x = 20
    lam = 0.7
    dual = RidgeMap(lam=lam, solver="dual").fit(X, Y)
    primal = RidgeMap(lam=lam, solver="primal").fit(X, Y)
    auto = RidgeMap(lam=lam).fit(X, Y)
    assert dual.dual_ and auto.dual_ and not primal.dual_
    # textbook primal solve on standardized X, centered Y
    xf, yf = X.reshape(12, -1).double(), Y.reshape(12, -1).double()
    z = (xf - xf.mean(0)) / xf.std(0, unbiased=False)
    W = torch.linalg.solve(z.T @ z + lam * torch.eye(20, dtype=torch.float64), z.T @ (yf - yf.mean(0)))
    torch.testing.assert_close(dual.weights().double(), W, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(primal.weights().double(), W, rtol=1e-4, atol=1e-5)
    X_new = torch.randn(5, 2, 10, generator=g)
    torch.testing.assert_close(dual.predict(X_new), primal.predict(X_new), rtol=1e-4, atol=1e-5)
    loaded, _ = load_baseline(save_baseline(dual, tmp_path / "ridge.safetensors"))
    torch.testing.assert_close(loaded.predict(X_new), dual.predict(X_new))


def test_ridge_lambda_selection_larger_on_noise():
    X, Y, ids = _linear_data(n_subsets=20, rows=3)
    clean = RidgeMap().fit(X, Y, ids)
    noise = torch.randn(Y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noisy = RidgeMap().fit(X, noise, ids)
    assert clean.cv_errors is not None and len(clean.cv_errors) == len(clean.lambdas)
    assert noisy.lam_ > clean.lam_
    assert clean.lam_ == min(clean.lambdas)
    assert RidgeMap().fit(X, Y).cv_errors is None  # no subset ids: the default lambda


def test_nearest_neighbour_k1_returns_training_y_and_k3_averages(tmp_path):
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(10, 2, 6, generator=g), torch.randn(10, 3, 4, generator=g)
    nn1 = NearestNeighbour(k=1, by_subset=False).fit(X, Y)
    torch.testing.assert_close(nn1.predict(X), Y)
    nn3 = NearestNeighbour(k=3, by_subset=False).fit(X, Y)
    idx, sims = nn3.neighbours(X[:4])
    assert idx.shape == (4, 3) and bool((idx[:, 0] == torch.arange(4)).all())
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    torch.testing.assert_close(nn3.predict(X[:4]), Y[idx].mean(1))
    loaded, _ = load_baseline(save_baseline(nn3, tmp_path / "nn.safetensors"))
    torch.testing.assert_close(loaded.predict(X[:4]), nn3.predict(X[:4]))
    with pytest.raises(ValueError, match="k=11 neighbours but the bank has only 10 entries"):
        NearestNeighbour(k=11, by_subset=False).fit(X, Y)


def test_nearest_neighbour_by_subset_uses_subset_means():
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(12, 2, 6, generator=g), torch.randn(12, 3, 4, generator=g)
    ids = torch.tensor([7, 7, 7, 2, 2, 2, 9, 9, 9, 4, 4, 4])
    nn = NearestNeighbour().fit(X, Y, ids)
    assert nn.bank_ids.tolist() == [2, 4, 7, 9]
    mean_x = torch.stack([X[ids == s].mean(0) for s in (2, 4, 7, 9)])
    mean_y = torch.stack([Y[ids == s].mean(0) for s in (2, 4, 7, 9)])
    torch.testing.assert_close(nn.predict(mean_x), mean_y)


def test_predict_checks_shape_and_fit():
    with pytest.raises(ValueError, match="MeanUpdate is not fitted: call fit first"):
        MeanUpdate().predict(torch.zeros(1, 2, 3))
    X, Y, _ = _linear_data()
    with pytest.raises(ValueError, match=r"X must have shape \(B, 2, 3\), got \(1, 3, 2\)"):
        RidgeMap(lam=1.0).fit(X, Y).predict(torch.zeros(1, 3, 2))

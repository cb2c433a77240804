import pytest
import torch

from gt_ray.baselines import (MeanUpdate, NearestNeighbour, RidgeMap, load_baseline, mean_vector_metrics, save_baseline,
                              vector_metrics, weight_space)
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


# -------------------------------------------------------------------------------- metrics


def test_vector_metrics_identical_negated_and_shapes():
    layout, init = _layout(), _init(_layout())
    g = torch.Generator().manual_seed(4)
    u = torch.randn(layout.shape, generator=g, dtype=torch.float64)
    same = vector_metrics(u, u, layout, init, SCALE)
    for prefix in ("", "weight_"):
        assert same[f"{prefix}cosine"] == pytest.approx(1.0)
        assert same[f"{prefix}rel_l2"] == pytest.approx(0.0, abs=1e-6)
        assert len(same[f"{prefix}cosine_per_layer"]) == 2 and len(same[f"{prefix}rel_l2_per_layer"]) == 2
    neg = vector_metrics(-u, u, layout)
    assert neg["cosine"] == pytest.approx(-1.0) and neg["rel_l2"] == pytest.approx(2.0)
    assert neg["cosine_per_layer"] == pytest.approx([-1.0, -1.0])
    assert "weight_cosine" not in neg
    preds = torch.stack([u, -u])
    batch = mean_vector_metrics(preds, torch.stack([u, u]), layout, init, SCALE)
    assert batch["n"] == 2 and batch["cosine"] == pytest.approx(0.0, abs=1e-12)
    assert batch["rel_l2_per_layer"] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="weight-space metrics need both init and scale"):
        vector_metrics(u, u, layout, init)


def test_weight_space_matches_hand_computation_and_metrics():
    layout, init = _layout(), _init(_layout())
    g = torch.Generator().manual_seed(5)
    u, v = (torch.randn(layout.shape, generator=g, dtype=torch.float64) for _ in range(2))
    dw = weight_space(u, init, layout, SCALE)
    assert list(dw) == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    f_u, f_0 = split_factors(u, layout), split_factors(init, layout)
    key = "model.layers.1.self_attn.v_proj"
    a0, da, db = f_0[f"{key}.lora_A.weight"], f_u[f"{key}.lora_A.weight"], f_u[f"{key}.lora_B.weight"]
    torch.testing.assert_close(dw[key], (SCALE * db @ (a0 + da)).float())
    assert dw[key].shape == (2, 4)
    # the factored (r x r) metrics equal metrics on materialized, concatenated delta W
    dv = weight_space(v, init, layout, SCALE)
    cat = lambda d, layer: torch.cat([m.reshape(-1) for k, m in d.items() if f".{layer}." in k or layer is None])
    p, t = cat(dv, None).double(), cat(dw, None).double()
    m = vector_metrics(v, u, layout, init, SCALE)
    assert m["weight_cosine"] == pytest.approx(float(p @ t / (p.norm() * t.norm())), rel=1e-4)
    assert m["weight_rel_l2"] == pytest.approx(float((p - t).norm() / t.norm()), rel=1e-4)
    p1, t1 = cat(dv, 1).double(), cat(dw, 1).double()
    assert m["weight_rel_l2_per_layer"][1] == pytest.approx(float((p1 - t1).norm() / t1.norm()), rel=1e-4)


def test_weight_space_nonzero_b0_subtracts_init_product():
    layout = _layout()
    init = torch.randn(layout.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)  # B0 != 0
    u = torch.randn(layout.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    key = "model.layers.0.self_attn.q_proj"
    f_u, f_0 = split_factors(u, layout), split_factors(init, layout)
    a0, b0 = f_0[f"{key}.lora_A.weight"], f_0[f"{key}.lora_B.weight"]
    a, b = a0 + f_u[f"{key}.lora_A.weight"], b0 + f_u[f"{key}.lora_B.weight"]
    torch.testing.assert_close(weight_space(u, init, layout, 2.0)[key], (2.0 * (b @ a - b0 @ a0)).float())
    assert vector_metrics(u, u, layout, init, 2.0)["weight_cosine"] == pytest.approx(1.0)


def test_lora_symmetry_weight_cosine_one_raw_cosine_below_one():
    """(dA, dB) and (M^-1 (A0 + dA) - A0, dB M) give the same dB (A0 + dA)."""
    layout, init = _layout(), _init(_layout())
    g = torch.Generator().manual_seed(8)
    u = torch.randn(layout.shape, generator=g, dtype=torch.float64)
    w = u.clone()
    f_u, f_w, f_0 = split_factors(u, layout), split_factors(w, layout), split_factors(init, layout)
    M = torch.tensor([[2.0, 1.0], [0.5, 1.5]], dtype=torch.float64)
    for e in layout.entries:
        if e.factor == "lora_A":
            a0 = f_0[e.key]
            f_w[e.key].copy_(torch.linalg.solve(M, a0 + f_u[e.key]) - a0)
        else:
            f_w[e.key].copy_(f_u[e.key] @ M)
    for k, dw in weight_space(w, init, layout, SCALE).items():
        torch.testing.assert_close(dw, weight_space(u, init, layout, SCALE)[k])
    m = vector_metrics(w, u, layout, init, SCALE)
    assert m["weight_cosine"] == pytest.approx(1.0) and m["weight_rel_l2"] == pytest.approx(0.0, abs=1e-6)
    assert m["cosine"] < 0.99

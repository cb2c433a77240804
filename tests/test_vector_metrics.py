"""Tests for gt_ray.vector_metrics: raw and weight-space cosine / relative L2."""

import pytest
import torch

from gt_ray.updates import split_factors
from gt_ray.vector_metrics import mean_vector_metrics, vector_metrics, weight_space
from tests.test_baselines import SCALE, _init, _layout


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

import pytest
import torch

from gt_ray.aggregate import (
    add_gaussian_noise,
    aggregate,
    mean_sensitivity,
    stack_lora_factors,
)
from gt_ray.privacy import analytic_gaussian_sigma


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hand_vectors() -> list[torch.Tensor]:
    # 4 organizations, vectors of shape (n_layers=1, d_layer=3).
    return [
        torch.tensor([[1.0, 10.0, -2.0]]),
        torch.tensor([[2.0, 20.0, 0.0]]),
        torch.tensor([[3.0, 30.0, 2.0]]),
        torch.tensor([[10.0, -40.0, 4.0]]),
    ]


# ---------------------------------------------------------------- the rules


def test_mean():
    torch.testing.assert_close(aggregate(_hand_vectors(), "mean"), torch.tensor([[4.0, 5.0, 1.0]]))


def test_weighted_mean():
    out = aggregate(_hand_vectors(), "weighted_mean", weights=[1, 1, 2, 0])
    # (1*v0 + 1*v1 + 2*v2) / 4
    torch.testing.assert_close(out, torch.tensor([[2.25, 22.5, 0.5]]))


def test_median_even_and_odd():
    vs = _hand_vectors()
    # Even n: average of the two middle values per coordinate.
    torch.testing.assert_close(aggregate(vs, "median"), torch.tensor([[2.5, 15.0, 1.0]]))
    torch.testing.assert_close(aggregate(vs[:3], "median"), torch.tensor([[2.0, 20.0, 0.0]]))


def test_trimmed_mean_drops_at_least_one_each_side():
    vs = _hand_vectors()
    # n=4, 0.1*4 floors to 0 but at least 1 is dropped at each end: mean of the middle two.
    torch.testing.assert_close(aggregate(vs, "trimmed_mean"), torch.tensor([[2.5, 15.0, 1.0]]))
    # trim_fraction=0 trims nothing.
    torch.testing.assert_close(aggregate(vs, "trimmed_mean", trim_fraction=0.0), aggregate(vs, "mean"))


def test_trimmed_mean_fraction():
    # n=10, trim_fraction=0.2: drop the 2 smallest and 2 largest of each coordinate.
    vs = [torch.tensor([float(x), -float(x)]) for x in [5, 0, 9, 1, 8, 2, 7, 3, 6, 4]]
    torch.testing.assert_close(aggregate(vs, "trimmed_mean", trim_fraction=0.2), torch.tensor([4.5, -4.5]))


def test_single_vector_and_two_vectors():
    v = torch.tensor([[1.0, 2.0]])
    for rule in ("mean", "median", "trimmed_mean"):
        torch.testing.assert_close(aggregate([v], rule), v)
    w = torch.tensor([[3.0, 4.0]])
    # n < 3: the trimmed mean drops nothing.
    torch.testing.assert_close(aggregate([v, w], "trimmed_mean"), torch.tensor([[2.0, 3.0]]))


def test_dtype_and_shape_preserved():
    vs = [torch.randn(3, 5, generator=_gen(i)).to(torch.bfloat16) for i in range(4)]
    for rule in ("mean", "median", "trimmed_mean"):
        out = aggregate(vs, rule)
        assert out.shape == (3, 5) and out.dtype == torch.bfloat16


# ---------------------------------------------------------------- robustness, clipping


def test_robust_rules_resist_one_poisoned_vector():
    honest = [torch.randn(4, 16, generator=_gen(i)) * 0.1 + 1.0 for i in range(9)]
    honest_mean = torch.stack(honest).mean(0)
    poisoned = honest + [honest[0] * 100]
    spread = float(torch.stack(honest).std(0).max())

    def error(rule: str) -> float:
        return float((aggregate(poisoned, rule) - honest_mean).abs().max())

    assert error("median") < 2 * spread
    assert error("trimmed_mean") < 2 * spread
    assert error("mean") > 5.0  # ~ (100 - 1) / 10 per coordinate


def test_clipping_bounds_each_contribution():
    honest = [torch.randn(4, 16, generator=_gen(i)) * 0.01 for i in range(9)]
    poisoned = honest + [torch.full((4, 16), 1000.0)]
    clip = 1.0
    out = aggregate(poisoned, "mean", clip_norm=clip)
    unpoisoned = aggregate(honest + [torch.zeros(4, 16)], "mean", clip_norm=clip)
    # One input moves the mean by at most clip_norm / n.
    assert float((out - unpoisoned).norm()) <= clip / 10 + 1e-6
    # Short inputs are not changed by clipping.
    torch.testing.assert_close(aggregate(honest, "mean", clip_norm=clip), aggregate(honest, "mean"))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "vectors, kwargs, message",
    [
        ([], {}, r"^vectors is empty: need at least one update vector to aggregate$"),
        (
            [torch.zeros(2, 3), torch.zeros(3, 2)],
            {},
            r"^vector 1 has shape \(3, 2\) but vector 0 has shape \(2, 3\)$",
        ),
        (
            [torch.zeros(2), torch.zeros(2, dtype=torch.float64)],
            {},
            r"^vector 1 has dtype torch.float64 but vector 0 has dtype torch.float32$",
        ),
        (
            [torch.zeros(2), torch.tensor([0.0, float("inf")])],
            {},
            r"^vector 1 contains non-finite values \(NaN or inf\)$",
        ),
        ([torch.zeros(2, dtype=torch.long)], {}, r"^vector 0 is not a floating point tensor$"),
        ([torch.zeros(2)], {"rule": "mode"}, r"^unknown aggregation rule 'mode'; expected one of"),
        ([torch.zeros(2)] * 2, {"rule": "weighted_mean"}, r"^rule 'weighted_mean' needs weights"),
        ([torch.zeros(2)] * 2, {"rule": "weighted_mean", "weights": [1.0]}, r"^got 1 weights for 2 vectors$"),
        (
            [torch.zeros(2)] * 2,
            {"rule": "weighted_mean", "weights": [1.0, -1.0]},
            r"^weights must be finite and >= 0, got \[1.0, -1.0\]$",
        ),
        ([torch.zeros(2)] * 2, {"rule": "weighted_mean", "weights": [0, 0]}, r"^weights sum to zero$"),
        (
            [torch.zeros(2)] * 2,
            {"rule": "mean", "weights": [1, 2]},
            r"^weights are only used by rule 'weighted_mean', not 'mean'$",
        ),
        ([torch.zeros(2)] * 2, {"trim_fraction": 0.5}, r"^trim_fraction must be in \[0, 0.5\), got 0.5$"),
        ([torch.ones(2)] * 2, {"clip_norm": 0.0}, r"^clip_norm must be a finite number > 0, got 0.0$"),
    ],
)
def test_aggregate_errors(vectors, kwargs, message):
    with pytest.raises(ValueError, match=message):
        aggregate(vectors, **kwargs)


# ---------------------------------------------------------------- central noise


def test_add_gaussian_noise_calibrated_std():
    n, clip = 10, 1.0
    sensitivity = mean_sensitivity(clip, n)
    assert sensitivity == pytest.approx(0.1)
    assert mean_sensitivity(clip, n, "replace") == pytest.approx(0.2)
    sigma = analytic_gaussian_sigma(1.0, 1e-5, sensitivity)
    agg = torch.full((4, 50_000), 0.5)
    noisy = add_gaussian_noise(agg, sigma, _gen(3))
    assert noisy.shape == agg.shape and noisy.dtype == agg.dtype
    assert float((noisy - agg).std()) == pytest.approx(sigma, rel=0.05)
    torch.testing.assert_close(add_gaussian_noise(agg, 0.0, _gen()), agg)
    with pytest.raises(ValueError, match=r"^sigma must be a finite number >= 0, got -1.0$"):
        add_gaussian_noise(agg, -1.0, _gen())
    with pytest.raises(ValueError, match=r"^n_vectors must be an int >= 1, got 0$"):
        mean_sensitivity(clip, 0)


# ---------------------------------------------------------------- LoRA factors


def _loras(n: int, r: int = 2, d_in: int = 6, d_out: int = 5):
    As = [torch.randn(r, d_in, generator=_gen(i), dtype=torch.float64) for i in range(n)]
    Bs = [torch.randn(d_out, r, generator=_gen(100 + i), dtype=torch.float64) for i in range(n)]
    return As, Bs


def test_stack_lora_factors_is_exact_mean():
    As, Bs = _loras(3)
    a_stack, b_stack = stack_lora_factors(As, Bs)
    assert a_stack.shape == (6, 6) and b_stack.shape == (5, 6)  # rank n * r = 6
    expected = torch.stack([b @ a for a, b in zip(As, Bs)]).mean(0)
    torch.testing.assert_close(b_stack @ a_stack, expected)
    # Averaging the factors separately has cross terms B_i A_j: not the mean product.
    naive = torch.stack(Bs).mean(0) @ torch.stack(As).mean(0)
    assert not torch.allclose(naive, expected, atol=1e-3)


def test_stack_lora_factors_weighted():
    As, Bs = _loras(3)
    weights = [10, 30, 60]
    a_stack, b_stack = stack_lora_factors(As, Bs, weights=weights)
    expected = sum(w / 100 * (b @ a) for w, a, b in zip(weights, As, Bs))
    torch.testing.assert_close(b_stack @ a_stack, expected)


def test_stack_lora_factors_errors():
    As, Bs = _loras(2)
    with pytest.raises(ValueError, match=r"^As is empty"):
        stack_lora_factors([], [])
    with pytest.raises(ValueError, match=r"^got 2 A factors but 1 B factors$"):
        stack_lora_factors(As, Bs[:1])
    with pytest.raises(ValueError, match=r"^LoRA 1: B \(5, 3\) and A \(2, 6\) have different ranks$"):
        stack_lora_factors(As, [Bs[0], torch.zeros(5, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"^LoRA 1: A \(2, 7\) and B \(5, 2\) do not match"):
        stack_lora_factors([As[0], torch.zeros(2, 7, dtype=torch.float64)], Bs)
    with pytest.raises(ValueError, match=r"^got 1 weights for 2 vectors$"):
        stack_lora_factors(As, Bs, weights=[1.0])

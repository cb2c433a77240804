import json
import math

import pytest
import torch

from gt_ray.privacy import (
    UNIT_OF_PRIVACY,
    VectorMechanism,
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    clip_l1,
    clip_l2,
    dp_sgd_epsilon,
    gaussian_delta,
    gaussian_epsilon,
    laplace_scale,
    privatize,
    vector_sensitivity,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- clipping, sensitivity


def test_clip_l2_bounds_norm_and_keeps_shape():
    v = torch.randn(4, 50, generator=_gen()) * 10  # (n_layers, d_layer)
    clipped, norm = clip_l2(v, 1.5)
    assert clipped.shape == v.shape and clipped.dtype == v.dtype
    assert norm == pytest.approx(float(v.norm()), rel=1e-6)
    assert float(clipped.norm()) == pytest.approx(1.5, rel=1e-6)
    # Clipping only rescales: the direction is unchanged.
    torch.testing.assert_close(clipped, v * (1.5 / norm))


def test_clip_leaves_short_vector_unchanged():
    v = torch.tensor([[0.3, -0.4]])
    clipped, norm = clip_l2(v, 1.0)
    torch.testing.assert_close(clipped, v)
    assert norm == pytest.approx(0.5)
    clipped1, norm1 = clip_l1(v, 1.0)
    torch.testing.assert_close(clipped1, v)
    assert norm1 == pytest.approx(0.7)


def test_clip_l1_bounds_l1_norm():
    v = torch.tensor([3.0, -1.0, 0.0, 4.0])
    clipped, norm = clip_l1(v, 2.0)
    assert norm == pytest.approx(8.0)
    torch.testing.assert_close(clipped, v / 4)


def test_replace_sensitivity_is_twice_add_remove():
    assert vector_sensitivity(0.7, "replace") == pytest.approx(2 * vector_sensitivity(0.7, "add_remove"))
    assert vector_sensitivity(0.7, "add_remove") == pytest.approx(0.7)
    mech = VectorMechanism(clip_norm=0.7, neighbouring="replace")
    assert mech.sensitivity == pytest.approx(1.4)
    with pytest.raises(ValueError, match=r"neighbouring must be one of \('replace', 'add_remove'\), got 'swap'"):
        vector_sensitivity(1.0, "swap")


# ---------------------------------------------------------------- Gaussian calibration


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 3.0, 8.0, 10.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-8])
def test_analytic_sigma_is_tight(epsilon, delta):
    sensitivity = 2.0
    sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)
    assert math.isfinite(sigma) and sigma > 0
    assert gaussian_delta(epsilon, sigma / sensitivity) <= delta
    # A slightly smaller sigma no longer meets delta: this is the smallest sigma.
    assert gaussian_delta(epsilon, sigma * (1 - 1e-6) / sensitivity) > delta
    # The inverse recovers epsilon.
    assert gaussian_epsilon(sigma, sensitivity, delta) == pytest.approx(epsilon, rel=1e-8)


def test_analytic_sigma_reference_value():
    # Balle & Wang (2018): epsilon=1, delta=1e-5, sensitivity=1 needs sigma ~= 3.73,
    # where the classic formula is not valid (and would give 4.84 at epsilon -> 1).
    assert analytic_gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(3.7306, abs=1e-3)


def test_analytic_sigma_scales_with_sensitivity():
    s1 = analytic_gaussian_sigma(2.0, 1e-5, 1.0)
    assert analytic_gaussian_sigma(2.0, 1e-5, 3.0) == pytest.approx(3 * s1, rel=1e-10)


@pytest.mark.parametrize("epsilon", [0.05, 0.5, 0.9])
def test_analytic_sigma_below_classic(epsilon):
    assert analytic_gaussian_sigma(epsilon, 1e-5, 1.0) < classic_gaussian_sigma(epsilon, 1e-5, 1.0)


def test_analytic_sigma_large_epsilon_decreasing():
    sigmas = [analytic_gaussian_sigma(eps, 1e-5, 1.0) for eps in (1.0, 2.0, 4.0, 8.0, 10.0, 50.0)]
    assert all(math.isfinite(s) and s > 0 for s in sigmas)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


def test_classic_sigma_refuses_large_epsilon():
    with pytest.raises(ValueError, match=r"only holds for epsilon < 1, got 1.0; use analytic_gaussian_sigma"):
        classic_gaussian_sigma(1.0, 1e-5, 1.0)


def test_calibration_bad_arguments():
    with pytest.raises(ValueError, match=r"^epsilon must be a finite number > 0, got 0$"):
        analytic_gaussian_sigma(0, 1e-5, 1.0)
    with pytest.raises(ValueError, match=r"^delta must satisfy 0 < delta < 1, got 0$"):
        analytic_gaussian_sigma(1.0, 0, 1.0)
    with pytest.raises(ValueError, match=r"^sensitivity must be a finite number > 0, got -1.0$"):
        analytic_gaussian_sigma(1.0, 1e-5, -1.0)


def test_gaussian_epsilon_zero_for_huge_noise():
    # 2 Phi(1/(2s)) - 1 <= delta: already (0, delta)-DP.
    assert gaussian_epsilon(1e7, 1.0, 1e-5) == 0.0


# ---------------------------------------------------------------- the mechanisms


def test_gaussian_mechanism_empirical_std():
    mech = VectorMechanism(kind="gaussian", epsilon=2.0, delta=1e-5, clip_norm=1.0)
    v = torch.zeros(4, 50_000)  # 200k coordinates
    noisy, report = privatize(v, mech, _gen(1))
    assert noisy.shape == v.shape and noisy.dtype == v.dtype
    assert report.sigma == pytest.approx(analytic_gaussian_sigma(2.0, 1e-5, 2.0))
    assert float(noisy.std()) == pytest.approx(report.sigma, rel=0.05)
    assert abs(float(noisy.mean())) < 0.05 * report.sigma


def test_laplace_mechanism_empirical_std():
    mech = VectorMechanism(kind="laplace", epsilon=1.0, delta=0.0, clip_norm=1.0)
    v = torch.zeros(200_000)
    noisy, report = privatize(v, mech, _gen(2))
    b = laplace_scale(1.0, 2.0)  # replace: L1 sensitivity 2 C
    assert report.laplace_scale == pytest.approx(b) and report.sigma is None
    assert float(noisy.std()) == pytest.approx(math.sqrt(2) * b, rel=0.05)
    assert report.delta == 0.0 and report.clip_norm_type == "l1"


def test_privatize_report_and_determinism():
    mech = VectorMechanism(epsilon=4.0, delta=1e-6, clip_norm=0.5, neighbouring="add_remove")
    v = torch.randn(3, 8, generator=_gen(3))
    noisy_a, report = privatize(v, mech, _gen(7))
    noisy_b, _ = privatize(v, mech, _gen(7))
    torch.testing.assert_close(noisy_a, noisy_b)
    assert report.clipped is True
    assert report.original_norm == pytest.approx(float(v.norm()), rel=1e-6)
    assert report.sensitivity == pytest.approx(0.5)
    assert report.neighbouring == "add_remove" and report.unit == UNIT_OF_PRIVACY
    d = report.to_dict()
    json.dumps(d)
    assert d["sigma"] == pytest.approx(analytic_gaussian_sigma(4.0, 1e-6, 0.5))


def test_privatize_rejects_non_finite():
    v = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"non-finite values"):
        privatize(v, VectorMechanism(), _gen())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "exponential"}, r"kind must be one of \('gaussian', 'laplace'\), got 'exponential'"),
        ({"epsilon": 0.0}, r"epsilon must be a finite number > 0, got 0.0"),
        ({"epsilon": float("inf")}, r"epsilon must be a finite number > 0, got inf"),
        ({"delta": 0.0}, r"delta must satisfy 0 < delta < 1 for the gaussian mechanism, got 0.0"),
        ({"delta": 1.0}, r"delta must satisfy 0 < delta < 1 for the gaussian mechanism, got 1.0"),
        (
            {"kind": "laplace", "delta": 1e-5},
            r"delta must be 0.0 for the laplace mechanism \(it is pure epsilon-DP\), got 1e-05",
        ),
        ({"clip_norm": -1.0}, r"clip_norm must be a finite number > 0, got -1.0"),
        ({"neighbouring": "swap"}, r"neighbouring must be one of \('replace', 'add_remove'\), got 'swap'"),
    ],
)
def test_vector_mechanism_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        VectorMechanism(**kwargs)


def test_laplace_config_with_zero_delta_is_valid():
    mech = VectorMechanism(kind="laplace", delta=0.0)
    assert mech.noise_scale() == pytest.approx(2.0)


# ---------------------------------------------------------------- DP-SGD accountant


# opacus warns about its non-secure RNG and a backward hook; both are expected here.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dp_sgd_epsilon_matches_opacus_privacy_engine():
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 5), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0
    )
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        steps += 1
    expected = engine.get_epsilon(1e-5)
    assert dp_sgd_epsilon(1 / 8, 1.1, steps, 1e-5) == pytest.approx(expected, rel=1e-9)


def test_dp_sgd_epsilon_monotone_and_validated():
    e1 = dp_sgd_epsilon(0.01, 1.0, 100, 1e-5)
    e2 = dp_sgd_epsilon(0.01, 1.0, 1000, 1e-5)
    e3 = dp_sgd_epsilon(0.01, 2.0, 1000, 1e-5)
    assert 0 < e1 < e2 and e3 < e2
    assert dp_sgd_epsilon(0.01, 1.0, 1000, 1e-5, accountant="prv") == pytest.approx(e2, rel=0.25)
    assert dp_sgd_epsilon(0.01, 1.0, 0, 1e-5) == 0.0
    with pytest.raises(ValueError, match=r"sample_rate must satisfy 0 < sample_rate <= 1, got 1.5"):
        dp_sgd_epsilon(1.5, 1.0, 10, 1e-5)
    with pytest.raises(ValueError, match=r"Unexpected accounting mechanism: nope"):
        dp_sgd_epsilon(0.1, 1.0, 10, 1e-5, accountant="nope")


def test_numpy_scalars_accepted():
    import numpy as np

    mech = VectorMechanism(epsilon=np.float32(2.0), clip_norm=np.float64(1.0))
    assert mech.noise_scale() == pytest.approx(analytic_gaussian_sigma(2.0, 1e-5, 2.0))

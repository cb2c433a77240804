"""gt_ray.rounds.update: closing arithmetic on its own: the translation's shape is checked,
robust rules resist one poisoned vector, central noise is calibrated on the clipped mean;
the adapter zip is reproducible."""

import zipfile

import pytest
import torch

from gt_ray.aggregate import mean_sensitivity
from gt_ray.privacy import analytic_gaussian_sigma
from gt_ray.rounds.spec import RoundSpec
from gt_ray.rounds.update import ZIP_DATE, compute_round_update, zip_directory
from tests.rounds_helpers import make_card, tiny_shape


@pytest.fixture(scope="module")
def card(tiny_path, gqa_path):
    return make_card(tiny_path, gqa_path)


def test_translation_of_the_wrong_shape_is_refused(card):
    with pytest.raises(ValueError, match=r"translate returned \(1, 2, 3\), expected a tensor of shape"):
        compute_round_update(RoundSpec(), [torch.zeros(*tiny_shape(card))], [1], lambda x: torch.zeros(1, 2, 3),
                             (card.llm.n_layers, card.llm.d_layer))


@pytest.mark.parametrize("rule, robust", [("mean", False), ("median", True), ("trimmed_mean", True)])
def test_robust_rules_resist_one_poisoned_submission(rule, robust):
    g = torch.Generator().manual_seed(0)
    center = torch.randn(2, 64, generator=g)
    honest = [center + 0.1 * torch.randn(2, 64, generator=g) for _ in range(4)]
    poisoned = 100 * honest[0]
    out = compute_round_update(RoundSpec(rule=rule, trim_fraction=0.2), honest + [poisoned], [1] * 5,
                               lambda x: x, (2, 64))
    error = float((out.update - center).norm() / center.norm())
    assert (error < 0.15) == robust, f"{rule}: relative error {error:.3f}"
    if not robust:
        assert error > 10  # one organization dragged the mean 20x its own size away


def test_central_noise_is_calibrated_on_the_clipped_mean(card):
    spec = RoundSpec(clip_norm=1.0, dp_epsilon=2.0, dp_delta=1e-5)
    vectors = [torch.randn(2, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    noisy = compute_round_update(spec, vectors, [1] * 4, lambda x: x, (2, 64), torch.Generator().manual_seed(1))
    clean = compute_round_update(RoundSpec(clip_norm=1.0), vectors, [1] * 4, lambda x: x, (2, 64))
    assert noisy.sigma == pytest.approx(analytic_gaussian_sigma(2.0, 1e-5, mean_sensitivity(1.0, 4)))
    assert float((noisy.update - clean.update).std()) == pytest.approx(noisy.sigma, rel=0.2)


def test_zip_directory_is_reproducible_flat_and_leaves_no_temporary_file(tmp_path):
    src = tmp_path / "adapter"
    (src / "nested").mkdir(parents=True)
    (src / "b.json").write_text('{"r": 2}\n')
    (src / "a.safetensors").write_bytes(bytes(range(256)) * 8)
    zip_directory(src, tmp_path / "one.zip")
    zip_directory(src, tmp_path / "two.zip")
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "one.zip") as z:
        assert z.namelist() == ["a.safetensors", "b.json"]
        assert all(i.date_time == ZIP_DATE for i in z.infolist())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "one.zip", "two.zip"]

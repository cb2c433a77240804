"""The organization's private fine-tune: the vector file, DP-SGD, the model check, and the
vector mechanism with its ledger."""

from __future__ import annotations

import pytest
import torch

from gt_ray.config import DPConfig
from gt_ray.org import finetune as org_ft
from gt_ray.org.data import parse_generated_spec
from gt_ray.privacy import VectorMechanism
from gt_ray.privacy_ledger import BudgetExceededError, PrivacyLedger
from gt_ray.wire import load_update
from tests.org_fixtures import CFG, DATA, card_path, vector_file  # noqa: F401  (fixtures)


def test_finetune_writes_a_valid_vector_for_the_card(card_path, vector_file):
    from gt_ray.models import PairCard

    card = PairCard.load(card_path)
    update, meta = load_update(vector_file, expected_fingerprint=card.tiny.layout_fingerprint)
    assert update.shape == (card.tiny.n_layers, card.tiny.d_layer) and float(update.abs().max()) > 0
    assert meta["card_id"] == card.card_id and meta["fingerprint"] == card.tiny.layout_fingerprint
    assert (meta["n_examples"], meta["steps"], meta["seed"], meta["org_id"]) == (32, 8, 0, "acme")
    assert meta["dp_sgd"] == {"dp": False} and meta["vector_mechanism"] is None
    assert meta["data"] == {"kind": "generated", "split": "private_train"}


def test_a_dataset_spec_gives_the_same_vector_as_its_text(card_path, vector_file, tmp_path):
    path, _ = org_ft.finetune_org(card_path, parse_generated_spec(DATA), tmp_path / "v.safetensors", cfg=CFG,
                                  org_id="acme", round_id="r1", seed=0)
    # safetensors writes its metadata map in no fixed order: compare the contents, not the bytes
    (a, meta_a), (b, meta_b) = load_update(path), load_update(vector_file)
    assert torch.equal(a, b) and meta_a == meta_b


def test_dp_finetune_records_spent_epsilon_and_withholds_the_seed(card_path, tmp_path):
    dp = DPConfig(enabled=True, target_epsilon=4.0, delta=1e-3)
    path, meta = org_ft.finetune_org(card_path, DATA, tmp_path / "v.safetensors", cfg=CFG, dp=dp, seed=1)
    _, stored = load_update(path)
    sgd = stored["dp_sgd"]
    assert sgd["dp"] and sgd["privacy_unit"] == "example" and sgd["target_epsilon"] == 4.0
    assert sgd["epsilon"] == pytest.approx(4.0, rel=0.05) and sgd["delta"] == 1e-3
    assert stored["seed"] is None and stored["seed_withheld"] is True
    with pytest.raises(ValueError, match=r"delta=0.1 must be below 1/n_examples"):
        org_ft.finetune_org(card_path, DATA, tmp_path / "w.safetensors", cfg=CFG,
                            dp=DPConfig(enabled=True, target_epsilon=4.0, delta=0.1), seed=1)


def test_model_that_differs_from_the_card_is_refused(card_path, gqa_path, tmp_path):
    with pytest.raises(ValueError, match=r"refusing the TinyLM at .*: it does not match pair card .*weights sha256"):
        org_ft.finetune_org(card_path, DATA, tmp_path / "v.safetensors", model_path=gqa_path, cfg=CFG, seed=0)
    with pytest.raises(ValueError, match="no Hugging Face model directory at"):
        org_ft.finetune_org(card_path, DATA, tmp_path / "v.safetensors", model_path=tmp_path, cfg=CFG, seed=0)
    assert not (tmp_path / "v.safetensors").exists()


def test_vector_mechanism_spends_the_ledger_and_refuses_over_budget(card_path, tmp_path):
    ledger_path = tmp_path / "ledger.json"
    mech = VectorMechanism(kind="gaussian", epsilon=1.5, delta=1e-6, clip_norm=0.5)
    ledger = org_ft.open_ledger(ledger_path, eps_budget=2.0, delta_budget=1e-5)
    path, meta = org_ft.finetune_org(card_path, DATA, tmp_path / "r1.safetensors", cfg=CFG, vector=mech, ledger=ledger,
                                     org_id="acme", round_id="r1", seed=3)
    rep = meta["vector_mechanism"]
    assert rep["unit"] == "organization" and rep["epsilon"] == 1.5 and rep["sigma"] > 0
    assert "original_norm" not in rep and "clipped" not in rep  # not private: kept local
    assert meta["seed"] is None
    spent = PrivacyLedger(ledger_path, 2.0, 1e-5).spent("acme")
    assert (spent.epsilon, spent.n_releases) == (1.5, 1)

    # A second release of 1.5 would reach 3.0 > 2.0: refused before anything is trained or drawn.
    with pytest.raises(BudgetExceededError, match="privacy budget exceeded for organization 'acme'"):
        org_ft.finetune_org(card_path, DATA, tmp_path / "r2.safetensors", cfg=CFG, vector=mech, ledger=ledger,
                            org_id="acme", round_id="r2", seed=4)
    assert not (tmp_path / "r2.safetensors").exists()
    assert PrivacyLedger(ledger_path, 2.0, 1e-5).spent("acme").n_releases == 1
    with pytest.raises(ValueError, match="already released a vector for round 'r1'"):
        org_ft.finetune_org(card_path, DATA, tmp_path / "again.safetensors", cfg=CFG, vector=mech, ledger=ledger,
                            org_id="acme", round_id="r1", seed=4)
    with pytest.raises(ValueError, match="needs a ledger, an org_id and a round_id"):
        org_ft.finetune_org(card_path, DATA, tmp_path / "x.safetensors", cfg=CFG, vector=mech, seed=4)

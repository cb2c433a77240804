"""The fine-tune recipe travels with the pair card; organizations follow it by default."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gt_ray.config import ExperimentConfig, FinetuneConfig, LoraSpec, PairConfig
from gt_ray.models import PairCard, make_pair_card, recipe_of
from gt_ray.org.finetune import finetune_org, load_org_model
from gt_ray.wire import load_update
from jobs import org as org_cli
from tests.conftest import tiny_spec

DATA = "generated:k=3,mix=caesar:0.5/add:0.5,n=32,seed=7"
FT = FinetuneConfig(lr=5e-3, steps=6, batch_size=4, n_examples=32, snapshot_steps=[4, 6])


@pytest.fixture(scope="module")
def pair():
    lora = LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)
    return PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=lora)


@pytest.fixture(scope="module")
def card(pair, tiny_path, gqa_path) -> PairCard:
    return make_pair_card(pair, tiny_path, gqa_path, recipe=recipe_of(ExperimentConfig(pair=pair, finetune=FT)))


def test_card_records_the_recipe_and_old_cards_keep_their_id(card, pair, tiny_path, gqa_path, tmp_path):
    assert card.recipe == {"steps": 6, "lr": 5e-3, "batch_size": 4, "weight_decay": 0.0, "n_examples": 32,
                           "snapshot_steps": [4, 6], "dtype": "float32"}
    plain = make_pair_card(pair, tiny_path, gqa_path)
    assert plain.recipe is None and plain.recipe_fingerprint is None
    legacy = plain.to_dict()
    del legacy["recipe"]  # a card written before recipes existed
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    assert PairCard.load(tmp_path / "old.json").card_id == plain.card_id
    assert card.card_id != plain.card_id  # the recipe is part of the card's identity
    assert PairCard.load(card.save(tmp_path / "card.json")) == card
    other = dataclasses.replace(card, recipe={**card.recipe, "lr": 1e-2})
    assert other.recipe_fingerprint != card.recipe_fingerprint


def test_org_finetune_follows_the_card_recipe(card, tmp_path):
    path, meta = finetune_org(card, DATA, tmp_path / "v.safetensors", seed=0)
    assert (meta["steps"], meta["lr"], meta["batch_size"]) == (6, 5e-3, 4)
    assert meta["recipe_fingerprint"] == card.recipe_fingerprint and meta["recipe_mismatch"] is False
    update, stored = load_update(path, expected_fingerprint=card.tiny.layout_fingerprint)
    assert stored["recipe_fingerprint"] == card.recipe_fingerprint and float(update.norm()) > 0


def test_a_different_recipe_is_refused_unless_allowed(card, tmp_path):
    other = FinetuneConfig(lr=1e-2, steps=6, batch_size=4, snapshot_steps=[6])
    with pytest.raises(ValueError, match=r"fine-tune recipe differs from pair card .*: lr 0\.01 \(card: 0\.005\); "
                                         r"pass --allow-recipe-mismatch"):
        finetune_org(card, DATA, tmp_path / "v.safetensors", cfg=other, seed=0)
    assert not (tmp_path / "v.safetensors").exists()
    _, meta = finetune_org(card, DATA, tmp_path / "v.safetensors", cfg=other, seed=0, allow_recipe_mismatch=True)
    assert meta["lr"] == 1e-2 and meta["recipe_mismatch"] is True
    assert meta["recipe_fingerprint"] != card.recipe_fingerprint


def test_cli_uses_the_recipe_and_refuses_a_mismatch_in_one_line(card, tmp_path, capsys):
    card_path = card.save(tmp_path / "card.json")
    base = ["finetune", "--card", str(card_path), "--data", DATA, "--seed", "0"]
    with pytest.raises(SystemExit) as exit_:
        org_cli.main([*base, "--out", str(tmp_path / "a.safetensors"), "--batch-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("error: fine-tune recipe differs from pair card")
    assert "batch_size 8 (card: 4)" in err[-1]
    org_cli.main([*base, "--out", str(tmp_path / "b.safetensors")])
    out = capsys.readouterr().out
    assert "steps=6" in out and f"recipe_fingerprint={card.recipe_fingerprint}" in out
    org_cli.main([*base, "--out", str(tmp_path / "c.safetensors"), "--batch-size", "8", "--allow-recipe-mismatch"])
    assert "recipe_mismatch=True" in capsys.readouterr().out


def test_the_tinylm_is_loaded_in_the_card_dtype(card):
    bf16 = dataclasses.replace(card, recipe={**card.recipe, "dtype": "bfloat16"})
    lm = load_org_model(bf16)
    assert next(lm.model.parameters()).dtype == torch.bfloat16

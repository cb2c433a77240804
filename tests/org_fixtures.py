"""The organization tests' shared world: a pair card of two tiny models, and one update
vector fine-tuned on generated data (import the fixtures into a test module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gt_ray.config import FinetuneConfig, PairConfig
from gt_ray.models import make_pair_card
from gt_ray.org.finetune import finetune_org
from tests.conftest import tiny_spec

CFG = FinetuneConfig(lr=3e-3, steps=8, batch_size=8, snapshot_steps=[4, 8])
DATA = "generated:k=3,mix=caesar:0.5/add:0.5,n=32,seed=7"


@pytest.fixture(scope="module")
def card_path(tiny_path, gqa_path, tmp_path_factory) -> Path:
    from gt_ray.config import LoraSpec

    lora = LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=lora)
    return make_pair_card(pair, tiny_path, gqa_path).save(tmp_path_factory.mktemp("card") / "card.json")


@pytest.fixture(scope="module")
def vector_file(card_path, tmp_path_factory) -> Path:
    path, _ = finetune_org(card_path, DATA, tmp_path_factory.mktemp("vec") / "v.safetensors", cfg=CFG,
                           org_id="acme", round_id="r1", seed=0)
    return path

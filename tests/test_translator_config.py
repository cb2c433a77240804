"""Tests for gt_ray.translator.config: pure dataclasses, no model code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gt_ray.translator.config import LAYOUT_FIELDS, TrainConfig, TranslatorConfig
from tests.translator_helpers import tiny_config


def test_config_dict_round_trip():
    cfg = tiny_config(num_decoder_layers=3, normalization="global")
    assert TranslatorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    train = TrainConfig(lr=1e-3, warmup=5, grad_clip=None)
    assert TrainConfig.from_dict(train.to_dict()) == train


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30}, "not divisible by num_heads"),
        ({"L_llm": 0}, "L_llm must be a positive int"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"normalization": "batch"}, "normalization must be one of"),
        ({"feed_forward_proj": "fancy-gelu"}, "feed_forward_proj"),
        ({"input": "logits"}, "input must be one of"),
        ({"behaviour_rows": 0}, "behaviour_rows must be a positive int"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="TrainConfig.lr must be > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="TrainConfig.patience must be >= 1"):
        TrainConfig(patience=0)


def test_layouts_are_filled_in_later():
    cfg = TranslatorConfig(d_model=32, num_heads=4)
    assert not cfg.has_layouts and all(getattr(cfg, name) is None for name in LAYOUT_FIELDS)
    with pytest.raises(ValueError, match=r"needs the vector layouts \['d_tiny', 'L_tiny', 'd_llm', 'L_llm'\]"):
        cfg.require_layouts()
    full = cfg.with_layouts(d_tiny=16, L_tiny=2, d_llm=40, L_llm=5)
    assert full.has_layouts and full.d_model == 32 and (full.L_tiny, full.d_llm) == (2, 40)
    with pytest.raises(ValueError, match="d_llm must be a positive int"):
        cfg.with_layouts(d_tiny=16, L_tiny=2, d_llm=0, L_llm=5)


def test_importing_the_configs_loads_no_model_code():
    code = ("import sys, gt_ray.translator.config\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
            " or m == 'gt_ray.translator.model'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

"""The pair report: per task, and on organization-like mixtures (the conditioning check)."""

from pathlib import Path

import pytest

from gt_ray.config import PairConfig, load_yaml
from gt_ray.models import make_pair_card
from jobs import prepare_pair

ROOT = Path(__file__).resolve().parents[1]


def test_report_scores_tasks_and_mixtures_on_both_models(tiny_path, gqa_path, lora, tmp_path):
    cfg = load_yaml(ROOT / "configs/ci.yaml")
    card = make_pair_card(PairConfig(tiny=cfg.pair.tiny, llm=cfg.pair.llm, lora=lora), tiny_path, gqa_path)
    rep = prepare_pair.report(cfg, card, n_datasets=1, n_test=20, task_names=["add"], n_mixtures=2)
    assert set(rep["tasks"]) == {"add"} and set(rep["tasks"]["add"]) == {"tiny", "llm"}
    m = rep["mixtures"]
    assert m["n"] == 2 and len(m["rows"]) == 2
    assert m["gap"] == pytest.approx(m["llm_ft"] - m["tiny_ft"])
    assert all(0 <= r[k] <= 1 for r in m["rows"] for k in ("tiny_ft", "llm_ft"))
    assert all(w >= 0.1 for r in m["rows"] for w in r["mixture"].values())
    assert "organization-like mixtures" in prepare_pair.format_report(rep)
    assert "mixtures" not in prepare_pair.report(cfg, card, n_datasets=1, n_test=10, task_names=["add"])

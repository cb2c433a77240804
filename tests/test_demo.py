"""The main job, reduced (configs/ci.yaml), end to end on a local Ray cluster; then a rerun
that reuses every stage."""

import json
from pathlib import Path

import pytest
import yaml

from jobs import demo

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def ci_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    data = yaml.safe_load((ROOT / "configs/ci.yaml").read_text())
    data["work_dir"] = str(tmp / "work")
    data["cache_dir"] = str(tmp / "cache")
    path = tmp / "ci.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, tmp / "work"


def test_demo_runs_end_to_end_and_reuses_its_stages(ray_cluster, ci_config, capsys):
    path, work = ci_config
    demo.main(["--config", str(path)])
    results = json.loads((work / "results.json").read_text())
    for method in ("llm_base", "tiny_ft", "llm_ft", "grad_transformer", "mean_shadow", "ridge", "nearest_neighbour",
                   "proxy_tuning"):
        r = results["methods"][method]
        assert 0 <= r["accuracy"] <= 1 and r["nll"] > 0
    assert set(results["multi_org"]) >= {"agg_then_translate", "translate_then_agg"}
    assert (work / "results.png").stat().st_size > 1000
    assert (work / "training_curves.png").stat().st_size > 1000
    assert (work / "translator_best.yaml").is_file()
    first = capsys.readouterr().out
    assert "stage=sweep status=done" in first
    demo.main(["--config", str(path)])
    second = capsys.readouterr().out
    assert "stage=translator status=cached" in second
    assert "stage=sweep" not in second and "pretrain" not in second
    assert "built=" not in second  # no corpus subset was fine-tuned again

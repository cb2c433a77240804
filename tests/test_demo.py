"""The main job, reduced (configs/ci.yaml), end to end on a local Ray cluster; then a rerun
that reuses every stage, and one with a changed evaluation key that re-runs only the evaluation."""

import json

import pytest
import yaml

from jobs import demo
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def ci_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    data = yaml.safe_load((ROOT / "configs/ci.yaml").read_text())
    data["work_dir"] = str(tmp / "work")
    data["cache_dir"] = str(tmp / "cache")
    # Fewer pretraining steps and translator epochs: the test checks the pipeline's shape and
    # caching, not how well 60 steps train (~40 s of the suite on 2 cores).
    for side in ("tiny", "llm"):
        data["pair"][side]["pretrain"].update(steps=12, warmup_steps=2)
    data["translator"]["train"]["max_epochs"] = 2
    data["sweep"]["max_epochs"] = 2
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
    # the protocol: train / validation / test subsets disjoint, test only reported, epochs on val answer NLL
    meta = json.loads((work / "translator" / "translator.json").read_text())["metadata"]
    held = json.loads((work / "translator_eval.json").read_text())
    train, val, test = set(meta["train_subsets"]), set(meta["val_subsets"]), set(held["test_subsets"])
    assert train and val and test and not (train & val or train & test or val & test)
    assert meta["selected_on"] == "val_answer_nll"
    from gt_ray.translator.checkpoint import NORM_BOUND_FILE, load_norm_bound

    assert load_norm_bound(work / "translator") is not None  # the service's input-norm bound travels with it
    assert (work / "translator" / NORM_BOUND_FILE).is_file()
    assert held["groups"]["seen"]["n_subsets"] + held["groups"]["unseen"]["n_subsets"] == len(test)
    # TinyLM-only shadow subsets train the translator beside the paired ones
    manifest = json.loads((work / "corpus" / "manifest.json").read_text())
    assert (manifest["n_subsets"], manifest["n_tiny_only_subsets"]) == (6, 6)
    assert any(i >= 100_000 for i in train) and any(i < 100_000 for i in train)
    # two translator training seeds: a checkpoint each, every organization scored with both
    assert held["translator_seeds"] == [0, 1] and set(held["translator_seed_accuracy"]) == {"0", "1"}
    assert (work / "translator-seed1" / "translator.json").is_file()
    for org in (o for s in results["per_seed"].values() for o in s["orgs"]):
        by_seed = org["accuracy_by_translator_seed"]["grad_transformer"]
        assert set(by_seed) == {"0", "1"}
        assert org["accuracy"]["grad_transformer"] == pytest.approx(sum(by_seed.values()) / 2)
    assert results["org_report"]["groups"]["all"]["translator_seed_spread"]["grad_transformer"]["n_seeds"] == 2
    assert results["provenance"]["git_commit"] and results["provenance"]["config"]["translator"]["seeds"] == [0, 1]
    counts = results["counts"]
    assert counts["n"] == len(results["seeds"]) * results["n_orgs"]
    assert sum(g["n_orgs"] for g in results["groups"].values()) == counts["n"]
    assert results["groups"]["seen"]["n_orgs"] >= 1  # eval.seen_fraction: 0.5 of 2 organizations
    m = results["methods"]
    gap = m["llm_ft"]["accuracy"] - m["tiny_ft"]["accuracy"]
    if gap:
        assert m["grad_transformer"]["pgr_accuracy"] == pytest.approx(
            (m["grad_transformer"]["accuracy"] - m["tiny_ft"]["accuracy"]) / gap)
    first = capsys.readouterr().out
    assert "stage=sweep status=done" in first
    assert {r["status"] for r in results["stages"].values()} == {"ran"}
    assert set(results["stages"]) == set(demo.STAGES)

    # a rerun over the same work_dir: every stage cached, the same results, no service started
    demo.main(["--config", str(path)])
    second = capsys.readouterr().out
    again = json.loads((work / "results.json").read_text())
    for name in demo.STAGES:
        assert f"stage=demo step={name} status=cached" in second
    assert {r["status"] for r in again["stages"].values()} == {"cached"}
    # the computing run's stage usage survives a cached rerun, marked as such
    assert set(again["stage_usage"]) == set(results["stage_usage"]) == set(demo.STAGES)
    for name, usage in again["stage_usage"].items():
        assert usage["cached"] is True
        assert usage["cpu_seconds"] == results["stage_usage"][name]["cpu_seconds"]
    assert "stage=sweep" not in second and "pretrain" not in second and "stage=serve" not in second
    assert "built=" not in second  # no corpus subset was fine-tuned again
    assert _results(again) == _results(results)
    assert again["total_seconds"] < 60
    assert json.loads((work / "translator_eval.json").read_text()) == held

    # one changed eval key: only the evaluation re-runs (through the service), and says why
    data = yaml.safe_load(path.read_text())
    data["eval"]["n_test"] = 20
    changed = path.with_name("ci-n_test.yaml")
    changed.write_text(yaml.safe_dump(data))
    demo.main(["--config", str(changed)])
    third = capsys.readouterr().out
    assert "stage=demo step=eval status=rerun changed=eval.n_test" in third
    rerun = json.loads((work / "results.json").read_text())
    assert {n: r["status"] for n, r in rerun["stages"].items()} == {**{n: "cached" for n in demo.STAGES}, "eval": "ran"}
    assert rerun["n_test"] == 20 and rerun["service_round"] == results["service_round"]

    # --rerun translator retrains although the checkpoints' keys match (after a code change);
    # the same code retrains the same weights, so nothing downstream re-runs
    demo.main(["--config", str(changed), "--rerun", "translator"])
    fourth = capsys.readouterr().out
    assert "stage=demo step=translator status=rerun changed=forced" in fourth
    assert "stage=translator status=cached" not in fourth
    forced = json.loads((work / "results.json").read_text())
    assert {n: r["status"] for n, r in forced["stages"].items()} == {**{n: "cached" for n in demo.STAGES}, "translator": "ran"}


def _results(results: dict) -> str:
    """What a run computed (not how long it took, nor where it was cached)."""
    kept = {k: v for k, v in results.items()
            if k not in ("stages", "stage_seconds", "stage_usage", "total_seconds", "provenance")}
    return json.dumps(kept, sort_keys=True)  # as text: NaN == NaN

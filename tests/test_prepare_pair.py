"""The pair report: per task, and on organization-like mixtures (the conditioning check)."""

import pytest

from gt_ray.config import PairConfig, load_yaml
from gt_ray.models import make_pair_card
from jobs import prepare_pair
from tests.conftest import ROOT


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
    assert {side: m["weights_sha256"] for side, m in rep["models"].items()} == {"tiny": card.tiny.weights_sha256,
                                                                                "llm": card.llm.weights_sha256}
    assert rep["provenance"]["config"]["pair"]["lora"] == cfg.pair.lora.__dict__ and "git_commit" in rep["provenance"]
    assert "mixtures" not in prepare_pair.report(cfg, card, n_datasets=1, n_test=10, task_names=["add"])


def test_prepare_derives_the_tinylm_from_the_llm_and_reports_it(tmp_path):
    """`pair prepare` with a family TinyLM: cut from the config's LLM, healed, cached, its
    recipe in the card; the report names how it was made and both models share a vocabulary."""
    from dataclasses import replace

    from gt_ray.config import HealConfig, ModelSpec
    from gt_ray.evaluate import shares_vocabulary
    from gt_ray.models import load_card_side

    cfg = load_yaml(ROOT / "configs/ci.yaml")
    tiny = ModelSpec(derive_from=cfg.pair.llm, keep_layers=[2],
                     heal=HealConfig(steps=10, lr=3e-3, batch_size=8, warmup_steps=1, num_threads=1))
    cfg = replace(cfg, pair=replace(cfg.pair, tiny=tiny), work_dir=str(tmp_path / "work"), cache_dir=str(tmp_path / "cache"))
    card = prepare_pair.prepare(cfg)
    assert (card.tiny.n_layers, card.llm.n_layers) == (1, 3)
    assert card.tiny.build["keep_layers"] == [2] and card.tiny.build["derived_from"]["weights_sha256"] == card.llm.weights_sha256
    assert prepare_pair.load_or_prepare_card(cfg) == card  # cached: the same models, the same card
    assert shares_vocabulary(load_card_side(card, "tiny").tokenizer, load_card_side(card, "llm").tokenizer)
    rep = prepare_pair.report(cfg, card, n_datasets=1, n_test=10, task_names=["add"])
    assert rep["models"]["tiny"]["derived"]["keep_layers"] == [2]
    assert "layers [2] of the LLM's 3, healed 10 steps" in prepare_pair.format_report(rep)


def test_report_with_no_single_task_datasets_reports_mixtures_only(tiny_path, gqa_path, lora):
    cfg = load_yaml(ROOT / "configs/ci.yaml")
    card = make_pair_card(PairConfig(tiny=cfg.pair.tiny, llm=cfg.pair.llm, lora=lora), tiny_path, gqa_path)
    rep = prepare_pair.report(cfg, card, n_datasets=0, n_test=10, n_mixtures=1)
    assert rep["tasks"] == {} and rep["mixtures"]["n"] == 1
    assert "organization-like mixtures" in prepare_pair.format_report(rep)


def test_a_layer_the_llm_lacks_is_one_error_line(tmp_path, capsys):
    import yaml

    from jobs.common import run_main

    data = yaml.safe_load((ROOT / "configs/ci.yaml").read_text())
    data["pair"]["llm"]["pretrain"].update(steps=1, warmup_steps=0)  # the LLM is pretrained before it is cut
    data["pair"]["tiny"] = {"derive_from": data["pair"]["llm"], "keep_layers": [0, 7]}
    data.update(cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "work"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert run_main(prepare_pair.main, ["prepare", "--config", str(bad)]) == 2
    assert "error: pair.tiny: keep_layers [7] out of range: the model has 3 layers (0..2)" in capsys.readouterr().err


def test_report_probes_secrets_and_judges_the_world_criteria(tiny_path, gqa_path, lora):
    cfg = load_yaml(ROOT / "configs/ci.yaml")
    card = make_pair_card(PairConfig(tiny=cfg.pair.tiny, llm=cfg.pair.llm, lora=lora), tiny_path, gqa_path)
    rep = prepare_pair.report(cfg, card, n_datasets=1, n_test=10, n_mixtures=1, n_probe_train=6, n_probe_test=3)
    probes = rep["probes"]["tasks"]
    assert set(probes) == set(cfg.tasks.names) and rep["probes"]["n_test"] == 3
    assert all(p["n_test"] <= 3 and (p["n_test"] == 0 or 0 <= p["behavioural"] <= 1) for p in probes.values())
    crit = rep["criteria"]
    assert set(crit["tasks"]) == set(cfg.tasks.names) and "pass" in crit["orgs"]
    assert all(row["distinct"]["pass"] for row in crit["tasks"].values())
    assert rep["models"]["tiny"]["finetune_seconds"] > 0
    assert "World criteria" in prepare_pair.format_report(rep)


def test_pretrain_seeds_change_both_seeds_and_the_work_dir():
    cfg = prepare_pair.with_pretrain_seeds(load_yaml(ROOT / "configs/ci.yaml"), 11, 12)
    assert (cfg.pair.tiny.pretrain.seed, cfg.pair.llm.pretrain.seed) == (11, 12)
    assert cfg.work_dir == "runs/ci/pretrain-seeds-11-12"


def _model_row(params: int, layout: list[int], sha: str | None, seconds: float | None) -> dict:
    return {"params": params, "layout": layout, "weights_sha256": sha, "built": "pretrained" if seconds else None,
            "pretrain_seconds": seconds, "pretrain_final_loss": None, "pretrain_seed": 1, "finetune_seconds": None}


def test_format_report_lists_both_models_and_leaves_out_an_empty_task_table():
    """A mixtures-only report (--n-datasets 0, written with sorted keys: llm first) prints the
    TinyLM then the LLM with their weights hashes, and no task table of a header only."""
    rep = {"card_id": "c", "tasks": {}, "n_datasets_per_task": 0, "n_test": 10,
           "models": {"llm": _model_row(796544, [3, 1024], None, None),
                      "tiny": _model_row(35232, [2, 256], "7f4d11b1f9093bdfd7aa5f132c87445d", 81.3)},
           "mixtures": {"n": 2, "tiny_ft": 0.5, "llm_ft": 0.9, "gap": 0.4, "llm_ft_min": 0.8, "llm_ft_below_0.5": 0}}
    lines = prepare_pair.format_report(rep).splitlines()
    assert lines[2:4] == ["| TinyLM | 35,232 | 2 x 256 | 7f4d11b1f909 | pretrained 81.3 s |",
                          "| LLM | 796,544 | 3 x 1024 | - | - (pretrained elsewhere) |"]
    assert not any(line.startswith("| task |") for line in lines)
    assert lines[-1].startswith("On 2 organization-like mixtures: TinyLM ft 0.500, LLM ft 0.900")
    rep["tasks"] = {"add": {side: {"k_shown": 1.0, "hidden_before": 0.1, "hidden_after_ft": 0.9} for side in ("tiny", "llm")}}
    assert "| add | 1.000 | 0.100 | 0.900 | 1.000 | 0.100 | 0.900 |" in prepare_pair.format_report(rep).splitlines()


def test_concurrent_pretraining_gives_the_serial_bytes_and_names_a_failing_side(tmp_path, capsys):
    """Both models pretrained at once, one spawned process each: the same weights (and so the
    same card id, wherever the cache lies) as one after the other in this process, a progress
    line from each process, and an error in one process is one error naming its side."""
    from dataclasses import replace

    from jobs.common import UserError
    from tests.conftest import tiny_spec

    cfg = load_yaml(ROOT / "configs/ci.yaml")

    def pair_of(tiny, llm):
        one_thread = {side: replace(spec, pretrain=replace(spec.pretrain, num_threads=1)) for side, spec in
                      (("tiny", tiny), ("llm", llm))}
        return replace(cfg.pair, **one_thread)

    pair = pair_of(tiny_spec(steps=4), tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96, steps=4))
    serial = prepare_pair.prepare(replace(cfg, pair=pair, cache_dir=str(tmp_path / "a"), work_dir=str(tmp_path / "a")),
                                  concurrent=False)
    capsys.readouterr()
    both = prepare_pair.prepare(replace(cfg, pair=pair, cache_dir=str(tmp_path / "b"), work_dir=str(tmp_path / "b")))
    out = capsys.readouterr().out
    assert (both.tiny.weights_sha256, both.llm.weights_sha256) == (serial.tiny.weights_sha256, serial.llm.weights_sha256)
    assert both.card_id == serial.card_id and both.tiny.path != serial.tiny.path
    assert "stage=pretrain model=tiny step=4/4" in out and "stage=pretrain model=llm step=4/4" in out

    bad = tiny_spec(steps=4)
    bad = replace(bad, arch={**bad.arch, "model_type": "no-such-model"})
    with pytest.raises(UserError, match="^pair.llm: Unrecognized model identifier: no-such-model"):
        prepare_pair.prepare(replace(cfg, pair=pair_of(tiny_spec(steps=4), bad), cache_dir=str(tmp_path / "c"),
                                     work_dir=str(tmp_path / "c")))

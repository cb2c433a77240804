"""The demo's stage cache (jobs/demo.py): the dependency table, fingerprints, stamps and the
corpus' stale shards, without Ray."""

import dataclasses
from pathlib import Path

import pytest

from gt_ray.config import ExperimentConfig, load_yaml
from gt_ray.yaml_io import from_dict
from jobs import demo
from jobs.common import UserError
from tests.conftest import ROOT

AFTER_TRANSLATOR = ["translator", "translator_eval", "service_round", "eval"]


@pytest.fixture
def cfg(tmp_path) -> ExperimentConfig:
    return dataclasses.replace(load_yaml(ROOT / "configs/ci.yaml"), work_dir=str(tmp_path / "work"))


def with_key(cfg: ExperimentConfig, key: str, value) -> ExperimentConfig:
    data = dataclasses.asdict(cfg)
    *path, last = key.split(".")
    node = data
    for part in path:
        node = node[part]
    node[last] = value
    return from_dict(ExperimentConfig, data)


def stale(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Stages whose own inputs differ, and every stage downstream of one (its output may change)."""
    direct = [s for s in demo.STAGES if demo.stage_values(s, old) != demo.stage_values(s, new)]
    return [s for s in demo.STAGES if s in direct or any(s in demo.downstream(d) for d in direct)]


@pytest.mark.parametrize("key, value, expected", [
    ("eval.n_test", 41, ["eval"]),
    ("eval.kd", ["sequence"], ["eval"]),
    ("eval.n_orgs", 3, ["service_round", "eval"]),
    ("eval.num_threads", 1, []),
    ("finetune.num_threads", 2, []),
    ("corpus.num_workers", 1, []),
    ("translator.num_workers", 1, []),
    ("sweep.cpus_per_trial", 0.5, []),
    ("translator.train.lr", 3e-3, AFTER_TRANSLATOR),  # searched by the sweep: the sweep does not care
    ("translator.train.patience", 2, ["sweep", *AFTER_TRANSLATOR]),
    ("sweep.num_samples", 3, ["sweep", *AFTER_TRANSLATOR]),
    ("translator.seeds", [0], AFTER_TRANSLATOR),
    ("translator.test_fraction", 0.3, ["sweep", *AFTER_TRANSLATOR]),
    ("seed", 1, ["sweep", *AFTER_TRANSLATOR]),
    ("corpus.n_subsets", 7, ["corpus", "sweep", *AFTER_TRANSLATOR]),
    ("tasks.dirichlet_alpha", 0.3, ["corpus", "sweep", *AFTER_TRANSLATOR]),
    ("finetune.lr", 1e-3, list(demo.STAGES)),  # in the card's recipe
    ("pair.llm.pretrain.steps", 61, list(demo.STAGES)),
    ("pair.llm.pretrain.num_threads", 1, []),
])
def test_one_changed_key_invalidates_exactly_the_stages_that_read_it(cfg, key, value, expected):
    assert stale(cfg, with_key(cfg, key, value)) == expected


def test_a_searched_key_the_sweeps_best_config_sets_changes_nothing(cfg):
    work = Path(cfg.work_dir)
    work.mkdir(parents=True)
    (work / "translator_best.yaml").write_text("# comment\nmodel: {d_model: 16}\ntrain: {lr: 0.002, batch_size: 4}\n")
    assert demo.stage_values("translator", cfg)["translator.train.lr"] == 0.002
    assert stale(cfg, with_key(cfg, "translator.train.lr", 3e-3)) == []
    assert stale(cfg, with_key(cfg, "translator.train.patience", 2)) == ["sweep", *AFTER_TRANSLATOR]


def test_decide_names_what_changed():
    values, upstream = {"eval.n_test": 40, "seed": 0}, {"translator": {"0": "aa"}}
    stamp = {"reads": values, "upstream": upstream, "output": "x", "fingerprint": demo.fingerprint(values, upstream)}
    d = demo.decide("eval", values, upstream, None, None, False)
    assert (d.status, d.changed) == ("run", ["no_stamp"])
    assert demo.decide("eval", values, upstream, stamp, "x", False).status == "cached"
    d = demo.decide("eval", {**values, "eval.n_test": 41}, upstream, stamp, "x", False)
    assert (d.status, d.changed) == ("rerun", ["eval.n_test"])
    d = demo.decide("eval", values, {"translator": {"0": "bb"}}, stamp, "x", False)
    assert (d.status, d.changed) == ("rerun", ["upstream.translator"])
    assert demo.decide("eval", values, upstream, stamp, None, False).changed == ["output_missing"]
    assert demo.decide("eval", values, upstream, stamp, "x", True).changed == ["forced"]


def test_a_stage_result_is_stamped_then_reused_until_a_key_it_reads_changes(cfg, capsys):
    calls = []

    def fake_eval(c):
        calls.append(c.eval.n_test)
        return {"methods": {"tiny_ft": {"accuracy": 0.5}}, "per_seed": {0: {"n": c.eval.n_test}}}

    def run(c, rerun=()):
        stages = demo.Stages(c, Path(c.work_dir), list(rerun))
        stages.outputs.update(corpus="c1", translator={"0": "t0"})
        return stages.run(stages.check("eval"), fake_eval, c, keep_result=True), stages.report["eval"]

    Path(cfg.work_dir).mkdir(parents=True)
    first, report = run(cfg)
    assert report["status"] == "ran" and report["changed"] == ["no_stamp"]
    second, report = run(cfg)
    assert report["status"] == "cached" and calls == [40]
    assert second == {"methods": {"tiny_ft": {"accuracy": 0.5}}, "per_seed": {"0": {"n": 40}}}  # as JSON keeps it
    assert "stage=demo step=eval status=cached" in capsys.readouterr().out
    _, report = run(cfg, rerun=["eval"])
    assert report["changed"] == ["forced"] and calls == [40, 40]
    _, report = run(with_key(cfg, "eval.n_test", 41))
    assert report == {**report, "status": "ran", "changed": ["eval.n_test"]} and calls == [40, 40, 41]
    assert "stage=demo step=eval status=rerun changed=eval.n_test" in capsys.readouterr().out
    _, report = run(with_key(with_key(cfg, "eval.n_test", 41), "eval.num_threads", 1))  # threads: not an input
    assert report["status"] == "cached"


def _corpus_with_shards(cfg, ids=(0, 1, 100_000)) -> Path:
    out = Path(cfg.corpus_dir)
    out.mkdir(parents=True)
    for i in ids:
        (out / demo.shard_name(i)).write_bytes(b"")
    return out


class _Card:
    card_id = "card-1"


def _decision(cfg, old, new):
    stamp = {"reads": demo.stage_values("corpus", old), "upstream": {"pair": "card-1"}}
    return demo.decide("corpus", demo.stage_values("corpus", new), {"pair": "card-1"}, stamp, None, False)


def test_a_corpus_keeps_its_shards_when_it_only_grows(cfg):
    out = _corpus_with_shards(cfg)
    demo.clear_stale_corpus(cfg, _decision(cfg, cfg, with_key(cfg, "corpus.n_subsets", 8)), _Card())
    assert len(list(out.glob("shard-*"))) == 3


def test_a_corpus_drops_shards_a_changed_key_made_wrong(cfg, capsys):
    out = _corpus_with_shards(cfg)
    new = with_key(cfg, "tasks.dirichlet_alpha", 0.3)
    demo.clear_stale_corpus(new, _decision(cfg, cfg, new), _Card())
    assert list(out.glob("shard-*")) == []
    assert "cleared_shards=3 because=tasks.dirichlet_alpha" in capsys.readouterr().out


def test_a_corpus_at_an_explicit_storage_path_is_never_deleted(cfg, tmp_path):
    cfg = with_key(cfg, "corpus.storage_path", str(tmp_path / "shared-corpus"))
    out = _corpus_with_shards(cfg)
    new = with_key(cfg, "finetune.lr", 1e-3)
    with pytest.raises(UserError, match=r"was built with other finetune\.lr: its shards would be reused"):
        demo.clear_stale_corpus(new, _decision(cfg, cfg, new), _Card())
    assert len(list(out.glob("shard-*"))) == 3

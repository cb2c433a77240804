"""The evaluations on Ray give exactly the figures of the serial path: organizations
(`gt-ray eval`) and held-out test subsets (`gt-ray translator eval`), on configs/ci.yaml's
recipe with a corpus built in process and untrained translators for both training seeds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gt_ray.config import PairConfig, load_yaml
from gt_ray.corpus import corpus_schema, subset_config, write_manifest, write_shard
from gt_ray.models import load_card_side, make_pair_card
from gt_ray.pipeline import translator_dir
from gt_ray.shadow import finetune_pair, plan_subsets
from gt_ray.translator.checkpoint import save_translator
from gt_ray.translator.config import TranslatorConfig
from gt_ray.translator.model import GradTransformer, Normalizer, Translator
from tests.conftest import ROOT, tiny_spec

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ci_run(tiny_path, gqa_path, tmp_path_factory):
    """configs/ci.yaml with the test pair, 8 shadow subsets (2 held out for test), two
    organizations x two seeds, one torch thread, 6 fine-tuning steps (the comparison is exact at
    any count); a random translator per training seed."""
    ci = load_yaml(ROOT / "configs/ci.yaml")
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=ci.pair.lora)
    cfg = dataclasses.replace(ci, pair=pair, work_dir=str(tmp_path_factory.mktemp("par") / "work"),
                              corpus=dataclasses.replace(ci.corpus, n_subsets=8, n_tiny_only=0),
                              eval=dataclasses.replace(ci.eval, n_orgs=2, seeds=[0, 1], num_threads=1),
                              finetune=dataclasses.replace(ci.finetune, steps=6, snapshot_steps=[4, 5, 6]))
    card = make_pair_card(cfg.pair, tiny_path, gqa_path)
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    for subset in plan_subsets(cfg, cfg.corpus.n_subsets, seed=cfg.corpus.seed):
        write_shard(cfg.corpus_dir, subset.subset_id, finetune_pair(tiny, llm, subset, cfg.finetune), corpus_schema(card))
    write_manifest(cfg.corpus_dir, card, subset_config(cfg), cfg.corpus.n_subsets)
    model = TranslatorConfig(d_tiny=card.tiny.d_layer, L_tiny=card.tiny.n_layers, d_llm=card.llm.d_layer,
                             L_llm=card.llm.n_layers, d_model=16, num_layers=1, num_heads=2, d_ff=32, dropout=0.0)
    for seed in cfg.translator.seeds:
        torch.manual_seed(seed)
        x, y = torch.randn(16, model.L_tiny, model.d_tiny) * 0.01, torch.randn(16, model.L_llm, model.d_llm) * 0.01
        translator = Translator(model, GradTransformer(model), Normalizer.fit(x, y, "coordinate")).eval()
        save_translator(translator, translator_dir(cfg, seed), {"fingerprints": {"tiny": card.tiny.layout_fingerprint,
                                                                                 "llm": card.llm.layout_fingerprint}})
    return cfg


def _exact(data) -> str:
    """JSON with every float's shortest exact repr, NaN included (NaN != NaN in a dict compare)."""
    return json.dumps(data, sort_keys=True, default=str)


def _figures(per_seed: dict) -> str:
    """Everything of `jobs.evaluate`'s per-seed results but the timings."""
    return _exact({s: {k: v for k, v in r.items() if k != "provider_seconds"} for s, r in per_seed.items()})


def test_organizations_on_ray_score_exactly_as_in_series(ray_cluster, ci_run, capsys):
    from jobs.evaluate import evaluate

    serial = evaluate(ci_run, serial=True)
    capsys.readouterr()
    parallel = evaluate(ci_run)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage=eval ")]
    assert len(lines) == 4 and {line.split(" done=")[1].split()[0] for line in lines} == {"1/4", "2/4", "3/4", "4/4"}
    assert serial["per_seed"].keys() == parallel["per_seed"].keys() == {0, 1}
    for seed in (0, 1):
        orgs = parallel["per_seed"][seed]["orgs"]
        assert len(orgs) == 2 and orgs[0] != orgs[1]
        assert {"kd_sequence", "kd_logit", "proxy_tuning", "grad_transformer"} <= set(orgs[0]["accuracy"])
        assert set(orgs[0]["accuracy_by_translator_seed"]["grad_transformer"]) == {"0", "1"}
    assert _figures(parallel["per_seed"]) == _figures(serial["per_seed"])  # exact: per-org accuracies, NLLs, multi rows
    assert _exact(parallel["methods"]) == _exact(serial["methods"])
    assert _exact(parallel["org_report"]) == _exact(serial["org_report"])


def test_held_out_subsets_on_ray_score_exactly_as_in_series(ray_cluster, ci_run, capsys):
    from jobs.eval_translator import evaluate

    serial = evaluate(ci_run, serial=True)
    capsys.readouterr()
    parallel = evaluate(ci_run)
    assert capsys.readouterr().out.count("stage=translator_eval ") == parallel["n_test_subsets"] == 2
    assert _exact(parallel["per_subset"]) == _exact(serial["per_subset"])
    assert _exact(parallel["methods"]) == _exact(serial["methods"])
    assert parallel["per_subset"]["true"]["nll"] != parallel["per_subset"]["base"]["nll"]  # the updates matter

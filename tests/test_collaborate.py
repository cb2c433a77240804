"""jobs/collaborate: the collaboration rounds and the robust rows, on tiny seeded models
(few steps, small N), with a fixed linear map in place of a trained translator."""

import dataclasses
import json

import pytest
import torch

from gt_ray import tasks
from gt_ray.config import CollabConfig, ExperimentConfig, FinetuneConfig, LoraSpec, PairConfig, TaskConfig
from gt_ray.evaluate import score_update
from gt_ray.models import load_card_side, make_pair_card
from gt_ray.wire import NormBound
from jobs import cli, collaborate
from tests.conftest import TASK_NAMES, tiny_spec

LORA = LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)


@pytest.fixture(scope="module")
def pair(tiny_path, gqa_path):
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=LORA)
    card = make_pair_card(pair, tiny_path, gqa_path)
    return pair, load_card_side(card, "tiny"), load_card_side(card, "llm")


def linear_translate(tiny, llm, seed=0):
    """A fixed random linear map TinyLM -> LLM, large enough that updates move the scores."""
    (lt, dt), (ll, dl) = tiny.layout.shape, llm.layout.shape
    w = torch.randn(lt * dt, ll * dl, generator=torch.Generator().manual_seed(seed)) * 3 / (lt * dt) ** 0.5

    def translate(x):  # (B, L_tiny, d_tiny) -> (B, L_llm, d_llm)
        return (x.reshape(x.shape[0], -1) @ w).reshape(x.shape[0], ll, dl)

    return translate


def small_config(pair_cfg) -> ExperimentConfig:
    return ExperimentConfig(pair=pair_cfg, tasks=TaskConfig(names=TASK_NAMES, secret_per_task=True),
                            finetune=FinetuneConfig(steps=3, snapshot_steps=[3], batch_size=4, n_examples=8),
                            collab=CollabConfig(sizes=[1, 3], n_examples=8, groups=1, seeds=[0], n_test=24))


def test_collaboration_rows_and_their_invariants(pair):
    pair_cfg, tiny, llm = pair
    cfg = small_config(pair_cfg)
    out = collaborate.collaborate(cfg, tiny, llm, linear_translate(tiny, llm))
    assert out["n_groups"] == 1 and out["sizes"] == [1, 3]
    assert set(out["table"]) == {"1", "3"}
    for n in ("1", "3"):
        assert set(out["table"][n]) == set(collaborate.ROUND_ROWS)
        for row in out["table"][n].values():
            assert 0 <= row["mean"] <= 1 and row["std"] == 0.0  # one group: no spread
    g = out["groups"][0]
    assert len(g["alone"]) == 3 and len(set(g["member_seeds"])) == 3  # each member its own data
    one, three = g["rounds"]["1"], g["rounds"]["3"]
    # a round of one organization is that organization's own translation, in every mode
    member = g["alone"][0]["translated"]
    for row in ("agg_then_translate", "translate_then_mean", "weight_space"):
        assert one[row]["nll"] == pytest.approx(member["nll"], rel=1e-5), row
        assert one[row]["accuracy"] == member["accuracy"]
    assert one["member_tiny_mean"]["accuracy"] == one["member_tiny_best"]["accuracy"] == g["alone"][0]["tiny"]["accuracy"]
    acc = [(a["tiny"]["accuracy"], a["translated"]["accuracy"]) for a in g["alone"]]
    assert three["best_member"]["accuracy"] == max(max(a) for a in acc)
    assert three["member_tiny_mean"]["accuracy"] == pytest.approx(sum(a[0] for a in acc) / 3)
    # the robust rows: N = 3 with one trimmed at each end is the median; the clean mean is the round's
    r = g["robust"]
    assert r["n"] == 3 and r["attacker"] == 2 and r["refused_by_norm_bound"] is None
    assert r["clean"]["trimmed_mean"] == r["clean"]["median"]
    assert r["clean"]["mean"] == three["agg_then_translate"]["accuracy"]
    assert set(r) >= {"clean", "scale", "sign_flip"}
    t = out["targets"]
    assert set(t["robust_rules_within_tolerance"]) == set(t["mean_outside_tolerance"]) == {"scale", "sign_flip"}
    assert "| LLM ft on the union (needs the data) |" in collaborate.format_results(out)


def test_groups_are_cached_and_reused(pair, tmp_path):
    pair_cfg, tiny, llm = pair
    cfg = small_config(pair_cfg)
    cfg = dataclasses.replace(cfg, collab=dataclasses.replace(cfg.collab, sizes=[1, 2], n_test=8))
    first = collaborate.collaborate(cfg, tiny, llm, linear_translate(tiny, llm), cache=tmp_path)
    path = tmp_path / "seed0-group0.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(first["groups"][0]))
    cached = json.loads(path.read_text())
    cached["llm_base"]["accuracy"] = 0.123  # a value no run gives: the next run must read the file, not recompute
    path.write_text(json.dumps(cached))
    again = collaborate.collaborate(cfg, tiny, llm, linear_translate(tiny, llm), cache=tmp_path)
    assert again["llm_base"]["mean"] == 0.123 and again["table"] == first["table"]


def test_weight_space_aggregate_of_identical_members_is_the_member(pair):
    _, tiny, llm = pair
    test = tasks.generate_dataset(tasks.DatasetSpec("private_test", 3, {"index": 1.0}, 24, 1))
    u = linear_translate(tiny, llm)(torch.randn(1, *tiny.layout.shape, generator=torch.Generator().manual_seed(1)) * 0.05)[0]
    single = score_update(llm, u, test)
    stacked = collaborate.score_weight_space(llm, torch.stack([u, u, u]), test)
    assert stacked.nll == pytest.approx(single.nll, rel=1e-5) and stacked.accuracy == single.accuracy
    other = collaborate.score_weight_space(llm, torch.stack([u, -u]), test)  # a different adapter scores differently
    assert other.nll != pytest.approx(single.nll, rel=1e-5)


def test_attacks_and_the_norm_bound():
    v = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(collaborate.attack(v, "scale", 100.0), 100 * v)
    torch.testing.assert_close(collaborate.attack(v, "sign_flip", 100.0), -v)
    with pytest.raises(ValueError, match="unknown attack 'zero'"):
        collaborate.attack(v, "zero", 1.0)
    bound = NormBound(float(v.norm()), float(v.norm()))  # accepts [norm / 10, norm * 10]
    assert collaborate.refused(collaborate.attack(v, "scale", 100.0), bound)
    assert not collaborate.refused(collaborate.attack(v, "sign_flip", 100.0), bound)


def test_group_members_share_the_task_not_the_data(pair):
    cfg = small_config(pair[0])
    task, members = collaborate.draw_group(cfg, 0, 0)
    assert len(members) == 3
    assert all(dataclasses.replace(m, seed=task.seed) == task for m in members)
    assert collaborate.draw_group(cfg, 0, 1)[0] != task  # another group, another task


def test_cli_without_a_translator_says_so_in_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"pair: {{tiny: {{path: a}}, llm: {{path: b}}}}\nwork_dir: {tmp_path / 'work'}\n")
    assert cli.main(["collab", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no corpus at")

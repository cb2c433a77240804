"""The world criteria and the secret probes, on tiny random data (seconds)."""

import math

import pytest
import torch

from gt_ray import tasks, world
from gt_ray.models import load_model


def test_distinct_share_finds_parameters_that_act_alike():
    """The default world (v2) has k mod 7 in rotate and delete: k = 7..9 act like 0..2, which
    criterion 4 must report (world v3, docs/world.md, removed it and failed elsewhere)."""
    share = {name: world.distinct_share(name, n_inputs=200) for name in tasks.TASKS}
    assert share["rotate"] == 0.0 and share["delete"] == 0.0  # e.g. k = 0 and k = 7 on 7 letters
    assert share["caesar"] == 1.0 and share["add"] == 1.0
    assert 0.8 < share["index"] < 1.0  # one-letter answers: two k can hit the same letter by chance


def test_linear_probe_reads_a_planted_secret_and_not_noise():
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(tasks.N_PARAMS, 64, generator=g)  # one direction per secret
    y = torch.randint(0, tasks.N_PARAMS, (200,), generator=g)
    x = directions[y] + 0.5 * torch.randn(200, 64, generator=g) + 3.0  # an offset the standardization removes
    pred, lam = world.linear_probe(x[:150], y[:150].tolist(), x[150:])
    assert lam in world.RIDGE_LAMBDAS
    assert (pred == y[150:]).float().mean() > 0.9
    noise, _ = world.linear_probe(torch.randn(150, 64, generator=g), y[:150].tolist(), torch.randn(50, 64, generator=g))
    assert (noise == y[150:]).float().mean() < 0.4


def test_behavioural_probe_picks_the_k_a_model_executes(tiny_path):
    """A stand-in model that answers rotate with k = 6 whatever the prompt says."""
    _, tok = load_model(tiny_path)
    vocab = len(tok)

    class Rotates6(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, vocab)
            for b, row in enumerate(input_ids.tolist()):
                text = tok.decode(row)
                start = text.index("=") + 1
                answer = tasks.TASKS["rotate"].solve(text[3:start - 1], 6) + tasks.EOS
                for j, c in enumerate(answer):
                    logits[b, start - 1 + j, tok.convert_tokens_to_ids(c)] = 1.0
            return type("Out", (), {"logits": logits})()

    inputs = ["abcdefghij", "ponmlkjihg", "aabbccddee"]
    assert world.behavioural_secret(Rotates6(), tok, "rotate", inputs) == 6


def test_criteria_pass_and_fail_by_threshold():
    rows = {"rotate": {"tiny": {"k_shown": 0.5, "hidden_after_ft": 0.47}, "llm": {"k_shown": 1.0, "hidden_after_ft": 1.0}},
            "add": {"tiny": {"k_shown": 0.5, "hidden_after_ft": 0.2}, "llm": {"k_shown": 1.0, "hidden_after_ft": 1.0}}}
    probes = {"rotate": {"linear": 0.5, "behavioural": 0.9, "n_test": 20},
              "add": {"linear": 0.85, "behavioural": 0.1, "n_test": 20}}
    orgs = {"tiny_ft": 0.55, "llm_ft": 0.97, "llm_ft_min": 0.85, "gap": 0.42}
    crit = world.evaluate_criteria(rows, probes, orgs, {"rotate": 1.0, "add": 0.95})
    assert crit["tasks"]["rotate"]["secret_learned"]["pass"] and crit["tasks"]["rotate"]["secret_readable"]["pass"]
    assert not crit["tasks"]["add"]["secret_learned"]["pass"] and crit["tasks"]["add"]["secret_readable"]["pass"]
    assert crit["tasks"]["add"]["secret_learned"]["ratio"] == pytest.approx(0.4)
    assert crit["orgs"]["pass"] and not crit["all_pass"]
    assert "add | 0.200 / 0.500 = 0.40 FAIL" in world.format_criteria(crit)
    low_llm = world.evaluate_criteria({}, {}, dict(orgs, llm_ft_min=0.7), {})
    assert not low_llm["orgs"]["pass"] and not low_llm["all_pass"]
    assert math.isnan(world.evaluate_criteria({"x": {"tiny": {"k_shown": 0.0, "hidden_after_ft": 0.0}}}, {}, None, {})
                      ["tasks"]["x"]["secret_learned"]["ratio"])


def test_a_probe_that_names_an_alias_of_the_secret_reads_it():
    """rotate and delete act on 7 letters (k mod 7): naming 1 for a secret 8 is right;
    caesar's ten shifts are all different, so there it is wrong."""
    assert world.same_secret("rotate", 1, 8) and world.same_secret("delete", 9, 2)
    assert not world.same_secret("caesar", 1, 8) and not world.same_secret("rotate", 1, 2)
    assert world.same_secret("caesar", 4, 4)

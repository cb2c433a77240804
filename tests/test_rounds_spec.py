"""gt_ray.rounds.spec: round specs refuse bad combinations and round-trip through JSON."""

import json

import pytest

from gt_ray.rounds.spec import DEFAULT_MODE, RoundSpec


def test_default_mode_is_aggregate_then_translate():
    assert DEFAULT_MODE == "aggregate_then_translate" and RoundSpec().mode == DEFAULT_MODE


@pytest.mark.parametrize("kwargs, match", [
    ({"rule": "max"}, "rule must be one of"),
    ({"mode": "both"}, "mode must be one of"),
    ({"weight_space": True}, "weight_space needs mode 'translate_then_aggregate'"),
    ({"weight_space": True, "mode": "translate_then_aggregate", "rule": "median"}, "a median of LoRA products"),
    ({"clip_norm": 0.0}, "clip_norm must be a finite number > 0"),
    ({"clip_norm": float("nan")}, "clip_norm must be a finite number > 0"),
    ({"trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\)"),
    ({"expected_orgs": []}, "expected_orgs must name at least one"),
    ({"expected_orgs": ["a", "a"]}, "lists an organization twice"),
    ({"expected_orgs": ["../x"]}, "expected_orgs entry must be"),
    ({"expected_orgs": ["a"], "quorum": 2}, "quorum 2 exceeds the 1 expected"),
    ({"quorum": 0}, "quorum must be an integer >= 1"),
    ({"dp_epsilon": 1.0}, "dp_epsilon and dp_delta go together"),
    ({"dp_epsilon": 1.0, "dp_delta": 1e-5}, "central DP noise needs clip_norm"),
    ({"dp_epsilon": 1.0, "dp_delta": 1e-5, "clip_norm": 1.0, "rule": "median"}, "central DP noise needs clip_norm"),
    ({"accept_outliers": True}, "accept_outliers needs a robust rule"),
    ({"accept_outliers": True, "rule": "weighted_mean"}, "accept_outliers needs a robust rule"),
    ({"accept_outliers": True, "rule": "trimmed_mean", "trim_fraction": 0.0}, "needs trim_fraction > 0"),
])
def test_spec_refuses_bad_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoundSpec(**kwargs)


def test_spec_round_trips_through_json():
    spec = RoundSpec(rule="trimmed_mean", trim_fraction=0.2, expected_orgs=["a", "b", "c"], quorum=2, clip_norm=3.0)
    assert RoundSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="unknown RoundSpec keys"):
        RoundSpec.from_dict({"rule": "mean", "colour": "red"})

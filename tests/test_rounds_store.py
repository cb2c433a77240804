"""gt_ray.rounds.store: persistence and idempotency, content checks on submit, closing in each
mode, and PEFT export (plain and stacked)."""

import json
import zipfile

import pytest
import torch
from peft import PeftModel

from gt_ray.models import load_card_side, load_model
from gt_ray.rounds.spec import (ADAPTER_ZIP, ROUND_FILE, OrgNotExpectedError, RoundConflictError, RoundSpec,
                                UnknownRoundError)
from gt_ray.rounds.store import RoundStore
from gt_ray.updates import apply_update, split_factors
from gt_ray.wire import NormBound, parse_update_bytes, update_to_bytes
from tests.rounds_helpers import LORA, linear_translate, make_card, tiny_shape, vector


@pytest.fixture(scope="module")
def card(tiny_path, gqa_path):
    return make_card(tiny_path, gqa_path)


@pytest.fixture(scope="module")
def llm(card):
    return load_card_side(card, "llm")


def test_zero_and_out_of_range_vectors_are_refused_unless_a_robust_round_accepts_outliers(card, tmp_path):
    typical = float(torch.randn(*tiny_shape(card), generator=torch.Generator().manual_seed(1)).norm()) * 0.01
    store = RoundStore(tmp_path, card, NormBound(typical / 2, typical * 2, factor=10.0))
    zero = update_to_bytes(torch.zeros(*tiny_shape(card)), card.tiny.layout_fingerprint)
    store.create_round(RoundSpec(), "r-mean")
    store.create_round(RoundSpec(rule="median", accept_outliers=True), "r-robust")
    for round_id in ("r-mean", "r-robust"):
        with pytest.raises(ValueError, match="the update vector is all zeros"):
            store.submit(round_id, "a", zero, 32)
    store.submit("r-mean", "a", vector(card, 1), 32)  # in range
    for scale in (100.0, 1e-5):  # 1000x above, 1000x below the typical norm
        with pytest.raises(ValueError, match=r"L2 norm .* is outside .* widened 10x"):
            store.submit("r-mean", "b", vector(card, 2, scale=scale), 32)
        store.submit("r-robust", f"o-{scale:g}".replace(".", "-").replace("+", ""), vector(card, 2, scale=scale), 32)
    assert sorted(store.get("r-mean").submissions) == ["a"] and len(store.get("r-robust").submissions) == 2
    unbounded = RoundStore(tmp_path, card)  # no bound: only zeros are refused
    unbounded.submit("r-mean", "b", vector(card, 2, scale=100.0), 32)


def test_submit_is_idempotent_and_refuses_conflicts(card, tmp_path):
    store = RoundStore(tmp_path, card)
    store.create_round(RoundSpec(expected_orgs=["a", "b"]), "r1")
    first = store.submit("r1", "a", vector(card, 1), 32, idempotency_key="k1")
    assert not first.duplicate and first.org_id == "a" and first.round_id == "r1"
    again = store.submit("r1", "a", vector(card, 1), 32, idempotency_key="k1")
    assert again.duplicate and again.receipt_id == first.receipt_id and again.received_at == first.received_at
    other_key = store.submit("r1", "a", vector(card, 1), 32, idempotency_key="k2")  # same bytes, new key
    assert other_key.duplicate and other_key.receipt_id == first.receipt_id
    assert store.submit("r1", "a", vector(card, 1), 32).duplicate  # no key: the bytes are the key
    with pytest.raises(RoundConflictError, match="Idempotency-Key was already used for a different vector"):
        store.submit("r1", "a", vector(card, 2), 32, idempotency_key="k1")
    with pytest.raises(RoundConflictError, match="'a' already submitted a different vector"):
        store.submit("r1", "a", vector(card, 2), 32, idempotency_key="k3")
    with pytest.raises(OrgNotExpectedError, match="'c' is not expected in round 'r1'"):
        store.submit("r1", "c", vector(card, 3), 32)
    with pytest.raises(UnknownRoundError, match="unknown round 'r9'"):
        store.submit("r9", "a", vector(card, 1), 32)
    with pytest.raises(ValueError, match="metadata says org_id='b', the request 'a'"):
        store.submit("r1", "a", vector(card, 4, org_id="b"), 32)
    with pytest.raises(ValueError, match="metadata says n_examples=32, the request 7"):
        store.submit("r1", "b", vector(card, 4), 7)
    with pytest.raises(ValueError, match="round_id must be"):
        store.get("../etc")
    assert sorted(store.get("r1").submissions) == ["a"]


def test_concurrent_submissions_of_one_org_create_one_slot(card, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = RoundStore(tmp_path, card)
    store.create_round(RoundSpec(), "r1")
    blobs = [vector(card, 1)] * 6 + [vector(card, 2)] * 6  # two different vectors race for org a's slot

    def attempt(blob):
        try:
            return store.submit("r1", "a", blob, 32, idempotency_key="same-key")
        except RoundConflictError:
            return None

    with ThreadPoolExecutor(12) as pool:
        receipts = list(pool.map(attempt, blobs))
    accepted = [r for r in receipts if r is not None]
    assert sum(not r.duplicate for r in accepted) == 1 and len({r.receipt_id for r in accepted}) == 1
    assert len(accepted) == 6  # the losing vector got 409s, the winner's copies the same receipt
    assert list(store.get("r1").submissions) == ["a"]


def test_create_round_is_idempotent_for_the_same_spec(card, tmp_path):
    store = RoundStore(tmp_path, card)
    state, created = store.create_round(RoundSpec(), "r1")
    assert created and state.status == "open"
    assert store.create_round(RoundSpec(), "r1") == (state, False)
    with pytest.raises(RoundConflictError, match="already exists with another spec"):
        store.create_round(RoundSpec(rule="median"), "r1")
    assert store.create_round(RoundSpec())[0].round_id.startswith("r-")


def test_accepted_submissions_survive_a_new_store_verbatim(card, tmp_path):
    store = RoundStore(tmp_path, card)
    store.create_round(RoundSpec(quorum=2), "r1")
    receipts = [store.submit("r1", org, vector(card, i), 32, idempotency_key=f"k{i}") for i, org in enumerate("ab")]
    reopened = RoundStore(tmp_path, card)  # what a restarted service does
    state = reopened.get("r1")
    assert {o: s.receipt_id for o, s in state.submissions.items()} == {r.org_id: r.receipt_id for r in receipts}
    assert reopened.submit("r1", "a", vector(card, 0), 32, idempotency_key="k0").duplicate
    for i, org in enumerate("ab"):
        stored = (reopened.round_dir("r1") / "submissions" / f"{org}.safetensors").read_bytes()
        assert stored == vector(card, i)
        assert (reopened.round_dir("r1") / "submissions" / f"{org}.safetensors").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.rglob("*.tmp*"))  # no temporary file left behind
    assert json.loads((reopened.round_dir("r1") / ROUND_FILE).read_text())["status"] == "open"


def test_state_dir_of_another_card_is_refused(card, tmp_path):
    RoundStore(tmp_path, card)
    (tmp_path / "store.json").write_text(json.dumps({"format": "gt-ray-round-store-v1", "card_id": "other"}))
    with pytest.raises(ValueError, match="belongs to pair card 'other'"):
        RoundStore(tmp_path, card)


def test_close_needs_its_quorum_then_refuses_new_vectors_but_keeps_receipts(card, tmp_path):
    store = RoundStore(tmp_path, card)
    store.create_round(RoundSpec(quorum=2), "r1")
    first = store.submit("r1", "a", vector(card, 1), 32, idempotency_key="k1")
    with pytest.raises(RoundConflictError, match="has 1 of the 2 submissions it needs to close"):
        store.close("r1", linear_translate(card))
    store.submit("r1", "b", vector(card, 2), 32)
    state = store.close("r1", linear_translate(card))
    assert state.status == "closed" and state.result["orgs"] == ["a", "b"]
    assert store.close("r1", lambda x: 1 / 0) == state  # closing again is a no-op
    assert store.submit("r1", "a", vector(card, 1), 32, idempotency_key="k1").receipt_id == first.receipt_id
    with pytest.raises(RoundConflictError, match="round 'r1' is closed"):
        store.submit("r1", "c", vector(card, 3), 32)


def test_modes_agree_for_a_linear_translator_and_weighted_mean_follows_n_examples(card, tmp_path):
    translate = linear_translate(card)
    results = {}
    for mode in ("aggregate_then_translate", "translate_then_aggregate"):
        store = RoundStore(tmp_path / mode, card)
        store.create_round(RoundSpec(rule="weighted_mean", mode=mode, quorum=2), "r1")
        store.submit("r1", "a", vector(card, 1, n_examples=10), 10)
        store.submit("r1", "b", vector(card, 2, n_examples=30), 30)
        state = store.close("r1", translate)
        assert state.result["weights"] == [0.25, 0.75]
        results[mode] = store.load_result(state)
    x = torch.stack([parse_update_bytes(vector(card, s), card.tiny.layout_fingerprint, tiny_shape(card))[0]
                     for s in (1, 2)])
    expected = translate((0.25 * x[0] + 0.75 * x[1]).unsqueeze(0))[0]
    for got in results.values():
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def _logits(model, card):
    ids = torch.randint(3, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_exported_adapter_loads_in_peft_and_equals_the_applied_update(card, llm, tmp_path):
    store = RoundStore(tmp_path / "state", card)
    store.create_round(RoundSpec(quorum=2), "r1")
    store.submit("r1", "a", vector(card, 1), 32)
    store.submit("r1", "b", vector(card, 2), 32)
    with pytest.raises(RoundConflictError, match="is not closed"):
        store.export_adapter("r1", llm)
    store.close("r1", linear_translate(card))
    state = store.export_adapter("r1", llm)
    info = state.result["adapter"]
    assert info["kind"] == "update" and info["r"] == LORA.rank and info["lora_alpha"] == LORA.alpha
    zipped = store.adapter_zip("r1")
    assert zipped.name == ADAPTER_ZIP and store.export_adapter("r1", llm).result["adapter"] == info  # idempotent
    zipfile.ZipFile(zipped).extractall(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model(card.llm.path)[0], str(tmp_path / "adapter")).eval()

    apply_update(llm.model, llm.layout, llm.init, store.load_result(state))
    try:
        expected = _logits(llm.model, card)
    finally:
        llm.reset()
    torch.testing.assert_close(_logits(loaded, card), expected)
    assert not torch.allclose(expected, _logits(llm.model, card))  # the update changed something


def test_weight_space_adapter_is_the_exact_weighted_mean_of_lora_products(card, llm, tmp_path):
    store = RoundStore(tmp_path / "state", card)
    spec = RoundSpec(rule="weighted_mean", mode="translate_then_aggregate", weight_space=True, quorum=3)
    store.create_round(spec, "ws")
    for i, (org, n) in enumerate((("a", 10), ("b", 20), ("c", 70))):
        store.submit("ws", org, vector(card, i, scale=0.5, n_examples=n), n)
    store.close("ws", linear_translate(card))
    state = store.export_adapter("ws", llm)
    info = state.result["adapter"]
    assert info["kind"] == "stacked" and info["r"] == 3 * LORA.rank and info["lora_alpha"] == 3 * LORA.alpha
    zipfile.ZipFile(store.adapter_zip("ws")).extractall(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 48 and config["base_model_name_or_path"] == card.llm.path
    loaded = PeftModel.from_pretrained(load_model(card.llm.path)[0], str(tmp_path / "adapter")).eval()

    # The reference: W + (alpha / r) * sum_i w_i B_i A_i merged by hand into a fresh base model.
    updates = store.load_result(state)  # (3, L_llm, d_llm)
    factors = [split_factors(llm.init + u, llm.layout) for u in updates]
    weights = [0.1, 0.2, 0.7]  # n_examples 10, 20, 70
    merged = load_model(card.llm.path)[0]
    naive_differs = False
    for entry in (e for e in llm.layout.entries if e.factor == "lora_A"):
        b_key = entry.key.replace(".lora_A.", ".lora_B.")
        mean_product = sum(w * f[b_key] @ f[entry.key] for w, f in zip(weights, factors))
        mean_b = sum(w * f[b_key] for w, f in zip(weights, factors))
        mean_a = sum(w * f[entry.key] for w, f in zip(weights, factors))
        naive_differs |= not torch.allclose(mean_b @ mean_a, mean_product, atol=1e-6)
        module = entry.key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        with torch.no_grad():
            merged.get_submodule(module).weight += (LORA.alpha / LORA.rank) * mean_product
    assert naive_differs  # averaging the factors would not have been the mean of the products
    torch.testing.assert_close(_logits(loaded, card), _logits(merged.eval(), card), rtol=1e-4, atol=1e-5)


def test_a_vector_of_another_recipe_than_the_cards_is_refused(card, tmp_path):
    import dataclasses

    from gt_ray.models import recipe_fingerprint

    recipe = {"steps": 150, "lr": 3e-3, "batch_size": 32, "weight_decay": 0.0, "n_examples": 256,
              "snapshot_steps": [150], "dtype": "float32"}
    with_recipe = dataclasses.replace(card, recipe=recipe)
    store = RoundStore(tmp_path, with_recipe)
    store.create_round(RoundSpec(expected_orgs=["a", "b", "c"]), "r1")
    other = recipe_fingerprint({**recipe, "lr": 1e-2})
    with pytest.raises(RoundConflictError, match="fine-tuned with another recipe"):
        store.submit("r1", "a", vector(card, 11, recipe_fingerprint=other), 32)
    same = recipe_fingerprint({**recipe, "n_examples": 64})  # data size is not part of the recipe
    assert not store.submit("r1", "a", vector(card, 11, recipe_fingerprint=same), 32).duplicate
    assert not store.submit("r1", "b", vector(card, 12), 32).duplicate  # a vector that claims no recipe
    assert not RoundStore(tmp_path / "old", card).recipe_fingerprint  # a card without a recipe checks nothing

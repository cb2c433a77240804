"""gt_ray.rounds: round specs, vector bytes, persistence and idempotency, closing in each
mode, robust rules under poisoning, central noise, and PEFT export (plain and stacked)."""

import json
import struct
import zipfile

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save as save_safetensors_bytes

from gt_ray.aggregate import mean_sensitivity
from gt_ray.config import LoraSpec, PairConfig
from gt_ray.models import load_card_side, load_model, make_pair_card
from gt_ray.privacy import analytic_gaussian_sigma
from gt_ray.rounds import ADAPTER_ZIP, DEFAULT_MODE, ROUND_FILE, OrgNotExpectedError, RoundConflictError, RoundSpec, RoundStore, UnknownRoundError, compute_round_update
from gt_ray.translator.checkpoint import NORM_BOUND_FILE, load_norm_bound, write_norm_bound
from gt_ray.wire import NormBound, parse_update_bytes, update_to_bytes
from gt_ray.updates import apply_update, split_factors
from gt_ray.wire import UPDATE_FORMAT
from tests.conftest import tiny_spec

LORA = LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)


@pytest.fixture(scope="module")
def card(tiny_path, gqa_path):
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=LORA)
    return make_pair_card(pair, tiny_path, gqa_path)


@pytest.fixture(scope="module")
def llm(card):
    return load_card_side(card, "llm")


def tiny_shape(card):
    return card.tiny.n_layers, card.tiny.d_layer


_VECTORS: dict = {}


def vector(card, seed, scale=0.01, **meta):
    """A random TinyLM vector as file bytes, with ``n_examples`` and other metadata.

    Memoized: safetensors writes its metadata map in no fixed order, so writing the same
    vector twice can give different bytes (a file read twice does not).
    """
    key = (card.card_id, seed, scale, tuple(sorted(meta.items())))
    if key not in _VECTORS:
        t = torch.randn(*tiny_shape(card), generator=torch.Generator().manual_seed(seed)) * scale
        _VECTORS[key] = update_to_bytes(t, card.tiny.layout_fingerprint, {"n_examples": 32, **meta})
    return _VECTORS[key]


def linear_translate(card, seed=0):
    """A fixed random linear map TinyLM -> LLM: the modes must agree for the mean under it."""
    (lt, dt), (ll, dl) = tiny_shape(card), (card.llm.n_layers, card.llm.d_layer)
    w = torch.randn(lt * dt, ll * dl, generator=torch.Generator().manual_seed(seed)) / (lt * dt) ** 0.5

    def translate(x):  # (B, L_tiny, d_tiny) -> (B, L_llm, d_llm)
        return (x.reshape(x.shape[0], -1) @ w).reshape(x.shape[0], ll, dl)

    return translate


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


def _header_blob(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("make, match", [
    (lambda c: b"abc", "shorter than the 8-byte header length"),
    (lambda c: struct.pack("<Q", 1 << 40) + b"{}", "header length .* exceeds"),
    (lambda c: struct.pack("<Q", 4) + b"\xff\xfe{}", "its header is not JSON"),
    (lambda c: _header_blob([1, 2]), "not a JSON object"),
    (lambda c: save_safetensors_bytes({"update": torch.zeros(2, 256)}), "not a gt-ray update vector"),
    (lambda c: save_safetensors_bytes({"update": torch.zeros(2, 256), "x": torch.zeros(1)},
                                      metadata={"format": UPDATE_FORMAT}), "exactly one tensor named 'update'"),
    (lambda c: save_safetensors_bytes({"update": torch.zeros(2, 256, dtype=torch.int32)},
                                      metadata={"format": UPDATE_FORMAT}), "update dtype must be one of"),
    (lambda c: _header_blob({"__metadata__": {"format": UPDATE_FORMAT},
                             "update": {"dtype": "F32", "shape": [2, 256], "data_offsets": [0, 2048]}}, b"\0" * 16),
     "not a readable safetensors file"),
    (lambda c: update_to_bytes(torch.ones(*tiny_shape(c)), "f" * 64), "does not match the card's"),
    (lambda c: save_safetensors_bytes({"update": torch.full(tiny_shape(c), float("nan"))},
                                      metadata={"format": UPDATE_FORMAT, "fingerprint": c.tiny.layout_fingerprint}),
     r"non-finite value"),
    (lambda c: update_to_bytes(torch.ones(3, 7), c.tiny.layout_fingerprint), r"shape \[3, 7\], the card's layout needs"),
], ids=["too short", "huge header length", "header not utf-8", "header not an object", "no gt-ray format",
        "two tensors", "int dtype", "truncated data", "wrong fingerprint", "NaN", "wrong shape"])
def test_parse_update_bytes_refuses_bad_input(card, make, match):
    with pytest.raises(ValueError, match=match):
        parse_update_bytes(make(card), card.tiny.layout_fingerprint, tiny_shape(card))


def test_parse_update_bytes_reads_what_update_to_bytes_wrote(card):
    t = torch.randn(*tiny_shape(card))
    got, meta = parse_update_bytes(update_to_bytes(t, card.tiny.layout_fingerprint, {"n_examples": 5}),
                                   card.tiny.layout_fingerprint, tiny_shape(card))
    torch.testing.assert_close(got, t, rtol=0, atol=0)
    assert meta == {"n_examples": 5, "fingerprint": card.tiny.layout_fingerprint}


def test_norm_bound_round_trips_beside_the_checkpoint(card, tmp_path):
    assert load_norm_bound(tmp_path) is None  # no file: the bound is off, the service still starts
    vectors = torch.randn(20, *tiny_shape(card), generator=torch.Generator().manual_seed(0)) * 0.01
    path = write_norm_bound(tmp_path, vectors, card.tiny.layout_fingerprint)
    assert path == tmp_path / NORM_BOUND_FILE
    norms = vectors.flatten(1).norm(dim=1)
    bound = load_norm_bound(tmp_path, 4.0, card.tiny.layout_fingerprint)
    assert bound.factor == 4.0
    assert bound.low == pytest.approx(float(norms.min()) / 4) and bound.high == pytest.approx(float(norms.max()) * 4)
    with pytest.raises(ValueError, match="was written for TinyLM layout"):
        load_norm_bound(tmp_path, 4.0, "f" * 64)
    with pytest.raises(ValueError, match="must be finite and non-zero"):
        write_norm_bound(tmp_path, torch.zeros(3, *tiny_shape(card)))
    (tmp_path / NORM_BOUND_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a gt-ray input norm file"):
        load_norm_bound(tmp_path)


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
    assert not list(tmp_path.rglob("*.tmp"))
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


def test_translation_of_the_wrong_shape_is_refused(card):
    with pytest.raises(ValueError, match=r"translate returned \(1, 2, 3\), expected a tensor of shape"):
        compute_round_update(RoundSpec(), [torch.zeros(*tiny_shape(card))], [1], lambda x: torch.zeros(1, 2, 3),
                             (card.llm.n_layers, card.llm.d_layer))


@pytest.mark.parametrize("rule, robust", [("mean", False), ("median", True), ("trimmed_mean", True)])
def test_robust_rules_resist_one_poisoned_submission(rule, robust):
    g = torch.Generator().manual_seed(0)
    center = torch.randn(2, 64, generator=g)
    honest = [center + 0.1 * torch.randn(2, 64, generator=g) for _ in range(4)]
    poisoned = 100 * honest[0]
    out = compute_round_update(RoundSpec(rule=rule, trim_fraction=0.2), honest + [poisoned], [1] * 5,
                               lambda x: x, (2, 64))
    error = float((out.update - center).norm() / center.norm())
    assert (error < 0.15) == robust, f"{rule}: relative error {error:.3f}"
    if not robust:
        assert error > 10  # one organization dragged the mean 20x its own size away


def test_central_noise_is_calibrated_on_the_clipped_mean(card):
    spec = RoundSpec(clip_norm=1.0, dp_epsilon=2.0, dp_delta=1e-5)
    vectors = [torch.randn(2, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    noisy = compute_round_update(spec, vectors, [1] * 4, lambda x: x, (2, 64), torch.Generator().manual_seed(1))
    clean = compute_round_update(RoundSpec(clip_norm=1.0), vectors, [1] * 4, lambda x: x, (2, 64))
    assert noisy.sigma == pytest.approx(analytic_gaussian_sigma(2.0, 1e-5, mean_sensitivity(1.0, 4)))
    assert float((noisy.update - clean.update).std()) == pytest.approx(noisy.sigma, rel=0.2)


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

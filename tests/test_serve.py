"""The provider service on a local Ray cluster (loopback): batching, auth and bad input,
the org client end to end with the PEFT adapter, and a restart in the middle of a round."""

import base64
import hashlib
import json
import re
import secrets
import socket
import subprocess
import sys
import threading
import zipfile

import pytest
import requests
import torch
from peft import PeftModel
from safetensors.torch import save as save_safetensors_bytes

from gt_ray.config import LoraSpec, PairConfig
from gt_ray.models import load_card_side, load_model, make_pair_card
from gt_ray.org.client import submit_vector
from gt_ray.translator.checkpoint import NORM_BOUND_FILE, load_translator, save_translator, write_norm_bound
from gt_ray.wire import parse_update_bytes, update_to_bytes
from gt_ray.translator.config import TranslatorConfig
from gt_ray.translator.model import GradTransformer, Normalizer, Translator
from gt_ray.updates import apply_update
from gt_ray.wire import UPDATE_FORMAT, save_update
from serve.schemas import ProviderArgs
from tests.conftest import ROOT, tiny_spec

pytestmark = pytest.mark.ray

LORA = LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)
APP = "gt-ray-test"
ORGS = ("org-a", "org-b", "org-c")
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def card(tiny_path, gqa_path):
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=LORA)
    return make_pair_card(pair, tiny_path, gqa_path)


@pytest.fixture(scope="module")
def files(card, tmp_path_factory):
    """Card, a random translator checkpoint with the card's fingerprints, and a tokens file."""
    d = tmp_path_factory.mktemp("provider")
    card_path = card.save(d / "pair_card.json")
    cfg = TranslatorConfig(d_tiny=card.tiny.d_layer, L_tiny=card.tiny.n_layers, d_llm=card.llm.d_layer,
                           L_llm=card.llm.n_layers, d_model=32, num_layers=1, num_heads=2, d_ff=64, dropout=0.0)
    torch.manual_seed(0)
    x, y = torch.randn(16, cfg.L_tiny, cfg.d_tiny) * 0.01, torch.randn(16, cfg.L_llm, cfg.d_llm) * 0.01
    translator = Translator(cfg, GradTransformer(cfg), Normalizer.fit(x, y, "coordinate")).eval()
    save_translator(translator, d / "translator", {"fingerprints": {"tiny": card.tiny.layout_fingerprint,
                                                                     "llm": card.llm.layout_fingerprint}})
    write_norm_bound(d / "translator", x, card.tiny.layout_fingerprint)  # the "corpus": norms ~0.01 sqrt(L d)
    tokens = {"admin": secrets.token_urlsafe(24), "orgs": {o: secrets.token_urlsafe(24) for o in ORGS}}
    (d / "tokens.json").write_text(json.dumps(tokens))
    return {"dir": d, "card": card_path, "checkpoint": d / "translator", "tokens": tokens,
            "tokens_path": d / "tokens.json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_cluster, files):
    """The provider app on 127.0.0.1:<free port>; yields (base url, ProviderArgs, start)."""
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    args = ProviderArgs(checkpoint=str(files["checkpoint"]), card=str(files["card"]), tokens=str(files["tokens_path"]),
                        state_dir=str(files["dir"] / "state"), max_batch_size=8, batch_wait_timeout_s=0.05,
                        max_ongoing_requests=32, max_body_bytes=BODY_LIMIT, port=port, ingress_num_cpus=0.5)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def start():
        serve.run(build_app(args), name=APP, route_prefix="/")

    start()
    yield f"http://127.0.0.1:{port}", args, start
    serve.shutdown()


def http(service, method, path, token=None, **kw):
    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, service[0] + path, headers=headers, timeout=60, **kw)


_VECTORS: dict = {}


def vector_bytes(card, seed, **meta):
    """A TinyLM vector file's bytes (memoized: safetensors' metadata order is not fixed)."""
    key = (seed, tuple(sorted(meta.items())))
    if key not in _VECTORS:
        t = torch.randn(card.tiny.n_layers, card.tiny.d_layer, generator=torch.Generator().manual_seed(seed)) * 0.01
        _VECTORS[key] = update_to_bytes(t, card.tiny.layout_fingerprint, {"n_examples": 32, **meta})
    return _VECTORS[key]


def vector_file(card, tmp_path, org, round_id, seed):
    """An org's vector file, as ``gt-ray org finetune`` writes it."""
    t = torch.randn(card.tiny.n_layers, card.tiny.d_layer, generator=torch.Generator().manual_seed(seed)) * 0.01
    return save_update(tmp_path / f"{org}-{round_id}.safetensors", t, card.tiny.layout_fingerprint,
                       {"n_examples": 32, "org_id": org, "round_id": round_id})


def outlier_bytes(card, scale=1000.0):
    """A finite vector whose norm is ``scale`` times the corpus' typical norm."""
    t = torch.randn(card.tiny.n_layers, card.tiny.d_layer, generator=torch.Generator().manual_seed(99)) * 0.01 * scale
    return update_to_bytes(t, card.tiny.layout_fingerprint)


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def test_health_readiness_and_openapi(service):
    assert http(service, "GET", "/healthz").json() == {"status": "ok"}
    ready = http(service, "GET", "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    paths = http(service, "GET", "/openapi.json").json()["paths"]
    for p in ("/v1/rounds", "/v1/rounds/{round_id}", "/v1/rounds/{round_id}/submissions", "/v1/translate",
              "/v1/rounds/{round_id}/close", "/v1/rounds/{round_id}/adapter", "/healthz", "/readyz"):
        assert p in paths, p


def test_concurrent_translations_form_batches_and_match_the_checkpoint(service, files, card):
    token = files["tokens"]["orgs"]["org-a"]
    n = 16
    blobs = [vector_bytes(card, 100 + i) for i in range(n)]
    answers, barrier = [None] * n, threading.Barrier(n)

    def post(i):  # even: JSON with base64; odd: the safetensors file itself, both ways
        barrier.wait()
        if i % 2:
            answers[i] = http(service, "POST", "/v1/translate", token, data=blobs[i],
                              headers={"Content-Type": "application/octet-stream"})
        else:
            answers[i] = http(service, "POST", "/v1/translate", token, json={"vector_b64": b64(blobs[i])})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200] * n, [a.text for a in answers if a.status_code != 200]
    local = load_translator(files["checkpoint"])
    x = torch.stack([parse_update_bytes(b, card.tiny.layout_fingerprint, (card.tiny.n_layers, card.tiny.d_layer))[0]
                     for b in blobs])
    expected = local.translate(x)
    for i, a in enumerate(answers):
        if i % 2:
            assert a.headers["content-type"] == "application/octet-stream"
            out, sha = a.content, a.headers["X-Sha256"]
        else:
            body = a.json()
            out, sha = base64.b64decode(body["vector_b64"]), body["sha256"]
            assert body["fingerprint"] == card.llm.layout_fingerprint and body["shape"] == list(expected[i].shape)
        y, meta = parse_update_bytes(out, card.llm.layout_fingerprint, (card.llm.n_layers, card.llm.d_layer))
        assert meta["model_side"] == "llm" and sha == hashlib.sha256(out).hexdigest()
        assert meta["source_sha256"] == hashlib.sha256(blobs[i]).hexdigest()
        torch.testing.assert_close(y, expected[i], rtol=1e-4, atol=1e-5)
    stats = http(service, "GET", "/v1/stats", files["tokens"]["admin"]).json()
    assert stats["max_batch_size"] == 8 and stats["batch_wait_timeout_s"] == 0.05  # user_config applied
    assert stats["requests"] >= n and stats["max_batch_seen"] > 1, stats


@pytest.fixture(scope="module")
def bad_round(service, files, card):
    """A round for the bad-input cases, where org-c already holds a slot."""
    admin, org_c = files["tokens"]["admin"], files["tokens"]["orgs"]["org-c"]
    r = http(service, "POST", "/v1/rounds", admin, json={"round_id": "r-bad", "expected_orgs": ["org-a", "org-c"]})
    assert r.status_code == 201, r.text
    r = http(service, "POST", "/v1/rounds/r-bad/submissions", org_c, headers={"Idempotency-Key": "key-c"},
             json={"org_id": "org-c", "n_examples": 32, "vector_b64": b64(vector_bytes(card, 1))})
    assert r.status_code == 201, r.text
    return "r-bad"


def _bad_cases(card, tokens):
    a, c, admin = tokens["orgs"]["org-a"], tokens["orgs"]["org-c"], tokens["admin"]
    fp, shape = card.tiny.layout_fingerprint, (card.tiny.n_layers, card.tiny.d_layer)
    sub = "/v1/rounds/r-bad/submissions"

    def body(blob, org="org-a", **extra):
        return {"json": {"org_id": org, "n_examples": 32, "vector_b64": b64(blob), **extra}}

    good = body(vector_bytes(card, 2))
    nan = save_safetensors_bytes({"update": torch.full(shape, float("nan"))},
                                 metadata={"format": UPDATE_FORMAT, "fingerprint": fp})
    too_big = {"data": b"{" + b" " * BODY_LIMIT + b"}", "headers": {"Content-Type": "application/json"}}
    chunked = {"data": (b" " * 4096 for _ in range(BODY_LIMIT // 4096 + 2)),
               "headers": {"Content-Type": "application/json"}}
    return {
        "no token": ("POST", sub, None, good, 401, "missing bearer token"),
        "bad token": ("POST", sub, "x" * 32, good, 401, "invalid bearer token"),
        "another org's id": ("POST", sub, a, body(vector_bytes(card, 2), org="org-c"), 403,
                             "does not belong to organization 'org-c'"),
        "admin submits": ("POST", sub, admin, good, 403, "need the organization's token"),
        "org opens a round": ("POST", "/v1/rounds", a, {"json": {}}, 403, "needs the admin token"),
        "org closes a round": ("POST", "/v1/rounds/r-bad/close", a, {}, 403, "needs the admin token"),
        "org reads stats": ("GET", "/v1/stats", a, {}, 403, "needs the admin token"),
        "org not expected": ("POST", sub, tokens["orgs"]["org-b"], body(vector_bytes(card, 3), org="org-b"), 403,
                             "'org-b' is not expected in round 'r-bad'"),
        "unknown round": ("POST", "/v1/rounds/r-nope/submissions", a, good, 404, "unknown round 'r-nope'"),
        "unknown round status": ("GET", "/v1/rounds/r-nope", a, {}, 404, "unknown round 'r-nope'"),
        "impossible round id": ("GET", "/v1/rounds/a%20b", a, {}, 422, "round_id must be"),
        "declared body too large": ("POST", sub, a, too_big, 413, "exceeds the limit of 65536 bytes"),
        "chunked body too large": ("POST", sub, a, chunked, 413, "exceeds the limit of 65536 bytes"),
        "garbage base64": ("POST", sub, a, {"json": {"org_id": "org-a", "n_examples": 32, "vector_b64": "%%no%%"}},
                           422, "vector_b64 is not valid base64"),
        "not safetensors": ("POST", sub, a, body(b"hello, this is not a tensor file"), 422, "not a safetensors file"),
        "pickle instead of safetensors": ("POST", sub, a, body(b"\x80\x04\x95" + b"\0" * 40), 422,
                                          "not a safetensors file"),
        "NaN vector": ("POST", sub, a, body(nan), 422, "non-finite value"),
        "all-zero vector": ("POST", sub, a, body(update_to_bytes(torch.zeros(shape), fp)), 422,
                            "the update vector is all zeros: a fine-tune that learned nothing"),
        "norm far above the corpus": ("POST", sub, a, body(outlier_bytes(card)), 422,
                                      r"L2 norm .* is outside \[.*\], the shadow corpus' range .* widened 10x"),
        "norm far below the corpus": ("POST", sub, a, body(outlier_bytes(card, 1e-4)), 422, "is outside"),
        "outliers in a mean round": ("POST", "/v1/rounds", admin, {"json": {"accept_outliers": True}}, 422,
                                     "accept_outliers needs a robust rule"),
        "translate an all-zero vector": ("POST", "/v1/translate", a,
                                         {"json": {"vector_b64": b64(update_to_bytes(torch.zeros(shape), fp))}}, 422,
                                         "all zeros"),
        "wrong fingerprint": ("POST", sub, a, body(update_to_bytes(torch.zeros(shape), "0" * 64)), 422,
                              "does not match the card's"),
        "wrong shape": ("POST", sub, a, body(update_to_bytes(torch.ones(3, 5), fp)), 422,
                        r"shape \[3, 5\], the card's layout needs"),
        "missing fields": ("POST", sub, a, {"json": {"org_id": "org-a"}}, 422, "body.n_examples: Field required"),
        "extra field": ("POST", sub, a, body(vector_bytes(card, 2), pickle=True), 422, "body.pickle: Extra inputs"),
        "not JSON": ("POST", sub, a, {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 422,
                     "JSON decode error"),
        "zero examples": ("POST", sub, a, {"json": {**good["json"], "n_examples": 0}}, 422,
                          "greater than or equal to 1"),
        "metadata disagrees": ("POST", sub, a, body(vector_bytes(card, 4, org_id="org-c")), 422,
                               "metadata says org_id='org-c'"),
        "bad idempotency key": ("POST", sub, a, {**good, "headers": {"Idempotency-Key": "has space"}}, 422,
                                "Idempotency-Key must be"),
        "slot taken by another vector": ("POST", sub, c, body(vector_bytes(card, 5), org="org-c"), 409,
                                         "'org-c' already submitted a different vector"),
        "key reused for another vector": ("POST", sub, c, {**body(vector_bytes(card, 5), org="org-c"),
                                                           "headers": {"Idempotency-Key": "key-c"}}, 409,
                                          "Idempotency-Key was already used for a different vector"),
        "close before quorum": ("POST", "/v1/rounds/r-bad/close", admin, {}, 409, "has 1 of the 2 submissions"),
        "adapter before close": ("GET", "/v1/rounds/r-bad/adapter", admin, {}, 409, "has no adapter yet"),
        "adapter for an outsider": ("GET", "/v1/rounds/r-bad/adapter", a, {}, 403, "only the admin and the org"),
        "round spec that cannot be": ("POST", "/v1/rounds", admin, {"json": {"rule": "median", "weight_space": True,
                                                                              "mode": "translate_then_aggregate"}},
                                      422, "a median of LoRA products"),
        "unknown rule": ("POST", "/v1/rounds", admin, {"json": {"rule": "max"}}, 422, "body.rule: Input should be"),
        "same round id, other spec": ("POST", "/v1/rounds", admin, {"json": {"round_id": "r-bad"}}, 409,
                                      "already exists with another spec"),
        "translate garbage": ("POST", "/v1/translate", a, {"json": {"vector_b64": b64(b"\0" * 64)}}, 422,
                              "not a safetensors file"),
        "translate without token": ("POST", "/v1/translate", None, {"json": {"vector_b64": "AAAA"}}, 401,
                                    "missing bearer token"),
        "translate a binary body that is not a vector": ("POST", "/v1/translate", a, {
            "data": b"\x80\x04\x95" + b"\0" * 40, "headers": {"Content-Type": "application/octet-stream"}}, 422,
            "not a safetensors file"),
        "translate a JSON body without the vector": ("POST", "/v1/translate", a, {"json": {"vector": "AAAA"}}, 422,
                                                     "body.vector_b64: Field required"),
        "translate a text body": ("POST", "/v1/translate", a, {"data": b"hello",
                                                               "headers": {"Content-Type": "text/plain"}}, 415,
                                  "send application/json or application/octet-stream"),
    }


BAD_CASE_NAMES = [
    "no token", "bad token", "another org's id", "admin submits", "org opens a round", "org closes a round",
    "org reads stats", "org not expected", "unknown round", "unknown round status", "impossible round id",
    "declared body too large", "chunked body too large", "garbage base64", "not safetensors",
    "pickle instead of safetensors", "NaN vector", "all-zero vector", "norm far above the corpus",
    "norm far below the corpus", "outliers in a mean round", "translate an all-zero vector", "wrong fingerprint", "wrong shape", "missing fields",
    "extra field", "not JSON", "zero examples", "metadata disagrees", "bad idempotency key",
    "slot taken by another vector", "key reused for another vector", "close before quorum", "adapter before close",
    "adapter for an outsider", "round spec that cannot be", "unknown rule", "same round id, other spec",
    "translate garbage", "translate without token", "translate a binary body that is not a vector",
    "translate a JSON body without the vector", "translate a text body",
]


@pytest.mark.parametrize("name", BAD_CASE_NAMES)
def test_client_mistakes_get_a_4xx_with_a_message(service, files, card, bad_round, name):
    cases = _bad_cases(card, files["tokens"])
    assert sorted(cases) == sorted(BAD_CASE_NAMES)
    method, path, token, kw, status, detail = cases[name]
    r = http(service, method, path, token, **kw)
    assert r.status_code == status, r.text
    assert re.search(detail, r.json()["detail"]), r.json()


def test_a_robust_round_that_accepts_outliers_takes_a_far_out_vector(service, files, card):
    admin, tokens = files["tokens"]["admin"], files["tokens"]["orgs"]
    for rule, accept, status in (("median", False, 422), ("median", True, 201), ("trimmed_mean", True, 201)):
        round_id = f"r-out-{rule.replace('_', '-')}-{accept}".lower()
        r = http(service, "POST", "/v1/rounds", admin, json={"round_id": round_id, "rule": rule,
                                                              "accept_outliers": accept})
        assert r.status_code == 201 and r.json()["spec"]["accept_outliers"] is accept, r.text
        r = http(service, "POST", f"/v1/rounds/{round_id}/submissions", tokens["org-b"],
                 json={"org_id": "org-b", "n_examples": 32, "vector_b64": b64(outlier_bytes(card))})
        assert r.status_code == status, (rule, accept, r.text)
    zero = update_to_bytes(torch.zeros(card.tiny.n_layers, card.tiny.d_layer), card.tiny.layout_fingerprint)
    r = http(service, "POST", "/v1/rounds/r-out-median-true/submissions", tokens["org-a"],
             json={"org_id": "org-a", "n_examples": 32, "vector_b64": b64(zero)})
    assert r.status_code == 422 and "all zeros" in r.json()["detail"]  # never accepted, outliers or not


def test_an_organization_sees_its_own_receipt_and_counts_never_the_other_participants(service, files, card):
    admin, tokens = files["tokens"]["admin"], files["tokens"]["orgs"]
    r = http(service, "POST", "/v1/rounds", admin, json={"round_id": "r-view", "expected_orgs": ["org-a", "org-b"]})
    assert r.status_code == 201 and r.json()["spec"]["expected_orgs"] == ["org-a", "org-b"]
    receipt = http(service, "POST", "/v1/rounds/r-view/submissions", tokens["org-a"],
                   json={"org_id": "org-a", "n_examples": 32, "vector_b64": b64(vector_bytes(card, 20))}).json()
    views = {who: http(service, "GET", "/v1/rounds/r-view", tokens[who]) for who in ("org-a", "org-b")}
    for who, other in (("org-a", "org-b"), ("org-b", "org-a")):
        view = views[who]
        assert view.status_code == 200 and other not in view.text, view.text  # not even in the spec
        body = view.json()
        assert "expected_orgs" not in body["spec"] and body["orgs"] is None
        assert (body["n_expected"], body["n_submissions"], body["min_submissions"]) == (2, 1, 2)
    assert views["org-a"].json()["your_receipt"]["receipt_id"] == receipt["receipt_id"]
    assert views["org-b"].json()["your_receipt"] is None
    outsider = http(service, "GET", "/v1/rounds/r-view", tokens["org-c"])
    assert outsider.status_code == 403 and "'org-c' is not expected in round 'r-view'" in outsider.json()["detail"]
    full = http(service, "GET", "/v1/rounds/r-view", admin).json()
    assert full["spec"]["expected_orgs"] == ["org-a", "org-b"] and full["orgs"] == ["org-a"]
    assert full["your_receipt"] is None


def test_orgs_submit_with_the_client_then_close_gives_a_peft_adapter(service, files, card, tmp_path):
    admin, tokens = files["tokens"]["admin"], files["tokens"]["orgs"]
    r = http(service, "POST", "/v1/rounds", admin, json={"round_id": "r-main", "expected_orgs": ["org-a", "org-b"]})
    assert r.status_code == 201 and r.json()["spec"]["mode"] == "aggregate_then_translate"
    paths = {org: vector_file(card, tmp_path, org, "r-main", seed) for seed, org in enumerate(("org-a", "org-b"))}
    receipts = {org: submit_vector(service[0], tokens[org], "r-main", org, p) for org, p in paths.items()}
    assert not any(r["duplicate"] for r in receipts.values())
    again = submit_vector(service[0], tokens["org-a"], "r-main", "org-a", paths["org-a"])  # a retried command
    assert again["duplicate"] and again["receipt_id"] == receipts["org-a"]["receipt_id"]
    seen_by_a = http(service, "GET", "/v1/rounds/r-main", tokens["org-a"]).json()
    assert seen_by_a["orgs"] is None and seen_by_a["your_receipt"]["receipt_id"] == receipts["org-a"]["receipt_id"]
    assert seen_by_a["ready_to_close"]

    closed = http(service, "POST", "/v1/rounds/r-main/close", admin)
    assert closed.status_code == 200, closed.text
    result = closed.json()["result"]
    assert closed.json()["status"] == "closed" and result["adapter"]["kind"] == "update"
    zipped = http(service, "GET", "/v1/rounds/r-main/adapter", tokens["org-b"])
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    (tmp_path / "adapter.zip").write_bytes(zipped.content)
    zipfile.ZipFile(tmp_path / "adapter.zip").extractall(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model(card.llm.path)[0], str(tmp_path / "adapter")).eval()

    # The same update computed here: translate the mean of the two TinyLM vectors, apply it.
    x = torch.stack([parse_update_bytes(p.read_bytes(), card.tiny.layout_fingerprint,
                                        (card.tiny.n_layers, card.tiny.d_layer))[0] for p in paths.values()])
    update = load_translator(files["checkpoint"]).translate(x.mean(0))
    llm = load_card_side(card, "llm")
    apply_update(llm.model, llm.layout, llm.init, update)
    ids = torch.randint(3, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, llm.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_restart_mid_round_keeps_every_submission(service, files, card, tmp_path):
    from ray import serve

    admin, tokens = files["tokens"]["admin"], files["tokens"]["orgs"]
    spec = {"round_id": "r-restart", "expected_orgs": list(ORGS), "mode": "translate_then_aggregate",
            "weight_space": True}
    assert http(service, "POST", "/v1/rounds", admin, json=spec).status_code == 201
    paths = {org: vector_file(card, tmp_path, org, "r-restart", 10 + i) for i, org in enumerate(ORGS)}
    first = {org: submit_vector(service[0], tokens[org], "r-restart", org, paths[org]) for org in ORGS[:2]}

    serve.delete(APP)  # the app goes away with everything in its memory
    assert requests.get(service[0] + "/healthz", timeout=10).status_code == 404
    bound = files["checkpoint"] / NORM_BOUND_FILE
    bound.rename(bound.with_suffix(".off"))  # a checkpoint without the norm file: the service starts, bound off
    service[2]()  # and comes back on the same state dir
    far = http(service, "POST", "/v1/translate", tokens["org-a"], json={"vector_b64": b64(outlier_bytes(card))})
    assert far.status_code == 200, far.text

    status = http(service, "GET", "/v1/rounds/r-restart", admin).json()
    assert status["orgs"] == ["org-a", "org-b"] and status["status"] == "open"
    assert http(service, "POST", "/v1/rounds", admin, json=spec).status_code == 200  # opening again: a no-op
    again = submit_vector(service[0], tokens["org-a"], "r-restart", "org-a", paths["org-a"])
    assert again["duplicate"] and again["receipt_id"] == first["org-a"]["receipt_id"]
    submit_vector(service[0], tokens["org-c"], "r-restart", "org-c", paths["org-c"])
    closed = http(service, "POST", "/v1/rounds/r-restart/close", admin)
    assert closed.status_code == 200, closed.text
    adapter = closed.json()["result"]["adapter"]
    assert adapter["kind"] == "stacked" and adapter["r"] == 3 * LORA.rank and adapter["lora_alpha"] == 3 * LORA.alpha
    zipped = http(service, "GET", "/v1/rounds/r-restart/adapter", tokens["org-c"])
    (tmp_path / "adapter.zip").write_bytes(zipped.content)
    zipfile.ZipFile(tmp_path / "adapter.zip").extractall(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model(card.llm.path)[0], str(tmp_path / "adapter"))
    assert loaded.peft_config["default"].r == 3 * LORA.rank


def test_cli_refuses_bad_arguments_with_one_error_line(files, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "serve", "--checkpoint", str(tmp_path / "none"),
                          "--card", str(files["card"]), "--tokens", str(files["tokens_path"]),
                          "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "holds no translator.json" in out.stderr
    assert files["tokens"]["admin"] not in out.stdout + out.stderr


def test_serve_config_yaml_is_a_valid_serve_config(ray_cluster):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.schemas import BatchSettings

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app" and set(app.args) <= set(ProviderArgs.model_fields)
    (translator,) = [d for d in app.deployments if d.name == "Translator"]
    assert BatchSettings.model_validate(translator.user_config).max_batch_size <= app.args["max_ongoing_requests"]

"""The organization side: private fine-tune, the vector mechanism with its ledger, submit."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gt_ray import org
from gt_ray.config import DPConfig, FinetuneConfig, PairConfig
from gt_ray.models import make_pair_card
from gt_ray.privacy import VectorMechanism
from gt_ray.privacy_ledger import BudgetExceededError, PrivacyLedger
from gt_ray.wire import load_update, save_update
from tests.conftest import ROOT, tiny_spec

CFG = FinetuneConfig(lr=3e-3, steps=8, batch_size=8, snapshot_steps=[4, 8])
DATA = "generated:k=3,mix=caesar:0.5/add:0.5,n=32,seed=7"


@pytest.fixture(scope="module")
def card_path(tiny_path, gqa_path, tmp_path_factory) -> Path:
    from gt_ray.config import LoraSpec

    lora = LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=lora)
    return make_pair_card(pair, tiny_path, gqa_path).save(tmp_path_factory.mktemp("card") / "card.json")


@pytest.fixture(scope="module")
def vector_file(card_path, tmp_path_factory) -> Path:
    path, _ = org.finetune_org(card_path, DATA, tmp_path_factory.mktemp("vec") / "v.safetensors", cfg=CFG,
                               org_id="acme", round_id="r1", seed=0)
    return path


# ------------------------------------------------------------------------------ data


def test_generated_spec_takes_one_secret_per_task():
    spec = org.parse_generated_spec("generated:ks=caesar:2/add:9,mix=caesar:1/add:3,n=10,seed=7")
    assert spec.secrets == {"caesar": 2, "add": 9} and spec.secret_k == 9  # the heaviest task's
    with pytest.raises(ValueError, match="one secret for each task of mix"):
        org.parse_generated_spec("generated:ks=caesar:2,mix=caesar:1/add:3")
    with pytest.raises(ValueError, match=r"ks\[add\] must be in 0..9"):
        org.parse_generated_spec("generated:ks=caesar:2/add:12,mix=caesar:1/add:3")


def test_generated_spec_parses_and_refuses_public_and_typos():
    spec = org.parse_generated_spec("generated:k=3,mix=caesar:1/add:3,n=10,seed=7")
    assert (spec.split, spec.secret_k, spec.n, spec.seed) == ("private_train", 3, 10, 7)
    assert spec.mixture == {"caesar": 0.25, "add": 0.75}
    assert org.parse_generated_spec("k=0,mix=index,split=private_test").n == FinetuneConfig.n_examples
    with pytest.raises(ValueError, match="split must be one of the private splits .* got 'public'"):
        org.parse_generated_spec("generated:split=public,k=3,mix=add")
    with pytest.raises(ValueError, match="unknown key 'kk'"):
        org.parse_generated_spec("generated:kk=3,mix=add")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        org.parse_generated_spec("generated:k=3,mix=nope:1")
    with pytest.raises(ValueError, match="missing mix"):
        org.parse_generated_spec("generated:k=3")
    with pytest.raises(ValueError, match=r"k must be in 0\.\.9"):
        org.parse_generated_spec("generated:k=10,mix=add")


def test_org_data_description_holds_nothing_of_the_data():
    examples, desc = org.load_org_examples(DATA)
    assert len(examples) == 32 and desc == {"kind": "generated", "split": "private_train"}


@pytest.mark.parametrize("name, text, match", [
    ("bad.jsonl", '{"question": "q", "answer": "a"}\n{not json\n', r"bad\.jsonl:2: not valid JSON"),
    ("cols.jsonl", '{"question": "q"}\n', r"row 1 lacks 'question' or 'answer'"),
    ("data.csv", "question,answer\nq,a\n", r"unsupported data file type '\.csv'"),
    ("bad.parquet", "not parquet", r"not a readable Parquet file"),
])
def test_bad_data_file_is_refused(card_path, tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        org.finetune_org(card_path, str(tmp_path / name), tmp_path / "v.safetensors", cfg=CFG, seed=0)
    assert not (tmp_path / "v.safetensors").exists()


# ------------------------------------------------------------------------- fine-tune


def test_finetune_writes_a_valid_vector_for_the_card(card_path, vector_file):
    from gt_ray.models import PairCard

    card = PairCard.load(card_path)
    update, meta = load_update(vector_file, expected_fingerprint=card.tiny.layout_fingerprint)
    assert update.shape == (card.tiny.n_layers, card.tiny.d_layer) and float(update.abs().max()) > 0
    assert meta["card_id"] == card.card_id and meta["fingerprint"] == card.tiny.layout_fingerprint
    assert (meta["n_examples"], meta["steps"], meta["seed"], meta["org_id"]) == (32, 8, 0, "acme")
    assert meta["dp_sgd"] == {"dp": False} and meta["vector_mechanism"] is None
    assert meta["data"] == {"kind": "generated", "split": "private_train"}


def test_dp_finetune_records_spent_epsilon_and_withholds_the_seed(card_path, tmp_path):
    dp = DPConfig(enabled=True, target_epsilon=4.0, delta=1e-3)
    path, meta = org.finetune_org(card_path, DATA, tmp_path / "v.safetensors", cfg=CFG, dp=dp, seed=1)
    _, stored = load_update(path)
    sgd = stored["dp_sgd"]
    assert sgd["dp"] and sgd["privacy_unit"] == "example" and sgd["target_epsilon"] == 4.0
    assert sgd["epsilon"] == pytest.approx(4.0, rel=0.05) and sgd["delta"] == 1e-3
    assert stored["seed"] is None and stored["seed_withheld"] is True
    with pytest.raises(ValueError, match=r"delta=0.1 must be below 1/n_examples"):
        org.finetune_org(card_path, DATA, tmp_path / "w.safetensors", cfg=CFG,
                         dp=DPConfig(enabled=True, target_epsilon=4.0, delta=0.1), seed=1)


def test_model_that_differs_from_the_card_is_refused(card_path, gqa_path, tmp_path):
    with pytest.raises(ValueError, match=r"refusing the TinyLM at .*: it does not match pair card .*weights sha256"):
        org.finetune_org(card_path, DATA, tmp_path / "v.safetensors", model_path=gqa_path, cfg=CFG, seed=0)
    with pytest.raises(ValueError, match="no Hugging Face model directory at"):
        org.finetune_org(card_path, DATA, tmp_path / "v.safetensors", model_path=tmp_path, cfg=CFG, seed=0)
    assert not (tmp_path / "v.safetensors").exists()


# -------------------------------------------------------------------- vector mechanism


def test_vector_mechanism_spends_the_ledger_and_refuses_over_budget(card_path, tmp_path):
    ledger_path = tmp_path / "ledger.json"
    mech = VectorMechanism(kind="gaussian", epsilon=1.5, delta=1e-6, clip_norm=0.5)
    ledger = org.open_ledger(ledger_path, eps_budget=2.0, delta_budget=1e-5)
    path, meta = org.finetune_org(card_path, DATA, tmp_path / "r1.safetensors", cfg=CFG, vector=mech, ledger=ledger,
                                  org_id="acme", round_id="r1", seed=3)
    rep = meta["vector_mechanism"]
    assert rep["unit"] == "organization" and rep["epsilon"] == 1.5 and rep["sigma"] > 0
    assert "original_norm" not in rep and "clipped" not in rep  # not private: kept local
    assert meta["seed"] is None
    spent = PrivacyLedger(ledger_path, 2.0, 1e-5).spent("acme")
    assert (spent.epsilon, spent.n_releases) == (1.5, 1)

    # A second release of 1.5 would reach 3.0 > 2.0: refused before anything is trained or drawn.
    with pytest.raises(BudgetExceededError, match="privacy budget exceeded for organization 'acme'"):
        org.finetune_org(card_path, DATA, tmp_path / "r2.safetensors", cfg=CFG, vector=mech, ledger=ledger,
                         org_id="acme", round_id="r2", seed=4)
    assert not (tmp_path / "r2.safetensors").exists()
    assert PrivacyLedger(ledger_path, 2.0, 1e-5).spent("acme").n_releases == 1
    with pytest.raises(ValueError, match="already released a vector for round 'r1'"):
        org.finetune_org(card_path, DATA, tmp_path / "again.safetensors", cfg=CFG, vector=mech, ledger=ledger,
                         org_id="acme", round_id="r1", seed=4)
    with pytest.raises(ValueError, match="needs a ledger, an org_id and a round_id"):
        org.finetune_org(card_path, DATA, tmp_path / "x.safetensors", cfg=CFG, vector=mech, seed=4)


def test_cli_vector_release_prints_the_ledger_total_and_budget_refusal(card_path, tmp_path, capsys):
    common = ["finetune", "--card", str(card_path), "--data", DATA, "--steps", "4", "--batch-size", "8",
              "--vector-epsilon", "1", "--vector-mechanism", "laplace", "--vector-clip", "2",
              "--ledger", str(tmp_path / "ledger.json"), "--eps-budget", "1.5", "--org-id", "acme"]
    org.main(common + ["--out", str(tmp_path / "a.safetensors"), "--round", "r1"])
    out = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert out["vector_mechanism"] == "laplace" and out["vector_delta"] == "0"
    assert (out["ledger_spent_epsilon"], out["ledger_releases"]) == ("1", "1")
    with pytest.raises(SystemExit) as exc:
        org.main(common + ["--out", str(tmp_path / "b.safetensors"), "--round", "r2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: privacy budget exceeded for organization 'acme': spent epsilon=1")
    assert not (tmp_path / "b.safetensors").exists()


# ---------------------------------------------------------------------------- submit


class _Provider:
    """A stdlib HTTP server on 127.0.0.1 answering from a script of (status, body)."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                status, payload = outer.script.pop(0) if outer.script else (500, {"detail": "script ran out"})
                if payload == "receipt":
                    blob = base64.b64decode(outer.requests[-1]["body"]["vector_b64"])
                    payload = {"receipt_id": "rc-1", "round_id": "r1", "org_id": "acme", "received_at": "now",
                               "sha256": hashlib.sha256(blob).hexdigest(), "duplicate": False}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def provider():
    servers = []

    def start(script):
        servers.append(_Provider(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_submit_retries_503_with_the_same_key_and_token(provider, vector_file):
    p = provider([(503, {"detail": "warming up"}), (503, {"detail": "warming up"}), (201, "receipt")])
    receipt = org.submit_vector(p.url, "s3cret", "r1", "acme", vector_file, backoff_s=0.01)
    blob = vector_file.read_bytes()
    assert receipt["receipt_id"] == "rc-1" and receipt["sha256"] == hashlib.sha256(blob).hexdigest()
    assert len(p.requests) == 3
    assert {r["path"] for r in p.requests} == {"/v1/rounds/r1/submissions"}
    assert {r["headers"]["Authorization"] for r in p.requests} == {"Bearer s3cret"}
    assert {r["headers"]["Idempotency-Key"] for r in p.requests} == {org.default_idempotency_key("acme", "r1", blob)}
    body = p.requests[0]["body"]
    assert (body["org_id"], body["n_examples"]) == ("acme", 32) and base64.b64decode(body["vector_b64"]) == blob


def test_default_idempotency_key_is_deterministic_and_bound_to_org_round_and_bytes():
    k = org.default_idempotency_key("acme", "r1", b"abc")
    assert k == org.default_idempotency_key("acme", "r1", b"abc")
    assert len({k, org.default_idempotency_key("acme", "r2", b"abc"), org.default_idempotency_key("acme", "r1", b"abd"),
                org.default_idempotency_key("acme1", "r", b"abc")}) == 4


@pytest.mark.parametrize("status", [401, 409, 422])
def test_submit_does_not_retry_client_errors(provider, vector_file, status):
    p = provider([(status, {"detail": f"nope {status}"}), (201, "receipt")])
    with pytest.raises(org.SubmissionError, match=f"refused the submission: HTTP {status}: nope {status}"):
        org.submit_vector(p.url, "s3cret", "r1", "acme", vector_file, backoff_s=0.01)
    assert len(p.requests) == 1


def test_submit_gives_up_after_max_attempts(provider, vector_file):
    p = provider([(503, {"detail": "down"})] * 3)
    with pytest.raises(org.SubmissionError, match=r"could not submit after 3 attempts \(last: HTTP 503: down\)"):
        org.submit_vector(p.url, "s3cret", "r1", "acme", vector_file, max_attempts=3, backoff_s=0.01)
    assert len(p.requests) == 3


def test_invalid_vector_is_never_sent(provider, vector_file, tmp_path):
    p = provider([(201, "receipt")])
    bad = tmp_path / "nan.safetensors"
    save_update(bad, torch.zeros(2, 4), "fp", {"n_examples": 3})
    raw = bytearray(bad.read_bytes())
    raw[-4:] = torch.tensor([float("nan")]).numpy().tobytes()  # last value -> NaN, header intact
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="non-finite"):
        org.submit_vector(p.url, "s3cret", "r1", "acme", bad)
    with pytest.raises(ValueError, match="was made for org_id='acme', not 'other'"):
        org.submit_vector(p.url, "s3cret", "r1", "other", vector_file)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        org.submit_vector(p.url, "s3cret", "r1", "acme", tmp_path / "junk.safetensors")
    assert p.requests == []


def test_cli_finetune_that_does_not_move_the_weights_prints_one_error_line(card_path, tmp_path, capsys):
    # lr 1e-50 is 0 in float32: AdamW leaves every LoRA weight where it was.
    out = tmp_path / "v.safetensors"
    with pytest.raises(SystemExit) as exc:
        org.main(["finetune", "--card", str(card_path), "--data", DATA, "--out", str(out), "--steps", "2",
                  "--batch-size", "8", "--lr", "1e-50", "--seed", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: LoRA weights did not move by step 1: the update is zero "
        "(try a larger --lr or more --steps; nothing was written)"]
    assert not out.exists()


# ----------------------------------------------------------------- CLI in subprocesses


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "org", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_finetune_bad_input_exits_2_with_one_error_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    r = _cli("finetune", "--card", "card.json", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "v"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'bad.jsonl'}:1: not valid JSON (Expecting property name enclosed in double quotes)"]


def test_cli_submit_bad_input_exits_2_with_one_error_line(tmp_path):
    (tmp_path / "v.safetensors").write_bytes(b"junk")
    r = _cli("submit", "--endpoint", "http://127.0.0.1:9", "--token", "t", "--round", "r1", "--org-id", "acme",
             str(tmp_path / "v.safetensors"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "not a readable safetensors file" in r.stderr
    r = _cli("submit", "--endpoint", "http://127.0.0.1:9", "--round", "r1", "--org-id", "acme", "v")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: gt-ray org submit: one of the arguments --token --token-file is required (see --help)")


def test_org_finetune_runs_without_loading_ray(card_path, tmp_path):
    code = (f"import sys\nfrom gt_ray import org\n"
            f"org.main(['finetune', '--card', {str(card_path)!r}, '--data', {DATA!r}, '--out', "
            f"{str(tmp_path / 'v.safetensors')!r}, '--steps', '4', '--batch-size', '8', '--seed', '0'])\n"
            "print('ray_loaded=' + str(any(m == 'ray' or m.startswith('ray.') for m in sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert out["ray_loaded"] == "False" and out["dp_sgd"] == "off" and out["n_examples"] == "32"
    assert Path(out["path"]).is_file()

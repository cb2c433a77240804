"""The organization's upload: retries with one idempotency key, refusals, local checks."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from gt_ray.org import client
from gt_ray.wire import save_update
from tests.org_fixtures import card_path, vector_file  # noqa: F401  (fixtures)


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
    receipt = client.submit_vector(p.url, "s3cret", "r1", "acme", vector_file, backoff_s=0.01)
    blob = vector_file.read_bytes()
    assert receipt["receipt_id"] == "rc-1" and receipt["sha256"] == hashlib.sha256(blob).hexdigest()
    assert len(p.requests) == 3
    assert {r["path"] for r in p.requests} == {"/v1/rounds/r1/submissions"}
    assert {r["headers"]["Authorization"] for r in p.requests} == {"Bearer s3cret"}
    assert {r["headers"]["Idempotency-Key"] for r in p.requests} == {client.default_idempotency_key("acme", "r1", blob)}
    body = p.requests[0]["body"]
    assert (body["org_id"], body["n_examples"]) == ("acme", 32) and base64.b64decode(body["vector_b64"]) == blob


def test_default_idempotency_key_is_deterministic_and_bound_to_org_round_and_bytes():
    k = client.default_idempotency_key("acme", "r1", b"abc")
    assert k == client.default_idempotency_key("acme", "r1", b"abc")
    assert len({k, client.default_idempotency_key("acme", "r2", b"abc"), client.default_idempotency_key("acme", "r1", b"abd"),
                client.default_idempotency_key("acme1", "r", b"abc")}) == 4


def test_default_idempotency_key_is_the_length_prefixed_sha256():
    h = hashlib.sha256()
    for part in (b"gt-ray-submission-v1", b"acme", b"r1", b"abc"):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    assert client.default_idempotency_key("acme", "r1", b"abc") == h.hexdigest()


@pytest.mark.parametrize("status", [401, 409, 422])
def test_submit_does_not_retry_client_errors(provider, vector_file, status):
    p = provider([(status, {"detail": f"nope {status}"}), (201, "receipt")])
    with pytest.raises(client.SubmissionError, match=f"refused the submission: HTTP {status}: nope {status}"):
        client.submit_vector(p.url, "s3cret", "r1", "acme", vector_file, backoff_s=0.01)
    assert len(p.requests) == 1


def test_submit_gives_up_after_max_attempts(provider, vector_file):
    p = provider([(503, {"detail": "down"})] * 3)
    with pytest.raises(client.SubmissionError, match=r"could not submit after 3 attempts \(last: HTTP 503: down\)"):
        client.submit_vector(p.url, "s3cret", "r1", "acme", vector_file, max_attempts=3, backoff_s=0.01)
    assert len(p.requests) == 3


def test_invalid_vector_is_never_sent(provider, vector_file, tmp_path):
    p = provider([(201, "receipt")])
    bad = tmp_path / "nan.safetensors"
    save_update(bad, torch.zeros(2, 4), "fp", {"n_examples": 3})
    raw = bytearray(bad.read_bytes())
    raw[-4:] = torch.tensor([float("nan")]).numpy().tobytes()  # last value -> NaN, header intact
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="non-finite"):
        client.submit_vector(p.url, "s3cret", "r1", "acme", bad)
    with pytest.raises(ValueError, match="was made for org_id='acme', not 'other'"):
        client.submit_vector(p.url, "s3cret", "r1", "other", vector_file)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        client.submit_vector(p.url, "s3cret", "r1", "acme", tmp_path / "junk.safetensors")
    assert p.requests == []

"""The provider service in the loop: start it, run one aggregation round over HTTP, stop it.

Used by ``gt-ray demo``. The service is started as its own process (``gt-ray serve``, on
the demo's Ray cluster), because jobs/ and serve/ do not import each other. Organizations
fine-tune locally on their dataset spec (``gt_ray.org.finetune.finetune_org``) and submit
with ``gt_ray.org.client.submit_vector``, exactly as ``gt-ray org finetune`` / ``gt-ray org
submit`` do; the round's adapter is downloaded and checked with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests
import torch

from gt_ray.config import ExperimentConfig
from gt_ray.evaluate import draw_org_specs
from gt_ray.models import PairCard
from gt_ray.org.client import submit_vector
from gt_ray.org.finetune import finetune_org
from gt_ray.wire import parse_update_bytes, update_to_bytes
from jobs.common import kv, work_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokens(path: Path, org_ids: list[str]) -> dict:
    tokens = {"admin": secrets.token_urlsafe(24), "orgs": {o: secrets.token_urlsafe(24) for o in org_ids}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    return tokens


@contextmanager
def running_service(cfg: ExperimentConfig, checkpoint: Path, card_path: Path, tokens_path: Path,
                    address: str, timeout_s: float = 180) -> Iterator[str]:
    """Start ``gt-ray serve`` on the cluster at ``address``; yield its base URL; stop it."""
    port = free_port()
    state = work_dir(cfg) / "serve_state"
    cmd = [sys.executable, "-m", "jobs.cli", "serve", "--checkpoint", str(checkpoint), "--card", str(card_path),
           "--tokens", str(tokens_path), "--state-dir", str(state), "--port", str(port), "--address", address,
           "--max-batch-size", "8"]
    log = open(work_dir(cfg) / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}; see {log.name}")
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"the service was not ready after {timeout_s} s; see {log.name}")
        kv(stage="serve", status="ready", url=url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def http_translator(url: str, token: str, card: PairCard):
    """A translate function (B, L_tiny, d_tiny) -> (B, L_llm, d_llm) that calls POST /v1/translate."""
    session = requests.Session()

    def translate(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for v in x:
            blob = update_to_bytes(v, card.tiny.layout_fingerprint)
            r = session.post(f"{url}/v1/translate", json={"vector_b64": base64.b64encode(blob).decode()},
                             headers={"Authorization": f"Bearer {token}"}, timeout=120)
            r.raise_for_status()
            y, _ = parse_update_bytes(base64.b64decode(r.json()["vector_b64"]), card.llm.layout_fingerprint,
                                      (card.llm.n_layers, card.llm.d_layer))
            outs.append(y)
        return torch.stack(outs)

    return translate


def run_round(cfg: ExperimentConfig, card_path: Path, url: str, tokens: dict, seed: int) -> dict:
    """Organizations fine-tune and submit; the admin closes the round; the adapter is checked."""
    from peft import PeftModel

    from gt_ray.models import load_model

    card = PairCard.load(card_path)
    out = work_dir(cfg) / "orgs"
    round_id = f"demo-{seed}-{int(time.time())}"
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    r = requests.post(f"{url}/v1/rounds", json={"round_id": round_id, "rule": "mean",
                                                "expected_orgs": list(tokens["orgs"])}, headers=admin, timeout=60)
    r.raise_for_status()
    specs = draw_org_specs(cfg.tasks.names, len(tokens["orgs"]), seed, cfg.finetune.n_examples, cfg.tasks.dirichlet_alpha,
                           cfg.tasks.secret_per_task)
    for (org_id, token), spec in zip(tokens["orgs"].items(), specs):
        path, _ = finetune_org(card, spec, out / f"{org_id}.safetensors", cfg=cfg.finetune, org_id=org_id,
                               round_id=round_id, seed=spec.seed)
        receipt = submit_vector(url, token, round_id, org_id, path)
        kv(stage="serve", org=org_id, receipt=receipt["receipt_id"], duplicate=receipt["duplicate"])
    r = requests.post(f"{url}/v1/rounds/{round_id}/close", headers=admin, timeout=300)
    r.raise_for_status()
    status = r.json()
    z = requests.get(f"{url}/v1/rounds/{round_id}/adapter", headers=admin, timeout=300)
    z.raise_for_status()
    adapter_dir = work_dir(cfg) / "adapters" / round_id
    zipfile.ZipFile(io.BytesIO(z.content)).extractall(adapter_dir)
    base, _ = load_model(card.llm.path)
    PeftModel.from_pretrained(base, str(adapter_dir))  # loads unchanged as a standard PEFT adapter
    kv(stage="serve", round=round_id, status=status["status"], submissions=status["n_submissions"], adapter=adapter_dir)
    return {"round_id": round_id, "status": status, "adapter": str(adapter_dir)}

"""Soak test of the provider service: many organizations and rounds, the service SIGKILLed mid-run.

    python benchmarks/soak_serve.py --out benchmarks/results/soak.json   # 50 orgs x 20 rounds, 2 kills

Runs ``gt-ray serve`` (``python -m jobs.cli serve``) as a child process with its own local
Ray cluster on 127.0.0.1, opens ``--rounds`` rounds that each expect all ``--orgs``
organizations (the rules and modes cycle through mean, weighted mean, median, trimmed mean
and the weight-space mean), and has ``--threads`` client threads send every organization's
vector to every round with :func:`gt_ray.org.client.submit_vector` (retries with one idempotency
key per submission). A round is closed (and its adapter exported) as soon as the clients
hold all of its receipts, while other rounds still take submissions. After a third and
after two thirds of the submissions (``--kills``), the whole service -- driver, raylet,
GCS, every replica -- gets SIGKILL, not a clean stop, and is started again on the same
state directory and port. The clients keep retrying through the outage (bounded).

Then, from the state directory and a local copy of the translator and the LLM:

- every receipt a client got is in its round exactly once (same receipt id and sha256);
  ``lost`` counts accepted receipts missing from the round, ``duplicated`` counts slots
  holding another receipt or a second acceptance of one submission (both should be 0);
- every closed round's LLM update (or per-organization vectors for the weight-space
  mean) equals a recomputation from its stored vectors, and its served adapter zip holds
  the same tensors as an adapter exported here from that recomputation.

Counts and timings are printed as ``key=value`` lines and written as JSON. Every loop is
bounded (attempts and deadlines); only loopback addresses are used.
"""

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from safetensors.torch import load as load_safetensors_bytes

from bench_serve import build_provider_files  # the sibling script (run this one as a script)
from gt_ray.models import load_card_side
from gt_ray.org.client import SubmissionError, submit_vector
from gt_ray.rounds import RoundStore, compute_round_update, write_stacked_adapter
from gt_ray.translator.checkpoint import load_translator, write_norm_bound
from gt_ray.updates import export_peft_adapter
from gt_ray.wire import save_update

ROOT = Path(__file__).resolve().parents[1]
ROUND_KINDS = [
    {"rule": "mean"},
    {"rule": "weighted_mean", "mode": "translate_then_aggregate"},
    {"rule": "median"},
    {"rule": "trimmed_mean", "mode": "translate_then_aggregate", "trim_fraction": 0.1},
    {"rule": "mean", "mode": "translate_then_aggregate", "weight_space": True},
]
RETRYABLE = (None, 404, 500, 502, 503, 504)
"""Statuses a restarting service gives: no answer, Serve's 404 before the app is back, 5xx."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    p.add_argument("--orgs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs of the whole service, evenly spread")
    p.add_argument("--threads", type=int, default=16, help="client threads")
    p.add_argument("--attempts", type=int, default=60, help="submit_vector calls per submission at most")
    p.add_argument("--deadline-s", type=float, default=1800.0, help="the whole run, at most")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the service's local Ray cluster")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# ----------------------------------------------------------------------------- the service process


class Service:
    """``gt-ray serve`` in its own session; ``kill()`` SIGKILLs the session, ``start()`` brings it back."""

    def __init__(self, root: Path, port: int, num_cpus: int) -> None:
        self.root, self.port, self.num_cpus = root, port, num_cpus
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 600.0, launches: int = 3) -> float:
        """Start and wait until ``/readyz`` answers 200; returns the seconds it took.

        A launch that exits before it is ready (Ray's startup can time out on a loaded
        machine) is cleaned up and tried again, ``launches`` times at most.
        """
        t0 = time.time()
        for launch in range(launches):
            try:
                self._launch(timeout_s)
                return time.time() - t0
            except RuntimeError as e:
                print(f"service launch {launch + 1} failed: {e}", flush=True)
                self.kill()
        raise RuntimeError(f"the service did not start in {launches} launches")

    def _launch(self, timeout_s: float) -> None:
        t0 = time.time()
        self.starts += 1
        temp = Path(tempfile.mkdtemp(prefix="gtr-soak-", dir="/tmp"))  # short: Ray's unix sockets
        self.temp = temp
        log = open(self.root / f"service-{self.starts}.log", "wb")
        cmd = [sys.executable, "-m", "jobs.cli", "serve", "--checkpoint", str(self.root / "translator"),
               "--card", str(self.root / "pair_card.json"), "--tokens", str(self.root / "tokens.json"),
               "--state-dir", str(self.root / "state"), "--port", str(self.port), "--num-cpus", str(self.num_cpus),
               "--temp-dir", str(temp), "--max-batch-size", "8", "--batch-wait-timeout-s", "0.01"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}; see {log.name}")
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the service was not ready within {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL every process of the service's session (driver, raylet, GCS, workers)."""
        sid = self.proc.pid
        for _ in range(10):  # bounded: processes forked while killing are caught by the next pass
            pids = [pid for pid in _pids() if _session(pid) == sid or str(self.temp) in _cmdline(pid)]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)

    def stop(self) -> None:
        """A clean stop at the end (SIGTERM, then SIGKILL of what is left)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _session(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the run


def admin_call(method: str, url: str, token: str, deadline: float, **kw) -> requests.Response:
    """An admin request retried through restarts (bounded by ``deadline``)."""
    while True:
        try:
            r = requests.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=300, **kw)
            if r.status_code not in RETRYABLE or r.json().get("detail", "").startswith("unknown round"):
                return r
        except (requests.RequestException, ValueError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{method} {url} did not succeed before the deadline")
        time.sleep(1.0)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    t_start = time.time()
    deadline = t_start + args.deadline_s
    root = Path(tempfile.mkdtemp(prefix="gtr-soak-run-", dir="/tmp"))
    rng = random.Random(args.seed)
    files = build_provider_files(root, args.orgs, args.seed)
    card, tokens = files["card"], files["tokens"]
    shape = (card.tiny.n_layers, card.tiny.d_layer)
    gen = torch.Generator().manual_seed(args.seed)
    corpus = torch.randn(64, *shape, generator=gen) * 0.01
    write_norm_bound(root / "translator", corpus, card.tiny.layout_fingerprint)
    orgs = sorted(tokens["orgs"])
    round_ids = [f"soak-{i:02d}" for i in range(args.rounds)]
    vectors = {}  # (round, org) -> file
    for r in round_ids:
        for o in orgs:
            path = root / "vectors" / r / f"{o}.safetensors"
            vectors[(r, o)] = save_update(path, torch.randn(*shape, generator=gen) * 0.01, card.tiny.layout_fingerprint,
                                          {"n_examples": rng.randint(8, 64), "org_id": o, "round_id": r})
    # Round-major order, shuffled within a round: rounds fill one after another and close
    # while later rounds still take submissions.
    tasks = [(r, o) for r in round_ids for o in rng.sample(orgs, len(orgs))]

    service = Service(root, _free_port(), args.num_cpus)
    events: list[dict] = []
    receipts: dict[tuple[str, str], dict] = {}
    stats = {"attempt_calls": 0, "duplicate_answers": 0, "retried_errors": 0, "refused": 0, "gave_up": 0}
    refusals: list[str] = []
    lock = threading.Lock()
    closable: list[str] = []
    close_results: dict[str, dict] = {}
    zips: dict[str, bytes | None] = {}
    submit_s = float("nan")
    try:
        events.append({"event": "start", "ready_s": service.start()})
        for i, r in enumerate(round_ids):
            body = {"round_id": r, **ROUND_KINDS[i % len(ROUND_KINDS)], "expected_orgs": orgs}
            created = admin_call("POST", service.url + "/v1/rounds", tokens["admin"], deadline, json=body)
            assert created.status_code in (200, 201), created.text

        def submit(task: tuple[str, str]) -> None:
            r, o = task
            session = requests.Session()
            for _ in range(args.attempts):
                if time.time() > deadline:
                    break
                with lock:
                    stats["attempt_calls"] += 1
                try:
                    receipt = submit_vector(service.url, tokens["orgs"][o], r, o, vectors[task], max_attempts=3,
                                            backoff_s=0.5, max_backoff_s=2.0, timeout_s=60, session=session)
                except SubmissionError as e:
                    if e.status in RETRYABLE and not str(e.detail).startswith("unknown round"):
                        with lock:
                            stats["retried_errors"] += 1
                        time.sleep(1.0)
                        continue
                    with lock:
                        stats["refused"] += 1
                        refusals.append(f"{r}/{o}: {e}")
                    return
                with lock:
                    stats["duplicate_answers"] += receipt["duplicate"]
                    first = receipts.setdefault(task, receipt)
                    if first["receipt_id"] != receipt["receipt_id"]:
                        refusals.append(f"{r}/{o}: two receipts {first['receipt_id']} {receipt['receipt_id']}")
                    if sum(1 for (rr, _) in receipts if rr == r) == len(orgs):
                        closable.append(r)
                return
            with lock:
                stats["gave_up"] += 1

        def closer(stop: threading.Event) -> None:
            while not (stop.is_set() and not closable) and time.time() < deadline:
                with lock:
                    r = closable.pop(0) if closable else None
                if r is None:
                    time.sleep(0.2)
                    continue
                t0 = time.time()
                res = admin_call("POST", f"{service.url}/v1/rounds/{r}/close", tokens["admin"], deadline)
                close_results[r] = {"status": res.status_code, "seconds": time.time() - t0, "body": res.json()}

        stop = threading.Event()
        closing = threading.Thread(target=closer, args=(stop,), daemon=True)
        closing.start()
        kill_at = [len(tasks) * (k + 1) // (args.kills + 1) for k in range(args.kills)]
        t_submit = time.time()
        with ThreadPoolExecutor(args.threads) as pool:
            futures = [pool.submit(submit, t) for t in tasks]
            for at in kill_at:
                while len(receipts) < at and time.time() < deadline and not all(f.done() for f in futures):
                    time.sleep(0.05)
                t0 = time.time()
                service.kill()
                killed_at = len(receipts)
                ready_s = service.start()
                events.append({"event": "sigkill+restart", "accepted_before": killed_at, "ready_s": ready_s,
                               "outage_s": time.time() - t0})
                print(f"sigkill at accepted={killed_at} restart_ready_s={ready_s:.1f}", flush=True)
            for f in futures:
                f.result()
        submit_s = time.time() - t_submit
        stop.set()
        closing.join(timeout=max(1.0, deadline - time.time()))
        for r in round_ids:  # rounds a client gave up on, or closes the deadline cut: try once more
            if r not in close_results or close_results[r]["status"] != 200:
                res = admin_call("POST", f"{service.url}/v1/rounds/{r}/close", tokens["admin"], deadline)
                close_results[r] = {"status": res.status_code, "seconds": 0.0, "body": res.json()}
        for r in round_ids:
            res = admin_call("GET", f"{service.url}/v1/rounds/{r}/adapter", tokens["admin"], deadline)
            zips[r] = res.content if res.status_code == 200 else None
    except RuntimeError as e:  # the deadline, or a service that would not start: verify what there is
        events.append({"event": "aborted", "reason": str(e)})
        print(f"aborted: {e}", flush=True)
    finally:
        service.stop()

    # ------------------------------------------------------------------------- verification
    store = RoundStore(root / "state", card)
    translator = load_translator(root / "translator")
    llm = load_card_side(card, "llm")
    lost, duplicated, orphans, mismatched_rounds, verified = [], [], [], [], 0
    for r in round_ids:
        state = store.get(r)
        stored = {o: s.receipt_id for o, s in state.submissions.items()}
        ids = list(stored.values())
        duplicated += [f"{r}: receipt {i} twice" for i in set(ids) if ids.count(i) > 1]
        files_on_disk = {p.stem for p in (store.round_dir(r) / "submissions").glob("*.safetensors")}
        orphans += sorted(f"{r}/{o}" for o in files_on_disk - set(stored))
        for (rr, o), receipt in receipts.items():
            if rr != r:
                continue
            if o not in stored:
                lost.append(f"{r}/{o}")
            elif stored[o] != receipt["receipt_id"] or state.submissions[o].sha256 != receipt["sha256"]:
                duplicated.append(f"{r}/{o}: the client holds {receipt['receipt_id']}, the round {stored[o]}")
        if state.status != "closed" or zips.get(r) is None:
            mismatched_rounds.append(f"{r}: status {state.status}, adapter {'yes' if zips.get(r) else 'no'}")
            continue
        members = sorted(state.submissions)
        xs = [store.load_submission(state, o) for o in members]
        counts = [state.submissions[o].n_examples for o in members]
        with torch.no_grad():
            again = compute_round_update(state.spec, xs, counts, translator.translate, store.llm_shape)
        served = store.load_result(state)
        expected = again.translated if state.spec.weight_space else again.update
        ok = torch.allclose(served, expected, rtol=1e-4, atol=1e-6)
        adapter_dir = root / "recomputed" / r
        if state.spec.weight_space:
            write_stacked_adapter(adapter_dir, llm, again.translated, state.result["weights"])
        else:
            export_peft_adapter(llm.model, llm.layout, llm.init, again.update, adapter_dir)
            llm.reset()
        mine = load_safetensors_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
        with zipfile.ZipFile(io.BytesIO(zips[r])) as z:
            theirs = load_safetensors_bytes(z.read("adapter_model.safetensors"))
        ok = ok and set(mine) == set(theirs) and all(
            torch.allclose(mine[k], theirs[k], rtol=1e-4, atol=1e-6) for k in mine)
        if ok:
            verified += 1
        else:
            mismatched_rounds.append(f"{r}: the adapter differs from the recomputation")

    summary = {
        "orgs": args.orgs, "rounds": args.rounds, "submissions_planned": len(tasks),
        "accepted_receipts": len(receipts), "lost": len(lost), "duplicated": len(duplicated),
        "duplicate_answers_on_retry": stats["duplicate_answers"], "submit_vector_calls": stats["attempt_calls"],
        "retried_errors": stats["retried_errors"], "refused": stats["refused"], "gave_up": stats["gave_up"],
        "orphan_files": len(orphans), "sigkills_done": sum(e["event"] == "sigkill+restart" for e in events),
        "aborted": any(e["event"] == "aborted" for e in events), "rounds_closed": sum(
            store.get(r).status == "closed" for r in round_ids),
        "adapters_matching_recomputation": verified, "rounds_not_verified": len(mismatched_rounds),
        "submit_phase_s": round(submit_s, 1), "total_s": round(time.time() - t_start, 1),
    }
    for key, value in summary.items():
        print(f"{key}={value}")
    result = {"benchmark": "serve_soak", "summary": summary, "events": events,
              "close_seconds": {r: round(v["seconds"], 2) for r, v in close_results.items()},
              "round_kinds": {r: ROUND_KINDS[i % len(ROUND_KINDS)] for i, r in enumerate(round_ids)},
              "details": {"lost": lost, "duplicated": duplicated, "orphans": orphans,
                          "not_verified": mismatched_rounds, "refusals": refusals[:50]},
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"cpus": os.cpu_count(), "load_avg_after": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(root, ignore_errors=True)
    ok = not (lost or duplicated or mismatched_rounds or stats["refused"] or stats["gave_up"] or summary["aborted"])
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

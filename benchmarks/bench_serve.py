"""Load test of the provider service: POST /v1/translate at max_batch_size 1 vs 8 vs 32.

    python benchmarks/bench_serve.py --out benchmarks/results/serve.json

Starts a local Ray cluster (loopback) and deploys the app from a Serve config through the
dashboard's REST API (what ``serve deploy`` does), so changing the Translator's
``user_config`` reconfigures the running replica in place; the script checks the replica
was not restarted. Then ``--concurrency`` threads, one organization (token) each, post
``--requests`` translations per setting with ``requests`` and record throughput, latency
percentiles, failures and the batch sizes the Translator saw. ``--body binary`` (default)
posts the safetensors file as ``application/octet-stream`` and gets the LLM file back;
``--body json`` the base64 JSON body.

Where a request's time goes: during each load the CPU seconds of every process on the
path (client, Serve proxy, the Aggregator ingress, the Translator replica) are read from
``/proc`` and reported per request, next to the Translator's time in the model.

Sizes follow the tiny scale: TinyLM layout 2x512 (hidden 64, 2 layers), LLM layout 4x1024
(hidden 128, 4 layers), LoRA r=2 on q/v, translator d_model 128 with 2+2 layers. The
models and the translator are random (cost does not depend on the weights). Client,
proxy, ingress and translator share the machine's cores: the JSON records the CPU count
and load average, since other processes skew the numbers.
"""

import argparse
import base64
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

from gt_ray.config import LoraSpec, ModelSpec, PairConfig, PretrainConfig
from gt_ray.models import make_pair_card, prepare_model
from gt_ray.wire import update_to_bytes
from gt_ray.translator.checkpoint import save_translator
from gt_ray.translator.config import TranslatorConfig
from gt_ray.translator.model import GradTransformer, Normalizer, Translator

APP = "gt-ray-bench"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.05,
                   help="the Translator user_config wait (the service default is 0.01)")
    p.add_argument("--concurrency", type=int, default=32, help="client threads, one organization each")
    p.add_argument("--body", choices=["binary", "json"], default="binary",
                   help="application/octet-stream safetensors (default) or JSON with base64")
    p.add_argument("--requests", type=int, default=640, help="translations per setting (bounded)")
    p.add_argument("--warmup", type=int, default=32, help="untimed translations per setting")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="Serve's per-request access log lines (proxy and replicas)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def model_spec(hidden: int, layers: int) -> ModelSpec:
    arch = dict(model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    return ModelSpec(arch=arch, pretrain=PretrainConfig(steps=1, warmup_steps=0, batch_size=4, seed=0))


def build_provider_files(root: Path, n_orgs: int, seed: int) -> dict:
    """A pair card (2x512 -> 4x1024), a random translator with its fingerprints, a tokens file."""
    tasks = ["caesar", "add"]
    pair = PairConfig(tiny=model_spec(64, 2), llm=model_spec(128, 4),
                      lora=LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"]))
    card = make_pair_card(pair, prepare_model(pair.tiny, root / "cache", tasks),
                          prepare_model(pair.llm, root / "cache", tasks))
    assert (card.tiny.n_layers, card.tiny.d_layer, card.llm.n_layers, card.llm.d_layer) == (2, 512, 4, 1024)
    cfg = TranslatorConfig(d_tiny=512, L_tiny=2, d_llm=1024, L_llm=4, d_model=128, num_layers=2, num_heads=4,
                           d_ff=512, dropout=0.0)
    torch.manual_seed(seed)
    normalizer = Normalizer.fit(torch.randn(64, 2, 512), torch.randn(64, 4, 1024), "coordinate")
    save_translator(Translator(cfg, GradTransformer(cfg), normalizer).eval(), root / "translator",
                    {"fingerprints": {"tiny": card.tiny.layout_fingerprint, "llm": card.llm.layout_fingerprint}})
    tokens = {"admin": secrets.token_urlsafe(24),
              "orgs": {f"org-{i:02d}": secrets.token_urlsafe(24) for i in range(n_orgs)}}
    (root / "tokens.json").write_text(json.dumps(tokens))
    return {"card": card, "card_path": card.save(root / "pair_card.json"), "tokens": tokens}


def serve_config(root: Path, port: int, max_batch_size: int, wait_s: float, max_ongoing: int,
                 access_log: bool) -> dict:
    """The same shape as serve/config.yaml, with this run's paths, batching and access logging."""
    return {
        "proxy_location": "HeadOnly",
        "logging_config": {"enable_access_log": access_log},
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "serve.app:build_app",
            "args": {"checkpoint": str(root / "translator"), "card": str(root / "pair_card.json"),
                     "tokens": str(root / "tokens.json"), "state_dir": str(root / "state"),
                     "max_ongoing_requests": max_ongoing, "translator_num_cpus": 1.0, "ingress_num_cpus": 0.5},
            "deployments": [{"name": "Translator", "user_config": {"max_batch_size": max_batch_size,
                                                                   "batch_wait_timeout_s": wait_s}}],
        }],
    }


def deploy(dashboard: str, config: dict, base: str, admin: str, max_batch_size: int, timeout_s: float = 300) -> dict:
    """PUT the config (as ``serve deploy`` does); wait until the Translator reports the batch size."""
    r = requests.put(f"{dashboard}/api/serve/applications/", json=config, timeout=timeout_s)
    r.raise_for_status()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            stats = requests.get(f"{base}/v1/stats", headers={"Authorization": f"Bearer {admin}"}, timeout=10)
            if stats.status_code == 200 and stats.json()["max_batch_size"] == max_batch_size:
                return stats.json()
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the app did not come up with max_batch_size={max_batch_size} in {timeout_s} s")


def run_load(base: str, tokens: dict, bodies: list[bytes], n_requests: int, concurrency: int,
             content_type: str) -> dict:
    """``n_requests`` translations from ``concurrency`` threads; latencies of the successes."""
    orgs = sorted(tokens["orgs"])
    latencies: list[float] = []
    failures: list[str] = []
    lock, counter = threading.Lock(), iter(range(n_requests))
    barrier = threading.Barrier(concurrency + 1)

    def worker(k: int) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {tokens['orgs'][orgs[k % len(orgs)]]}",
                   "Content-Type": content_type}
        barrier.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            try:
                r = session.post(f"{base}/v1/translate", data=bodies[i % len(bodies)], headers=headers, timeout=120)
                ok, why = r.status_code == 200, f"HTTP {r.status_code}"
            except requests.RequestException as e:
                ok, why = False, type(e).__name__
            dt = time.perf_counter() - t0
            with lock:
                (latencies.append(dt) if ok else failures.append(why))
        session.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"requests": n_requests, "ok": len(latencies), "failures": len(failures),
            "failure_kinds": sorted(set(failures)), "wall_s": wall, "throughput_vps": len(latencies) / wall,
            "latency_p50_ms": 1000 * pct(0.50), "latency_p99_ms": 1000 * pct(0.99),
            "latency_mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan")}


PATH_PROCESSES = {"proxy": "ProxyActor", "ingress": f"ServeReplica:{APP}:Aggregator",
                  "translator": f"ServeReplica:{APP}:Translator"}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of this client and of each Serve process on the path (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")

    def of(pid: str) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    out = {"client": of(str(os.getpid()))}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            for role, marker in PATH_PROCESSES.items():
                if cmd.startswith("ray::") and marker in cmd:
                    out[role] = out.get(role, 0.0) + of(p.name)
        except OSError:
            continue
    return out


def batch_delta(before: dict, after: dict) -> dict:
    hist = {k: after["histogram"].get(k, 0) - before["histogram"].get(k, 0) for k in after["histogram"]}
    hist = {k: v for k, v in sorted(hist.items(), key=lambda kv: int(kv[0])) if v}
    batches = sum(hist.values())
    return {"batches": batches, "mean_batch": sum(int(k) * v for k, v in hist.items()) / max(batches, 1),
            "max_batch": max((int(k) for k in hist), default=0), "histogram": hist,
            "translator_busy_s": after["busy_s"] - before["busy_s"]}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="gtr-bench-serve-", dir="/tmp"))
    files = build_provider_files(root, args.concurrency, args.seed)
    card, tokens = files["card"], files["tokens"]
    gen = torch.Generator().manual_seed(args.seed)
    xs = [torch.randn(2, 512, generator=gen) * 0.01 for _ in range(64)]
    vector_files = [update_to_bytes(x, card.tiny.layout_fingerprint) for x in xs]
    if args.body == "binary":
        bodies, content_type = vector_files, "application/octet-stream"
    else:
        bodies = [json.dumps({"vector_b64": base64.b64encode(f).decode()}).encode() for f in vector_files]
        content_type = "application/json"

    from jobs.common import apply_local_ray_env

    apply_local_ray_env()  # loopback only; must precede the ray import
    import ray
    from ray import serve

    ray_temp = tempfile.mkdtemp(prefix="gtr-", dir="/tmp")  # short: Ray's unix sockets need it
    ctx = ray.init(num_cpus=args.num_cpus, object_store_memory=512 * 1024 * 1024, dashboard_host="127.0.0.1",
                   _node_ip_address="127.0.0.1", _temp_dir=ray_temp)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    dashboard = "http://" + ctx.dashboard_url
    max_ongoing = max(64, 2 * max(args.batch_sizes))
    rows, started_at = [], None
    try:
        for b in args.batch_sizes:
            config = serve_config(root, port, b, args.batch_wait_timeout_s, max_ongoing, args.access_log)
            t0 = time.time()
            deploy(dashboard, config, base, tokens["admin"], b)
            reconfigure_s = time.time() - t0
            run_load(base, tokens, bodies, args.warmup, min(args.concurrency, args.warmup), content_type)
            before = requests.get(f"{base}/v1/stats", headers={"Authorization": f"Bearer {tokens['admin']}"},
                                  timeout=30).json()
            started_at = started_at if started_at is not None else before["replica_started_at"]
            cpu_before = cpu_seconds()
            load = run_load(base, tokens, bodies, args.requests, args.concurrency, content_type)
            cpu_after = cpu_seconds()
            after = requests.get(f"{base}/v1/stats", headers={"Authorization": f"Bearer {tokens['admin']}"},
                                 timeout=30).json()
            cpu_ms = {f"cpu_ms_per_request_{k}": 1000 * (cpu_after[k] - cpu_before.get(k, 0.0)) / max(load["ok"], 1)
                      for k in cpu_after}
            row = {"max_batch_size": b, **load, **batch_delta(before, after), **cpu_ms,
                   "reconfigure_s": reconfigure_s, "replica_restarted": after["replica_started_at"] != started_at}
            row["translator_model_ms_per_request"] = 1000 * row["translator_busy_s"] / max(load["ok"], 1)
            rows.append(row)
            print(f"max_batch_size={b} throughput_vps={row['throughput_vps']:.1f} "
                  f"p50_ms={row['latency_p50_ms']:.1f} p99_ms={row['latency_p99_ms']:.1f} "
                  f"failures={row['failures']} mean_batch={row['mean_batch']:.2f} "
                  f"busy_s={row['translator_busy_s']:.2f}/{row['wall_s']:.2f} "
                  + " ".join(f"{k.removeprefix('cpu_ms_per_request_')}_cpu_ms={v:.2f}" for k, v in cpu_ms.items())
                  + f" replica_restarted={row['replica_restarted']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_temp, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    base_row = next((r for r in rows if r["max_batch_size"] == 1), None)
    ratios = {str(r["max_batch_size"]): r["throughput_vps"] / base_row["throughput_vps"]
              for r in rows} if base_row else {}
    print(f"\nbody={args.body} concurrency={args.concurrency} requests={args.requests} per setting\n")
    print("| max_batch_size | vectors/s | vs batch 1 | p50 ms | p99 ms | failures | mean batch | "
          "CPU ms per request: client / proxy / ingress / translator (model) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = str(r["max_batch_size"])
        cpu = " / ".join(f"{r.get('cpu_ms_per_request_' + k, float('nan')):.1f}"
                         for k in ("client", "proxy", "ingress", "translator"))
        print(f"| {b} | {r['throughput_vps']:.1f} | {ratios.get(b, float('nan')):.2f}x | {r['latency_p50_ms']:.0f} | "
              f"{r['latency_p99_ms']:.0f} | {r['failures']} | {r['mean_batch']:.2f} | "
              f"{cpu} ({r['translator_model_ms_per_request']:.1f}) |")
    result = {
        "benchmark": "serve_translate", "rows": rows, "throughput_ratio_vs_batch_1": ratios,
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "max_ongoing_requests": max_ongoing,
                     "tiny_layout": [2, 512], "llm_layout": [4, 1024],
                     "translator": {"d_model": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
                                    "d_ff": 512}},
        "machine": {"cpus": os.cpu_count(), "load_avg_after": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Peak memory of writing and reading one corpus shard at the real layout size.

    .venv/bin/python benchmarks/bench_corpus_memory.py [--rows 100] [--legacy-rows 4]

One synthetic shadow subset with the Qwen2.5-1.5B -> 7B layout (LoRA r=8 on q_proj/v_proj:
TinyLM 28 x 38,912, LLM 28 x 90,112 values, 3.6 M per row) and ``--rows`` snapshot rows,
through the real code path: ``write_shard`` + ``write_manifest`` (which checks every row),
then ``Corpus.load`` (all rows into tensors) and a ``CorpusDataset`` pass (streaming).
Each phase runs in a fresh process; its peak RSS (``ru_maxrss``, the interpreter with torch
and pyarrow included) is reported as a multiple of the data size (rows x values x 4 bytes).
``--legacy-rows`` also measures the old row format (``.tolist()`` rows, ``Table.from_pylist``)
on a few rows for comparison. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN_TINY = (28, 38912)  # Qwen2.5-1.5B: r=8 x (q: 1536+1536, v: 1536+256) per layer
QWEN_LLM = (28, 90112)  # Qwen2.5-7B: r=8 x (q: 3584+3584, v: 3584+512) per layer


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_card(tiny_shape, llm_shape):
    from gt_ray.models import ModelCard, PairCard

    def side(name, shape):
        return ModelCard(path=f"/synthetic/{name}", weights_sha256="0" * 64, config_hash="0" * 12, n_params=0,
                         init_seed=0, init_sha256="0" * 64, layout_fingerprint=f"synthetic-{name}-{shape[0]}x{shape[1]}",
                         n_layers=shape[0], d_layer=shape[1])

    return PairCard(tiny=side("tiny", tiny_shape), llm=side("llm", llm_shape), lora={"rank": 8})


def phase(args) -> dict:
    """Runs in a child process; returns its measurements."""
    import numpy as np
    import pyarrow as pa
    import torch

    from gt_ray.corpus import Corpus, CorpusDataset, corpus_schema, write_manifest, write_shard

    tiny_shape, llm_shape = tuple(args.tiny_shape), tuple(args.llm_shape)
    card = synthetic_card(tiny_shape, llm_shape)
    base = _rss_mb()
    t0 = time.time()
    out: dict = {"phase": args.phase, "baseline_rss_mb": round(base, 1)}
    if args.phase in ("write", "legacy"):
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.rows):
            row = {"subset_id": 0, "step": i + 1, "secret_k": 3, "mixture": "{}", "data_seed": 1, "train_seed": 2,
                   "n_examples": 256, "tiny_loss": 1.0, "llm_loss": 1.0,
                   "tiny": rng.standard_normal(tiny_shape[0] * tiny_shape[1], dtype=np.float32),
                   "llm": rng.standard_normal(llm_shape[0] * llm_shape[1], dtype=np.float32)}
            if args.phase == "legacy":  # the old row format: Python lists, then Table.from_pylist
                row["tiny"], row["llm"] = row["tiny"].tolist(), row["llm"].tolist()
            rows.append(row)
        out["rss_after_rows_mb"] = round(_rss_mb(), 1)
        if args.phase == "legacy":
            pa.Table.from_pylist(rows, schema=corpus_schema(card))
        else:
            write_shard(args.dir, 0, rows, corpus_schema(card))
            del rows
            write_manifest(args.dir, card, {"benchmark": True}, 1)
            out["shard_mb"] = round(os.path.getsize(Path(args.dir) / "shard-00000.parquet") / 2**20, 1)
    elif args.phase == "load":
        data = Corpus(args.dir).load()
        assert data["tiny"].shape == (args.rows, *tiny_shape) and data["llm"].shape == (args.rows, *llm_shape)
        out["checksum"] = float(data["llm"][:, 0, 0].double().sum())
    elif args.phase == "stream":
        total = torch.zeros(())
        for tiny, llm in CorpusDataset(Corpus(args.dir, verify=False), batch_rows=4):
            total += llm[0, 0]
        out["checksum"] = float(total)
    out["seconds"] = round(time.time() - t0, 1)
    out["peak_rss_mb"] = round(_peak_mb(), 1)
    return out


def run_phase(name: str, rows: int, args, directory: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--rows", str(rows), "--dir", directory,
           "--tiny-shape", *map(str, args.tiny_shape), "--llm-shape", *map(str, args.llm_shape)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{res.stderr[-3000:]}")
    m = json.loads(res.stdout.strip().splitlines()[-1])
    data_mb = rows * (args.tiny_shape[0] * args.tiny_shape[1] + args.llm_shape[0] * args.llm_shape[1]) * 4 / 2**20
    m.update(rows=rows, data_mb=round(data_mb, 1), peak_over_data=round(m["peak_rss_mb"] / data_mb, 3),
             peak_above_baseline_over_data=round((m["peak_rss_mb"] - m["baseline_rss_mb"]) / data_mb, 3))
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100, help="snapshot rows in the shard (the README's figure: 100)")
    p.add_argument("--tiny-shape", type=int, nargs=2, default=list(QWEN_TINY), metavar=("LAYERS", "D"))
    p.add_argument("--llm-shape", type=int, nargs=2, default=list(QWEN_LLM), metavar=("LAYERS", "D"))
    p.add_argument("--legacy-rows", type=int, default=0, help="also measure the old .tolist() rows on this many rows")
    p.add_argument("--out", default="benchmarks/results/corpus_memory.json")
    p.add_argument("--phase", choices=["write", "load", "stream", "legacy"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return
    tmp = tempfile.mkdtemp(prefix="bench-corpus-memory-")
    try:
        results = [run_phase(name, args.rows, args, tmp) for name in ("write", "load", "stream")]
        if args.legacy_rows:
            results.append(run_phase("legacy", args.legacy_rows, args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"layout: tiny {args.tiny_shape[0]} x {args.tiny_shape[1]}, llm {args.llm_shape[0]} x {args.llm_shape[1]}; "
          f"cpu count {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    print("| phase | rows | data MB | baseline RSS MB | peak RSS MB | peak / data | (peak - baseline) / data | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['phase']} | {r['rows']} | {r['data_mb']} | {r['baseline_rss_mb']} | {r['peak_rss_mb']} | "
              f"{r['peak_over_data']} | {r['peak_above_baseline_over_data']} | {r['seconds']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tiny_shape": args.tiny_shape, "llm_shape": args.llm_shape,
                                          "phases": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

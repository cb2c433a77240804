"""Corpus build throughput with 1 and 2 Ray Train workers on the local cluster.

    .venv/bin/python benchmarks/bench_corpus.py [--config configs/tiny.yaml] [--subsets 12]

Builds the same small corpus (the config's pair and fine-tune settings, ``--subsets``
subsets) into fresh directories with 1 and with 2 workers. Ray's start-up is excluded by
timing from the first shard written to the last: steady pairs/min =
(subsets - workers) * rows_per_subset / (t_last - t_first). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.build_corpus import build  # noqa: E402
from jobs.common import init_ray, load_config  # noqa: E402
from jobs.prepare_pair import load_or_prepare_card  # noqa: E402


def run(cfg, card, workers: int, n: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-corpus-{workers}w-"))
    c = dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, n_subsets=n, num_workers=workers,
                                                            storage_path=str(tmp / "corpus")), work_dir=str(tmp))
    t0 = time.time()
    build(c, card)
    wall = time.time() - t0
    mtimes = sorted(p.stat().st_mtime for p in (tmp / "corpus").glob("shard-*.parquet"))
    rows = len(cfg.finetune.snapshot_steps)
    steady = (n - workers) * rows / max(1e-9, mtimes[-1] - mtimes[0]) * 60
    shutil.rmtree(tmp, ignore_errors=True)
    return {"workers": workers, "subsets": n, "wall_seconds": round(wall, 1), "steady_pairs_per_min": round(steady, 1),
            "wall_pairs_per_min": round(n * rows / wall * 60, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--subsets", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results/corpus.json")
    args = p.parse_args()
    cfg = load_config(args.config)
    card = load_or_prepare_card(cfg)
    init_ray()
    results = [run(cfg, card, w, args.subsets) for w in (1, 2)]
    ratio = results[1]["steady_pairs_per_min"] / results[0]["steady_pairs_per_min"]
    print("| workers | subsets | wall s | pairs/min (wall) | pairs/min (steady, start-up excluded) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['subsets']} | {r['wall_seconds']} | {r['wall_pairs_per_min']} | {r['steady_pairs_per_min']} |")
    print(f"2-worker / 1-worker steady throughput: {ratio:.2f}x (cpu count {os.cpu_count()}, load before: {os.getloadavg()[0]:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": results, "ratio": ratio, "config": args.config}, indent=2))


if __name__ == "__main__":
    main()

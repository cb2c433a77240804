"""Intervals and the per-task split for an existing `gt-ray eval` results file, without rerunning it.

    python benchmarks/reanalyze_eval.py --results benchmarks/results/eval_tiny.json \
        --out benchmarks/results/eval_tiny_intervals.json

Reads the per-organization records of every seed (accuracy per method, mixture, seen flag)
and computes what `gt-ray eval` now reports itself (:func:`jobs.evaluate.org_report`):
accuracy for all / seen / new organizations, paired-bootstrap 95% intervals of the
translator minus the TinyLM fine-tune, nearest neighbour and logit KD, and each method's
least-squares split by task. Prints the tables and writes them with the input's path, its
sha256 and the git commit that last changed it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from gt_ray import storage
from jobs.evaluate import BOOTSTRAP_SEED, N_BOOT, ORG_METHODS, format_org_report, org_report

ROOT = Path(__file__).resolve().parents[1]


def input_commit(path: Path) -> str:
    """The git commit that last changed ``path`` ("" outside a git checkout), and a
    "+modified" suffix when the working copy differs from it."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("log", "-1", "--format=%H", "--", str(path))
    return commit + ("+modified" if commit and git("status", "--porcelain", "--", str(path)) else "")


def reanalyze(results: dict, n_boot: int = N_BOOT, seed: int = BOOTSTRAP_SEED) -> dict:
    """:func:`jobs.evaluate.org_report` over every seed's organizations of a results dict."""
    orgs = [o for s in results["per_seed"].values() for o in s["orgs"]]
    methods = [m for m in ORG_METHODS if m in results["methods"]] + [m for m in results["methods"] if m not in ORG_METHODS]
    return org_report(orgs, methods, n_boot, seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="benchmarks/results/eval_tiny.json", help="a gt-ray eval results.json")
    p.add_argument("--out", default="benchmarks/results/eval_tiny_intervals.json")
    p.add_argument("--n-boot", type=int, default=N_BOOT)
    p.add_argument("--seed", type=int, default=BOOTSTRAP_SEED, help="bootstrap seed")
    args = p.parse_args(argv)
    path = Path(args.results)
    blob = path.read_bytes()
    report = reanalyze(json.loads(blob), args.n_boot, args.seed)
    print(format_org_report(report))
    report["input"] = {"path": args.results, "sha256": storage.sha256_bytes(blob), "git_commit": input_commit(path)}
    storage.write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Merge scaling-bench runs of one seed each (`benchmarks/scaling_tiny_only.py --seeds S`, run
as parallel processes) into one table: per (subset budget, TinyLM-only subsets) point, the
accuracy of every seed, their mean, and each seed's minus-NN interval.

    .venv/bin/python benchmarks/scaling_merge.py --out benchmarks/results/scaling_tiny_only_1k.json RUN.json ...

The runs must share the corpus split (the same test subsets and baselines); the merged JSON
keeps every run whole under ``runs``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling_tiny_only import per_task_table, split_by_task  # noqa: E402

from gt_ray.stats import paired_bootstrap  # noqa: E402


def merge(runs: dict[str, dict]) -> dict:
    baselines = {json.dumps(r["baselines"], sort_keys=True) for r in runs.values()}
    if len(baselines) != 1:
        raise SystemExit("error: the runs have different baselines: not the same corpus split or test examples")
    per_subset = all("test_subsets" in r for r in runs.values())  # written since the bench kept per-subset scores
    if per_subset and len({json.dumps(r["test_subsets"]) for r in runs.values()}) != 1:
        raise SystemExit("error: the runs score different test subsets")
    points: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    for r in runs.values():
        for p in r["points"]:
            points.setdefault((r["subset_budget"], p["n_tiny_only"]), []).append((r["seeds"][0], p))
    rows = []
    for (budget, n), seeds in sorted(points.items()):
        seeds.sort(key=lambda sp: sp[0])
        rows.append({"subset_budget": budget, "n_tiny_only": n, "seeds": [s for s, _ in seeds],
                     "accuracy_per_seed": [p["accuracy_per_seed"][0] for _, p in seeds],
                     "mean_over_seeds": {g: statistics.fmean(p["accuracy_per_seed"][0][g] for _, p in seeds)
                                         for g in ("all", "new", "paired")},
                     "minus_nn_new_per_seed": [p["minus_nn"]["new"] for _, p in seeds],
                     "best_epoch": [p["best_epoch"][0] for _, p in seeds],
                     "max_epochs": [p["max_epochs"][0] for _, p in seeds],
                     "val_accuracy": [p["val_accuracy"][0] for _, p in seeds],
                     "train_seconds": [p["train_seconds"][0] for _, p in seeds],
                     "provider_cpu_seconds": [p["provider_cpu_seconds"] for _, p in seeds]})
        if per_subset:  # the per-task split of the mean over seeds, as the bench writes it for one run
            acc = [p["accuracy_per_subset"][0] for _, p in seeds]
            mean = [statistics.fmean(a[i] for a in acc) for i in range(len(acc[0]))]
            first = next(iter(runs.values()))
            rows[-1]["per_task"] = split_by_task(first["test_mixtures"], mean)
            # the mean over seeds against the organization's own TinyLM and against NN: on the new
            # combinations where the runs recorded which those are, else on every test subset
            group = "new" if all("test_new" in r for r in runs.values()) else "all"
            keep = first["test_new"] if group == "new" else [True] * len(mean)
            rows[-1][f"mean_of_seeds_minus_{group}"] = {
                b: paired_bootstrap([a for a, f in zip(mean, keep) if f],
                                    [x for x, f in zip(first["baseline_accuracy_per_subset"][b], keep) if f])
                for b in ("tinylm", "nearest_neighbour")}
    first = next(iter(runs.values()))
    out = {"points": rows, "baselines": first["baselines"], "n_test": first["n_test"], "n_val": first["n_val"],
           "n_paired_train": first["n_paired_train"], "runs": runs}
    if per_subset:
        out["baseline_per_task"] = first["baseline_per_task"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = merge({Path(f).name: json.loads(Path(f).read_text()) for f in args.runs})
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True, default=str))
    b = out["baselines"]
    print("| subset budget | TinyLM-only subsets | test accuracy, mean (per seed) | new | minus NN, new [95%] per seed | best epoch / max | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in out["points"]:
        per = " / ".join(f"{a['all']:.3f}" for a in r["accuracy_per_seed"])
        iv = "; ".join(f"{d['mean_diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" for d in r["minus_nn_new_per_seed"])
        ep = ", ".join(f"{e} / {m}" for e, m in zip(r["best_epoch"], r["max_epochs"]))
        print(f"| {r['subset_budget']} | {r['n_tiny_only']} | {r['mean_over_seeds']['all']:.3f} ({per}) | "
              f"{r['mean_over_seeds']['new']:.3f} | {iv} | {ep} | {' / '.join(f'{s:.0f}' for s in r['train_seconds'])} |")
    print(f"nearest neighbour {b['nearest_neighbour']['all']:.3f} (new {b['nearest_neighbour']['new']:.3f}); "
          f"TinyLM with its own update {b['tinylm']['all']:.3f}; true LLM update (paired) {b['true']['paired']:.3f}")
    for r in out["points"]:
        for key in ("mean_of_seeds_minus_new", "mean_of_seeds_minus_all"):
            if key in r:
                print(f"{r['n_tiny_only']} TinyLM-only, mean of seeds minus, {key.rsplit('_', 1)[1]} test subsets: " + "; ".join(
                    f"{b} {d['mean_diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (n {d['n']})" for b, d in r[key].items()))
    print("\n".join(per_task_table(out)))


if __name__ == "__main__":
    main()

"""How readable is each task's secret from what the translator could read? A ridge probe per task.

    .venv/bin/python benchmarks/input_probe.py [--config configs/world/lengths_scaling.yaml]
        [--n-tiny-only 280] [--probe-prompts 64] [--probe-steps 8] [--out benchmarks/results/input_probe.json]

On the scaling bench's split (`gt_ray.pipeline.translator_split`: the paired training subsets
plus the first ``--n-tiny-only`` TinyLM-only ones), each subset's final TinyLM snapshot is
turned into three candidate inputs: the raw update vector, the behaviour matrix of
`gt_ray.translator.behaviour` (the updated TinyLM's next-token probabilities along its greedy
answers to public probe prompts, drawn as ``--inputs behaviour`` of the scaling bench draws
them but from this split's training subsets, where the scaling bench draws from all of its
TinyLM-only training subsets) and its log. For every task, a one-vs-rest ridge classifier (features standardized on the
training rows) is fit on the training subsets where the task weighs >= 0.2 to their
behaviourally canonical secret; its ridge penalty is chosen on the validation subsets and
it is scored once on the test subsets. This is the linear half of `gt-ray pair report`'s
readability criterion, on the corpus instead of fresh fine-tunes, and for more than one
input. Prints a table and writes JSON with the git commit and config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling_tiny_only import behaviour_inputs, training_split  # noqa: E402

from gt_ray import tasks  # noqa: E402
from gt_ray.corpus import Corpus  # noqa: E402
from gt_ray.pipeline import final_rows, load_rows  # noqa: E402
from jobs.common import load_config, provenance  # noqa: E402

PENALTIES = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
MIN_WEIGHT = 0.2


def ridge_probe(x_tr, y_tr, x_va, y_va, x_te, y_te) -> dict:
    """One-vs-rest ridge in the dual (rows << features): penalty chosen on validation accuracy."""
    x_tr, x_va, x_te = (t.flatten(1).double() for t in (x_tr, x_va, x_te))
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_va, x_te = ((t - mu) / sd for t in (x_tr, x_va, x_te))
    classes = sorted(set(y_tr))
    onehot = torch.zeros(len(y_tr), len(classes), dtype=torch.float64)
    onehot[torch.arange(len(y_tr)), torch.tensor([classes.index(y) for y in y_tr])] = 1.0
    gram = x_tr @ x_tr.T

    def accuracy(alpha, x, y):
        pred = (x @ x_tr.T @ alpha).argmax(1).tolist()
        return sum(classes[p] == t for p, t in zip(pred, y)) / max(1, len(y))

    fits = {lam: torch.linalg.solve(gram + lam * torch.eye(len(y_tr), dtype=gram.dtype), onehot) for lam in PENALTIES}
    val = {lam: accuracy(a, x_va, y_va) for lam, a in fits.items()}
    best = max(PENALTIES, key=lambda lam: (val[lam], -lam))  # ties: the smallest penalty that reaches it
    return {"test_accuracy": accuracy(fits[best], x_te, y_te), "val_accuracy": val[best], "penalty": best,
            "n_train": len(y_tr), "n_val": len(y_va), "n_test": len(y_te), "n_classes": len(classes)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/world/lengths_scaling.yaml")
    p.add_argument("--n-tiny-only", type=int, default=280, help="TinyLM-only training subsets beside the paired ones")
    p.add_argument("--probe-prompts", type=int, default=64)
    p.add_argument("--probe-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/input_probe.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    corpus = Corpus(cfg.corpus_dir)
    paired_train, only_train, val_ids, test_ids = training_split(cfg, corpus, args.n_tiny_only)
    ids = paired_train + only_train[:args.n_tiny_only]
    specs, world = corpus.subset_specs(), corpus.task_config()
    rows = {name: final_rows(load_rows(corpus, split)) for name, split in
            (("train", ids), ("val", val_ids), ("test", test_ids))}
    t0 = time.perf_counter()
    encode = behaviour_inputs(corpus, ids, args.probe_prompts, args.probe_steps)
    behaviour = {name: encode(r) for name, r in rows.items()}
    inputs = {"update": {n: r["tiny"] for n, r in rows.items()},
              "behaviour": behaviour,
              "log behaviour": {n: torch.log(b + 1e-6) for n, b in behaviour.items()}}
    results: dict[str, dict] = {}
    for name, feats in inputs.items():
        results[name] = {}
        for task in world.names:
            keep, labels = {}, {}
            for split, r in rows.items():
                sids = [int(s) for s in r["subset_id"].tolist()]
                keep[split] = torch.tensor([specs[s].mixture.get(task, 0.0) >= MIN_WEIGHT for s in sids])
                labels[split] = [tasks.canonical_secret(task, specs[s].secret(task)) for s, k in zip(sids, keep[split]) if k]
            results[name][task] = ridge_probe(*(v for split in ("train", "val", "test")
                                                for v in (feats[split][keep[split]], labels[split])))
    print(f"| input | {' | '.join(world.names)} |")
    print(f"|---|{'---|' * len(world.names)}")
    for name, per_task in results.items():
        print(f"| {name} | " + " | ".join(f"{r['test_accuracy']:.2f} (n {r['n_test']})" for r in per_task.values()) + " |")
    doc = {"provenance": provenance(cfg), "n_tiny_only": args.n_tiny_only, "min_weight": MIN_WEIGHT,
           "probe": {"prompts": args.probe_prompts, "steps": args.probe_steps}, "penalties": list(PENALTIES),
           "seconds": round(time.perf_counter() - t0, 1), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, sort_keys=True))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

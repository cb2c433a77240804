"""Validation diagnostics of a trained translator's seeds: each seed alone, the mean of the
seeds' generated LLM updates (an ensemble), and accuracy per (task, secret).

    .venv/bin/python benchmarks/seed_ensemble.py --config configs/default.yaml [--work-dir DIR]

Reads the corpus and every seed's checkpoint (`translator.seeds`) of a finished
`gt-ray translator train` in ``work_dir``, and scores the translator's *validation* subsets
only (the test subsets and organizations stay untouched, so what this chooses is chosen on
validation): each subset's last TinyLM snapshot is translated by every seed, and each
generated update, the mean of the seeds' updates, the mean of their weight changes (rank 2r:
no update of the card's layout holds it, so it is merged into the LLM's weights for the
scoring) and the TinyLM's own update (on the card's TinyLM, what an organization has alone)
are scored on ``--n-examples`` of the subset's
``private_test`` examples. In weight space (`gt_ray.vector_metrics.weight_space`) it also
reports how far apart the first two seeds' updates are (cosine) and how far the mean of
their LoRA factors lands from the mean of their weight changes (LoRA is a product, so the
two differ). Accuracy per (task, secret) is the accuracy on a subset's
examples of that task, over the subsets where the task weighs at least ``--min-weight``,
keyed by the canonical secret (`gt_ray.tasks.canonical_secret`). Prints the tables and
writes JSON (default ``benchmarks/results/seed_ensemble.json``) with the git commit and
config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gt_ray import tasks  # noqa: E402
from gt_ray.corpus import Corpus  # noqa: E402
from gt_ray.evaluate import score_model  # noqa: E402
from gt_ray.models import load_card_side  # noqa: E402
from gt_ray.pipeline import final_rows, load_rows, load_translators, translator_split  # noqa: E402
from gt_ray.stats import paired_bootstrap  # noqa: E402
from gt_ray.updates import apply_update  # noqa: E402
from gt_ray.vector_metrics import weight_space  # noqa: E402
from jobs.common import load_config, provenance  # noqa: E402


def per_task_scores(lm, update: torch.Tensor, examples: list[tasks.Example]) -> dict[str, float]:
    """Exact-match accuracy of ``lm`` with ``update`` applied, on all examples ("all") and
    on each task's examples."""
    apply_update(lm.model, lm.layout, lm.init, update)
    by_task: dict[str, list[tasks.Example]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex)
    scores = {name: score_model(lm.model, lm.tokenizer, exs) for name, exs in by_task.items()}
    out = {name: sc.accuracy for name, sc in scores.items()}
    out["all"] = sum(sc.accuracy * sc.n for sc in scores.values()) / len(examples)  # each example scored once
    return out


def per_task_scores_merged(lm, weight_change: dict[str, torch.Tensor], examples: list[tasks.Example]) -> dict[str, float]:
    """:func:`per_task_scores` of a weight change that no rank-r LoRA holds: the LoRA is set
    to the card's init and ``weight_change`` ({module key: delta W}, as
    `gt_ray.vector_metrics.weight_space` returns) is added to the base weights for the
    scoring, then taken off again."""
    layers = {k: lm.model.get_submodule(k).base_layer.weight for k in weight_change}
    with torch.no_grad():
        for k, w in layers.items():
            w += weight_change[k]
        try:
            return per_task_scores(lm, torch.zeros_like(lm.init), examples)
        finally:
            for k, w in layers.items():
                w -= weight_change[k]


def flat_weight_change(update: torch.Tensor, lm, scale: float) -> torch.Tensor:
    """Every LoRA module's weight change of ``update`` on ``lm``'s card init, concatenated."""
    return torch.cat([w.flatten() for w in weight_space(update, lm.init, lm.layout, scale).values()])


def mean_weight_change(updates: list[torch.Tensor], lm, scale: float) -> dict[str, torch.Tensor]:
    """{module key: the mean of ``updates``' weight changes on ``lm``'s card init}."""
    changes = [weight_space(u, lm.init, lm.layout, scale) for u in updates]
    return {k: torch.stack([c[k] for c in changes]).mean(0) for k in changes[0]}


def weight_space_spread(pred: dict[str, torch.Tensor], lm, scale: float) -> dict[str, float]:
    """Per subset, cos(delta W of seed a, delta W of seed b) for the first two seeds, and
    |delta W(mean of their factors) - mean of their delta W| / |mean of their delta W|;
    the means over subsets."""
    (a, pa), (b, pb) = list(pred.items())[:2]
    cos, gap = [], []
    for ua, ub in zip(pa, pb):
        wa, wb = flat_weight_change(ua, lm, scale), flat_weight_change(ub, lm, scale)
        wm, mean = flat_weight_change((ua + ub) / 2, lm, scale), (wa + wb) / 2
        cos.append(float(torch.nn.functional.cosine_similarity(wa, wb, dim=0)))
        gap.append(float((wm - mean).norm() / mean.norm()))
    return {"seeds": f"{a} / {b}", "cosine_mean": round(statistics.fmean(cos), 4), "cosine_min": round(min(cos), 4),
            "factor_mean_vs_weight_mean_rel": round(statistics.fmean(gap), 4)}


def secret_table(specs: list, scores: list[dict[str, float]], min_weight: float) -> dict[str, dict]:
    """Mean accuracy per ``task/secret`` over the subsets where the task weighs >= ``min_weight``."""
    acc: dict[str, list[float]] = defaultdict(list)
    for spec, s in zip(specs, scores):
        for task, w in spec.mixture.items():
            if w >= min_weight and task in s:
                acc[f"{task}/{tasks.canonical_secret(task, spec.secret(task))}"].append(s[task])
    return {key: {"accuracy": round(statistics.fmean(v), 4), "n_subsets": len(v)} for key, v in sorted(acc.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--work-dir", default=None, help="the finished run's work_dir (default: the config's)")
    p.add_argument("--n-examples", type=int, default=100, help="private_test examples scored per validation subset")
    p.add_argument("--min-weight", type=float, default=0.2, help="a task counts for a subset's (task, secret) from this weight")
    p.add_argument("--out", default="benchmarks/results/seed_ensemble.json")
    args = p.parse_args()
    if args.n_examples < 1 or not 0 < args.min_weight <= 1:
        raise SystemExit("error: --n-examples must be positive and --min-weight in (0, 1]")
    cfg = load_config(args.config)
    if args.work_dir:
        cfg = dataclasses.replace(cfg, work_dir=args.work_dir)
    run_provenance = provenance(cfg)  # the code as it is when the run starts: edits during a long run do not count
    try:
        corpus = Corpus(cfg.corpus_dir)
        translators = load_translators(cfg, corpus)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if len(translators) < 2:
        raise SystemExit(f"error: {len(translators)} translator seed(s) in {cfg.work_dir}: an ensemble needs two "
                         "(translator.seeds)")
    _, val_ids, _ = translator_split(cfg, corpus)
    va = final_rows(load_rows(corpus, val_ids))
    subset_ids = va["subset_id"].tolist()
    specs_by_id = corpus.subset_specs()
    specs = [specs_by_id[s] for s in subset_ids]
    world = corpus.task_config()
    examples = [tasks.dataset_examples(dataclasses.replace(s, split="private_test"), world, n=args.n_examples)
                for s in specs]
    card = corpus.card()
    llm, tiny = load_card_side(card, "llm"), load_card_side(card, "tiny")

    preds = {f"seed {s}": t.translate(va["tiny"]) for s, t in translators.items()}
    scale = card.lora["alpha"] / card.lora["rank"]
    seed_preds = list(preds.values())
    spread = weight_space_spread(preds, llm, scale)
    preds["mean of seeds' updates"] = torch.stack(list(preds.values())).mean(0)
    for name, u in preds.items():
        if not torch.isfinite(u).all() or u.abs().sum() == 0:
            raise SystemExit(f"error: {name} generated a non-finite or zero update")
    scores = {name: [per_task_scores(llm, u, ex) for u, ex in zip(pred, examples)] for name, pred in preds.items()}
    # the ensemble no rank-r update holds: the mean weight change, merged into the LLM's weights
    scores["mean of seeds' weight changes (rank 2r, merged)"] = [
        per_task_scores_merged(llm, mean_weight_change([p[i] for p in seed_preds], llm, scale), ex)
        for i, ex in enumerate(examples)]
    scores["TinyLM (own update)"] = [per_task_scores(tiny, u, ex) for u, ex in zip(va["tiny"], examples)]
    seeds = [n for n in preds if n.startswith("seed ")]
    scores["mean of seeds' accuracy"] = [{k: statistics.fmean(scores[n][i][k] for n in seeds) for k in scores[seeds[0]][i]}
                                         for i in range(len(examples))]

    def overall(name):
        return [s["all"] for s in scores[name]]

    ens, mean_acc = overall("mean of seeds' updates"), overall("mean of seeds' accuracy")
    diff = paired_bootstrap(ens, mean_acc)
    out = {"config": args.config, "work_dir": str(cfg.work_dir), "n_val_subsets": len(subset_ids),
           "val_subsets": subset_ids, "n_examples": args.n_examples, "min_weight": args.min_weight,
           "accuracy": {n: round(statistics.fmean(overall(n)), 4) for n in scores},
           "ensemble_minus_mean_of_seeds": diff, "weight_space": spread,
           "per_secret": {n: secret_table(specs, scores[n], args.min_weight) for n in scores},
           "accuracy_per_subset": {n: overall(n) for n in scores},
           "provenance": run_provenance}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True, default=str))

    print(f"{len(subset_ids)} validation subsets, {args.n_examples} examples each")
    print("| method | validation accuracy |\n|---|---|")
    for n, a in out["accuracy"].items():
        print(f"| {n} | {a:.3f} |")
    print(f"ensemble minus mean of seeds: {diff['mean_diff']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]")
    print(f"weight space ({spread['seeds']}): cosine {spread['cosine_mean']:.3f} (min {spread['cosine_min']:.3f}); "
          f"the factors' mean is {spread['factor_mean_vs_weight_mean_rel']:.3f} (relative) from the weight changes' mean")
    keys = sorted(out["per_secret"]["TinyLM (own update)"])
    cols = ["TinyLM (own update)", "mean of seeds' accuracy", "mean of seeds' updates"]
    print(f"\naccuracy per (task, secret), subsets where the task weighs >= {args.min_weight}")
    print("| task/secret | subsets | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for k in keys:
        row = [out["per_secret"][c].get(k, {}).get("accuracy", float("nan")) for c in cols]
        print(f"| {k} | {out['per_secret'][cols[0]][k]['n_subsets']} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()

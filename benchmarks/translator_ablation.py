"""The research bench: one row per lever of the translator, scored on the held-out test subsets.

    .venv/bin/python benchmarks/translator_ablation.py [--config configs/tiny.yaml] [--seeds 0 1 2] [--epochs 150]

Every variant starts from the run's translator settings (config + the sweep's best YAML)
and changes one lever: the objective (MSE vs the LLM's answer loss), what chooses the
epoch (validation MSE vs validation answer NLL), the decoder (autoregressive vs parallel),
the head (direct vs soft retrieval over the training subsets' LLM updates plus a residual),
the snapshots (dense, sampled per epoch, vs the final one only) and the corpus size (half
the training subsets). The protocol is the pipeline's: train / validation / test split by
subset, validation chooses epochs, nothing is chosen on the test subsets; baselines (mean,
ridge, nearest neighbour) are fit on the same training subsets. Figures: accuracy of the
LLM with each update on the test subsets' own tasks (private_test inputs, which no shadow
fine-tune saw), mean +- std over training seeds, also split into test subsets whose
combination some training subset has ("seen") and those none has ("new"). Prints a table
and writes JSON (default ``benchmarks/results/translator_ablation.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gt_ray.baselines import MeanUpdate, NearestNeighbour, RidgeMap  # noqa: E402
from gt_ray.corpus import Corpus  # noqa: E402
from gt_ray.pipeline import (final_rows, function_objective, held_out, load_split, resolve_settings,  # noqa: E402
                             score_predictions)
from gt_ray.translator.train import train_translator  # noqa: E402
from jobs.common import kv, load_config  # noqa: E402


def variants(model_cfg, train_cfg) -> dict:
    """name -> (model config, train config, selects on answer NLL, data filter)."""
    ar = dataclasses.replace(model_cfg, decoder="autoregressive", head="direct")
    par = dataclasses.replace(model_cfg, decoder="parallel", head="direct")
    fn = dataclasses.replace(train_cfg, objective="function")
    mse = dataclasses.replace(train_cfg, objective="mse")
    return {
        "MSE, autoregressive, epoch on val MSE (the paper's recipe)": (ar, mse, False, "all"),
        "MSE, autoregressive, epoch on val answer NLL": (ar, mse, True, "all"),
        "MSE, parallel decoder, epoch on val answer NLL": (par, mse, True, "all"),
        "function loss, autoregressive": (ar, fn, True, "all"),
        "function loss, parallel decoder": (par, fn, True, "all"),
        "function loss, parallel, retrieval head": (dataclasses.replace(par, head="retrieval"), fn, True, "all"),
        "function loss, parallel, final snapshot only": (par, dataclasses.replace(fn, sample_snapshots=False), True, "final"),
        "function loss, parallel, half the training subsets": (par, fn, True, "half"),
        "function loss, parallel, epoch on val accuracy": (par, dataclasses.replace(fn, select_on="accuracy"), True, "all"),
        "function loss, parallel, retrieval head, epoch on val accuracy": (
            dataclasses.replace(par, head="retrieval"), dataclasses.replace(fn, select_on="accuracy"), True, "all"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: the config's)")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only these variants (exact names, or a prefix ending in *)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models gain nothing from more)")
    p.add_argument("--out", default="benchmarks/results/translator_ablation.json")
    p.add_argument("--merge", nargs="+", default=None, help="only combine the JSON of earlier runs into --out")
    args = p.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    corpus = Corpus(cfg.corpus_dir)
    model_cfg, train_cfg, _ = resolve_settings(cfg, corpus)
    if args.epochs:
        train_cfg = dataclasses.replace(train_cfg, max_epochs=args.epochs)
    tr, va, train_ids, val_ids = load_split(cfg, corpus)
    _, te_final, tests, llm, scale, test_ids, seen = held_out(cfg, corpus)
    objective = function_objective(corpus, train_ids, val_ids, train_cfg)
    half = set(sorted(train_ids)[::2])
    data = {"all": tr, "final": final_rows(tr),
            "half": {k: v[torch.tensor([int(s) in half for s in tr["subset_id"].tolist()])] for k, v in tr.items()}}

    preds, info = {}, {}
    for name, (mc, tc, on_nll, rows) in variants(model_cfg, train_cfg).items():
        if args.only and not any(o == name or o.endswith("*") and name.startswith(o[:-1]) for o in args.only):
            continue
        d = data[rows]
        for seed in args.seeds:
            t0 = time.time()
            translator, hist = train_translator(
                d["tiny"], d["llm"], va["tiny"], va["llm"], dataclasses.replace(tc, seed=seed), mc,
                train_subsets=d["subset_id"], val_subsets=va["subset_id"], function=objective if on_nll else None,
                train_paired=d["paired"], val_paired=va["paired"])
            key = f"{name} | seed {seed}"
            best = next((h for h in hist if h["epoch"] == translator.metadata.get("best_epoch")), {})
            preds[key] = translator.translate(te_final["tiny"])
            info[key] = {"variant": name, "seed": seed, "train_seconds": round(time.time() - t0, 1),
                         "best_epoch": translator.metadata.get("best_epoch"), "epochs": len(hist),
                         "selected_on": translator.metadata.get("selected_on"),
                         "best_val_loss": translator.metadata.get("best_val_loss"),
                         "val_nll": best.get("val_nll"), "val_accuracy": best.get("val_accuracy")}
            print(f"trained {key}: {info[key]}", flush=True)
    for name, b in {"nearest neighbour (k=1)": NearestNeighbour(k=1), "ridge map": RidgeMap(), "mean shadow update": MeanUpdate()}.items():
        p = tr["paired"]  # retrieval and maps need LLM vectors: the paired subsets only
        preds[name] = b.fit(tr["tiny"][p], tr["llm"][p], tr["subset_id"][p]).predict(te_final["tiny"])
    preds["true LLM update (ceiling)"] = te_final["llm"]
    t_score = time.time()
    rows = score_predictions(preds, te_final, tests, llm, scale, on_subset=lambda i, n: kv(
        stage="translator_eval", subset=int(te_final["subset_id"][i]), done=f"{i + 1}/{n}",
        seconds=round(time.time() - t_score, 1)))

    def group_mean(acc: list[float], flag: bool) -> float:
        xs = [a for a, s in zip(acc, seen) if s == flag]
        return statistics.fmean(xs) if xs else float("nan")

    table: dict[str, dict] = {}
    for key, r in rows.items():
        name = info[key]["variant"] if key in info else key
        entry = table.setdefault(name, {"per_seed": [], "seen": [], "new": [], "nll": [], "train_seconds": [], "best_epoch": []})
        entry["per_seed"].append(statistics.fmean(r["accuracy"]))
        entry["seen"].append(group_mean(r["accuracy"], True))
        entry["new"].append(group_mean(r["accuracy"], False))
        entry["nll"].append(statistics.fmean(r["nll"]))
        if key in info:
            entry["train_seconds"].append(info[key]["train_seconds"])
            entry["best_epoch"].append(info[key]["best_epoch"])
    for entry in table.values():
        acc = entry["per_seed"]
        entry["accuracy"] = statistics.fmean(acc)
        entry["accuracy_std"] = statistics.stdev(acc) if len(acc) > 1 else 0.0
        entry["accuracy_seen"] = statistics.fmean(entry["seen"])
        entry["accuracy_new"] = statistics.fmean(entry["new"])
    out = {"config": args.config, "seeds": args.seeds, "max_epochs": train_cfg.max_epochs, "n_train_subsets": len(set(train_ids)),
           "n_val_subsets": len(val_ids), "n_test_subsets": len(test_ids), "n_test_seen": sum(seen), "variants": table,
           "runs": info}
    write(out, args.out)


def write(out: dict, path: str) -> None:
    """Print the table and write the JSON."""
    n_seen = out["n_test_seen"]
    print(f"{out['n_test_subsets']} test subsets ({n_seen} seen combination, {out['n_test_subsets'] - n_seen} new), "
          f"{out['n_train_subsets']} training subsets, seeds {out['seeds']}, at most {out['max_epochs']} epochs")
    print("| variant | val answer NLL | val accuracy | test accuracy | seen | new | test answer NLL | best epochs | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, e in out["variants"].items():
        runs = [r for r in out["runs"].values() if r["variant"] == name and r["selected_on"] != "val_mse"]
        # runs of older versions of this bench recorded the chosen epoch's val NLL as best_val_loss only
        vals = [r["val_nll"] if r.get("val_nll") is not None else r["best_val_loss"] for r in runs]
        accs = [r["val_accuracy"] for r in runs if r.get("val_accuracy") is not None]
        e["val_answer_nll"] = statistics.fmean(vals) if vals else None
        e["val_accuracy"] = statistics.fmean(accs) if accs else None
        val = f"{e['val_answer_nll']:.3f}" if vals else "-"
        val += f" | {e['val_accuracy']:.3f}" if accs else " | -"
        spread = f" +- {e['accuracy_std']:.3f}" if len(e["per_seed"]) > 1 else ""
        epochs = "/".join(str(b) for b in e["best_epoch"]) or "-"
        secs = f"{statistics.fmean(e['train_seconds']):.0f}" if e["train_seconds"] else "-"
        print(f"| {name} | {val} | {e['accuracy']:.3f}{spread} | {_f(e['accuracy_seen'])} | {_f(e['accuracy_new'])} | "
              f"{statistics.fmean(e['nll']):.3f} | {epochs} | {secs} |")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=str))


def _f(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"  # NaN: no test subset in that group


def merge(paths: list[str], out_path: str) -> None:
    """One table from runs of disjoint variant sets (``--only``) of the same corpus and split:
    the learned variants of each, the baselines (identical in every run) once."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("config", "seeds", "max_epochs", "n_train_subsets", "n_val_subsets", "n_test_subsets", "n_test_seen")
    for part in parts[1:]:
        if any(part[k] != parts[0][k] for k in keys):
            raise SystemExit(f"error: runs differ in {[k for k in keys if part[k] != parts[0][k]]}")
    learned = {n: v for p in parts for n, v in p["variants"].items() if v["train_seconds"]}
    baselines = {n: v for n, v in parts[0]["variants"].items() if not v["train_seconds"]}
    out = {**{k: parts[0][k] for k in keys}, "variants": {**learned, **baselines},
           "runs": {k: v for p in parts for k, v in p["runs"].items()}, "merged_from": paths}
    write(out, out_path)


if __name__ == "__main__":
    main()

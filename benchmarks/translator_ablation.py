"""What moves the translator: variants trained in-process, scored on held-out subsets.

    .venv/bin/python benchmarks/translator_ablation.py [--config configs/tiny.yaml] [--epochs 100]

Each variant starts from the run's translator settings (config + the sweep's best YAML)
and changes one thing: normalization (coordinate / global / none), snapshot augmentation
(all snapshot rows vs final rows only), and size. Figures: the LLM's accuracy and answer
NLL on each held-out subset's own task with the generated update, averaged over subsets,
next to the nearest-neighbour baseline. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gt_ray.baselines import NearestNeighbour  # noqa: E402
from gt_ray.corpus import Corpus  # noqa: E402
from gt_ray.translator import train_translator  # noqa: E402
from jobs.common import load_config  # noqa: E402
from jobs.eval_translator import final_rows, held_out, score_predictions  # noqa: E402
from jobs.train_translator import load_split, resolve_settings  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--out", default="benchmarks/results/translator_ablation.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config)
    corpus = Corpus(cfg.corpus_dir)
    model_cfg, train_cfg, _ = resolve_settings(cfg, corpus)
    train_cfg = dataclasses.replace(train_cfg, max_epochs=args.epochs)
    tr, va, _, _ = load_split(cfg, corpus)
    tr_final, va_final_rows = final_rows(tr), final_rows(va)
    _, va_final, tests, llm, scale, _ = held_out(cfg, corpus)
    variants = {
        "as configured (coordinate norm, all snapshots)": (model_cfg, tr),
        "global normalization": (dataclasses.replace(model_cfg, normalization="global"), tr),
        "no normalization": (dataclasses.replace(model_cfg, normalization="none"), tr),
        "final snapshot only": (model_cfg, tr_final),
        "wider (d_model 256, d_ff 1024)": (dataclasses.replace(model_cfg, d_model=256, d_ff=1024, num_heads=8), tr),
    }
    preds, info = {}, {}
    for name, (mc, data) in variants.items():
        t0 = time.time()
        translator, hist = train_translator(data["tiny"], data["llm"], va_final_rows["tiny"], va_final_rows["llm"], train_cfg, mc)
        preds[name] = translator.translate(va_final["tiny"])
        info[name] = {"train_seconds": round(time.time() - t0, 1), "best_epoch": translator.metadata.get("best_epoch"),
                      "best_val_loss": translator.metadata.get("best_val_loss")}
    preds["nearest neighbour (k=1)"] = NearestNeighbour(k=1).fit(tr["tiny"], tr["llm"], tr["subset_id"]).predict(va_final["tiny"])
    rows = score_predictions(preds, va_final, tests, llm, scale)
    table = {n: {"accuracy": sum(r["accuracy"]) / len(r["accuracy"]), "nll": sum(r["nll"]) / len(r["nll"]), **info.get(n, {})}
             for n, r in rows.items()}
    print("| variant | accuracy | answer NLL | best val MSE | train s |")
    print("|---|---|---|---|---|")
    for n, r in table.items():
        print(f"| {n} | {r['accuracy']:.3f} | {r['nll']:.3f} | {r.get('best_val_loss') or '-'} | {r.get('train_seconds', '-')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "epochs": args.epochs, "variants": table}, indent=2))


if __name__ == "__main__":
    main()

"""TinyLM accuracy under differential privacy: DP-SGD vs the vector mechanism.

    python benchmarks/dp_table.py --config configs/tiny.yaml --orgs 6 --out benchmarks/results/dp_table.json

For each of ``--orgs`` organizations (a secret k and a Dirichlet task mixture drawn as in
the rest of the pipeline), the card's TinyLM is fine-tuned on the organization's
``private_train`` data and scored (greedy exact match) on its ``private_test`` data, at
epsilon = inf (no DP), 8 and 1, two ways:

- **DP-SGD** (opacus, target epsilon, RDP accountant): the unit of privacy is one
  training example.
- **Vector mechanism** (:func:`gt_ray.privacy.privatize`, Gaussian, ``replace``
  neighbouring) on the non-private TinyLM update, applied back to the TinyLM: the unit of
  privacy is the organization's whole dataset.

The two epsilons protect different units and are not comparable one to one. The clip
norm of the vector mechanism defaults to the median norm of the non-private updates
(chosen on this run's data: a benchmark choice; a real organization fixes it in advance).
Fine-tuning settings and delta come from the config (``finetune`` and ``dp`` sections).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from gt_ray import tasks
from gt_ray.config import DPConfig, load_yaml
from gt_ray.evaluate import score_model
from gt_ray.finetune import finetune
from gt_ray.models import load_card_side
from gt_ray.privacy import VectorMechanism, privatize
from gt_ray.updates import apply_update
from jobs.prepare_pair import load_or_prepare_card

EPSILONS = (math.inf, 8.0, 1.0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="experiment YAML (default configs/tiny.yaml)")
    p.add_argument("--orgs", type=int, default=6, help="organizations (default 6)")
    p.add_argument("--n-test", type=int, default=300, help="private_test examples per organization")
    p.add_argument("--vector-clip", type=float, default=None,
                   help="L2 clip of the vector mechanism (default: median norm of the non-private updates)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: finetune.num_threads)")
    p.add_argument("--seed", type=int, default=None, help="seed of the organizations and noise (default: config seed)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/dp_table.json"))
    return p.parse_args()


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    args = parse_args()
    cfg = load_yaml(args.config)
    torch.set_num_threads(args.threads or cfg.finetune.num_threads)
    seed = cfg.seed if args.seed is None else args.seed
    t0 = time.time()
    card = load_or_prepare_card(cfg)
    lm = load_card_side(card, "tiny")
    rng = random.Random(seed)
    orgs = [tasks.draw_dataset_spec(rng, "private_train", cfg.tasks.names, cfg.finetune.n_examples,
                                    cfg.tasks.dirichlet_alpha) for _ in range(args.orgs)]

    # Pass 1: base accuracy and the non-private fine-tune of every organization.
    rows, updates = [], []
    for i, spec in enumerate(orgs):
        train = tasks.generate_dataset(spec)
        test = tasks.generate_dataset(spec, split="private_test", n=args.n_test)
        lm.reset()
        base = score_model(lm.model, lm.tokenizer, test)
        res = finetune(lm, train, cfg.finetune, seed=spec.seed)
        ft = score_model(lm.model, lm.tokenizer, test)
        updates.append(res.final.update)
        rows.append({"org": i, "spec": spec.to_dict(), "base": base.accuracy, "base_nll": base.nll,
                     "update_norm": float(res.final.update.norm()),
                     "dp_sgd": {"inf": ft.to_dict()}, "vector": {"inf": ft.to_dict()}})
        print(f"org={i} k={spec.secret_k} base={base.accuracy:.3f} ft={ft.accuracy:.3f} "
              f"update_norm={rows[-1]['update_norm']:.4g}", flush=True)
    clip = args.vector_clip or statistics.median(r["update_norm"] for r in rows)

    # Pass 2: DP-SGD fine-tunes and vector-mechanism releases at each finite epsilon.
    for i, spec in enumerate(orgs):
        train = tasks.generate_dataset(spec)
        test = tasks.generate_dataset(spec, split="private_test", n=args.n_test)
        noise = torch.Generator().manual_seed(spec.seed)
        for eps in EPSILONS[1:]:
            dp = DPConfig(enabled=True, target_epsilon=eps, delta=cfg.dp.delta, max_grad_norm=cfg.dp.max_grad_norm,
                          accountant=cfg.dp.accountant)
            res = finetune(lm, train, cfg.finetune, seed=spec.seed, dp=dp)
            rows[i]["dp_sgd"][eps_label(eps)] = {**score_model(lm.model, lm.tokenizer, test).to_dict(), **res.dp_dict()}
            mech = VectorMechanism(kind="gaussian", epsilon=eps, delta=cfg.dp.delta, clip_norm=clip,
                                   neighbouring="replace")
            noisy, report = privatize(updates[i], mech, noise)
            apply_update(lm.model, lm.layout, lm.init, noisy)
            rows[i]["vector"][eps_label(eps)] = {
                **score_model(lm.model, lm.tokenizer, test).to_dict(), "sigma": report.sigma,
                "clipped": report.clipped, "noise_to_clip": report.sigma * math.sqrt(noisy.numel()) / clip}
            print(f"org={i} eps={eps:g} dp_sgd={rows[i]['dp_sgd'][eps_label(eps)]['accuracy']:.3f} "
                  f"(opacus eps={res.epsilon:.3g}) vector={rows[i]['vector'][eps_label(eps)]['accuracy']:.3f}",
                  flush=True)

    summary = {}
    for eps in EPSILONS:
        e = eps_label(eps)
        summary[e] = {"dp_sgd": mean_std([r["dp_sgd"][e]["accuracy"] for r in rows]),
                      "vector": mean_std([r["vector"][e]["accuracy"] for r in rows])}
        if not math.isinf(eps):
            summary[e]["dp_sgd_epsilon_spent"] = statistics.fmean(r["dp_sgd"][e]["epsilon"] for r in rows)
            summary[e]["dp_sgd_noise_multiplier"] = statistics.fmean(r["dp_sgd"][e]["noise_multiplier"] for r in rows)
            summary[e]["vector_noise_to_clip"] = statistics.fmean(r["vector"][e]["noise_to_clip"] for r in rows)
    base = mean_std([r["base"] for r in rows])
    table = format_table(summary, base, len(rows), clip, cfg.dp.delta)
    print(table)
    out = {"config": args.config, "card_id": card.card_id, "orgs": len(rows), "n_test": args.n_test, "seed": seed,
           "delta": cfg.dp.delta, "vector_clip": clip, "vector_clip_source": "flag" if args.vector_clip else
           "median non-private update norm", "finetune": cfg.to_dict()["finetune"],
           "layout": [card.tiny.n_layers, card.tiny.d_layer], "base": base, "summary": summary, "rows": rows,
           "table": table, "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
           "loadavg": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, sort_keys=True, default=str))
    print(f"wrote {args.out} seconds={out['seconds']}")


def format_table(summary: dict, base: tuple[float, float], n_orgs: int, clip: float, delta: float) -> str:
    lines = [
        f"TinyLM exact-match accuracy on each organization's private_test data, mean ± std over {n_orgs} "
        f"organizations (delta={delta:g}). Base TinyLM, no fine-tune: {base[0]:.3f} ± {base[1]:.3f}.",
        "DP-SGD protects one training example; the vector mechanism (Gaussian, replace, "
        f"L2 clip {clip:.3g}) protects the organization's whole dataset.",
        "",
        "| epsilon | DP-SGD accuracy | DP-SGD noise multiplier | vector mechanism accuracy | vector noise norm / clip |",
        "|---|---|---|---|---|",
    ]
    for e, s in summary.items():
        sgd_sigma = f"{s['dp_sgd_noise_multiplier']:.3g}" if "dp_sgd_noise_multiplier" in s else "-"
        ratio = f"{s['vector_noise_to_clip']:.3g}" if "vector_noise_to_clip" in s else "-"
        lines.append(f"| {e} | {s['dp_sgd'][0]:.3f} ± {s['dp_sgd'][1]:.3f} | {sgd_sigma} | "
                     f"{s['vector'][0]:.3f} ± {s['vector'][1]:.3f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Evaluate generated LLM updates for simulated organizations against baselines and ceilings.

    gt-ray eval --config configs/tiny.yaml

For each seed, ``eval.n_orgs`` organizations each get private data (own secret k and task
mixture, ``private_train``) and a test split (same task, ``private_test``). Rows:
LLM base, TinyLM fine-tuned (what the org can do alone), LLM fine-tuned (the ceiling; needs
the data), LLM + Grad-Transformer update (the method), LLM + mean shadow update, ridge map,
nearest-neighbour update, and proxy-tuning. Plus rows for all organizations together:
aggregate-then-translate and translate-then-aggregate, evaluated on the union of the test
splits. PGR on organization-averaged figures; the spread is over seeds. Nothing here tunes
on the test splits.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from gt_ray import tasks
from gt_ray.aggregate import aggregate
from gt_ray.baselines import MeanUpdate, NearestNeighbour, RidgeMap
from gt_ray.config import ExperimentConfig
from gt_ray.evaluate import (Scores, draw_org_specs, proxy_tuning_logits, score, score_model, score_update,
                             shares_vocabulary, summarize)
from gt_ray.finetune import finetune
from gt_ray.models import load_card_side
from jobs.common import base_parser, kv, load_config, work_dir, write_json
from jobs.train_translator import load_corpus_and_translator

RESULTS_FILE = "results.json"
ORG_METHODS = ["llm_base", "tiny_ft", "llm_ft", "grad_transformer", "mean_shadow", "ridge", "nearest_neighbour", "proxy_tuning"]
LABELS = {"llm_base": "LLM base", "tiny_ft": "TinyLM fine-tuned", "llm_ft": "LLM fine-tuned (ceiling)",
          "grad_transformer": "LLM + Grad-Transformer", "mean_shadow": "LLM + mean shadow update",
          "ridge": "LLM + ridge map", "nearest_neighbour": "LLM + nearest neighbour", "proxy_tuning": "proxy-tuning",
          "agg_then_translate": "all orgs: aggregate, then translate", "translate_then_agg": "all orgs: translate, then aggregate"}

PROXY_SKIPPED = "skipped: the TinyLM and the LLM do not share a vocabulary"
Translate = Callable[[torch.Tensor], torch.Tensor]
"""(B, L_tiny, d_tiny) TinyLM vectors -> (B, L_llm, d_llm) LLM vectors."""


def evaluate(cfg: ExperimentConfig, translate: Translate | None = None) -> dict:
    """Run the evaluation for every seed; ``translate`` defaults to the local checkpoint
    (the demo passes the Serve endpoint instead, so the service is in the loop)."""
    torch.set_num_threads(2)
    corpus, translator = load_corpus_and_translator(cfg)
    translate = translate or translator.translate
    card = corpus.card()  # from the manifest: works for a corpus at a URI too
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    shadow = corpus.load()
    baselines = {"mean_shadow": MeanUpdate(), "ridge": RidgeMap(), "nearest_neighbour": NearestNeighbour(k=1)}
    for b in baselines.values():
        b.fit(shadow["tiny"], shadow["llm"], shadow["subset_id"])
    shared_vocab = shares_vocabulary(tiny.tokenizer, llm.tokenizer)
    per_seed = {}
    t0 = time.time()
    for seed in cfg.eval.seeds:
        per_seed[seed] = run_seed(cfg, seed, tiny, llm, translate, baselines, shared_vocab, t0)
    out = combine(per_seed, cfg, shared_vocab)
    out["seconds"] = round(time.time() - t0, 1)
    write_json(work_dir(cfg) / RESULTS_FILE, out)
    print(format_results(out))
    return out


def run_seed(cfg, seed, tiny, llm, translate, baselines, shared_vocab, t0) -> dict:
    specs = draw_org_specs(cfg.tasks.names, cfg.eval.n_orgs, seed, cfg.finetune.n_examples, cfg.tasks.dirichlet_alpha)
    per_org: dict[str, list[Scores]] = {m: [] for m in ORG_METHODS if shared_vocab or m != "proxy_tuning"}
    tiny_vecs, llm_vecs, trains, tests, orgs = [], [], [], [], []
    for j, spec in enumerate(specs):
        train = tasks.generate_dataset(spec)
        test = tasks.generate_dataset(spec, split="private_test", n=cfg.eval.n_test)
        trains.append(train)
        tests.append(test)
        tiny_vec = finetune(tiny, train, cfg.finetune, seed=spec.seed).final.update
        per_org["tiny_ft"].append(score_model(tiny.model, tiny.tokenizer, test))
        if shared_vocab:  # the TinyLM holds its fine-tuned LoRA now
            llm.reset()
            per_org["proxy_tuning"].append(score(proxy_tuning_logits(llm.model, tiny.model), tiny.tokenizer, test))
        per_org["llm_base"].append(score_update(llm, torch.zeros(llm.layout.shape), test))
        llm_vec = finetune(llm, train, cfg.finetune, seed=spec.seed).final.update
        per_org["llm_ft"].append(score_model(llm.model, llm.tokenizer, test))
        generated = translate(tiny_vec.unsqueeze(0))[0]
        per_org["grad_transformer"].append(score_update(llm, generated, test))
        for name, b in baselines.items():
            per_org[name].append(score_update(llm, b.predict(tiny_vec.unsqueeze(0))[0], test))
        tiny_vecs.append(tiny_vec)
        llm_vecs.append(llm_vec)
        orgs.append({"secret_k": spec.secret_k, "mixture": spec.mixture,
                     "accuracy": {m: per_org[m][-1].accuracy for m in per_org}})
        kv(stage="eval", seed=seed, org=f"{j + 1}/{len(specs)}", tiny_ft=per_org["tiny_ft"][-1].accuracy,
           llm_ft=per_org["llm_ft"][-1].accuracy, grad_transformer=per_org["grad_transformer"][-1].accuracy,
           seconds=round(time.time() - t0, 1))
    union = [ex for t in tests for ex in t]
    agg_tiny = aggregate(tiny_vecs, "mean")
    multi = {"agg_then_translate": score_update(llm, translate(agg_tiny.unsqueeze(0))[0], union),
             "translate_then_agg": score_update(llm, aggregate([translate(v.unsqueeze(0))[0] for v in tiny_vecs], "mean"), union),
             "llm_base": score_update(llm, torch.zeros(llm.layout.shape), union)}
    return {"summary": summarize(per_org), "orgs": orgs,
            "multi": {k: v.to_dict() for k, v in multi.items()}}


def combine(per_seed: dict, cfg: ExperimentConfig, shared_vocab: bool) -> dict:
    methods = list(next(iter(per_seed.values()))["summary"])
    keys = ["accuracy", "nll", "pgr_accuracy", "pgr_base_accuracy", "pgr_nll", "pgr_base_nll"]
    table = {}
    for m in methods:
        table[m] = {}
        for k in keys:
            vals = [per_seed[s]["summary"][m][k] for s in per_seed]
            table[m][k] = statistics.fmean(vals)
            table[m][k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    multi = {}
    for k in next(iter(per_seed.values()))["multi"]:
        multi[k] = {"accuracy": statistics.fmean(per_seed[s]["multi"][k]["accuracy"] for s in per_seed),
                    "nll": statistics.fmean(per_seed[s]["multi"][k]["nll"] for s in per_seed)}
    gt, best_base = table["grad_transformer"], max(("mean_shadow", "ridge", "nearest_neighbour"), key=lambda m: table[m]["accuracy"])
    verdict = {m: gt["accuracy"] > table[m]["accuracy"] for m in ("mean_shadow", "ridge", "nearest_neighbour")}
    return {"methods": table, "multi_org": multi, "per_seed": per_seed, "seeds": list(per_seed), "n_orgs": cfg.eval.n_orgs,
            "n_test": cfg.eval.n_test, "beats": verdict, "best_baseline": best_base,
            "proxy_tuning": "computed" if shared_vocab else PROXY_SKIPPED}


def format_results(out: dict) -> str:
    n = len(out["seeds"])
    lines = [f"{out['n_orgs']} organizations x {n} seed(s), {out['n_test']} test examples each; mean +- std over seeds",
             "| update | accuracy | answer NLL | PGR (acc) | PGR_base (acc) | PGR (NLL) |", "|---|---|---|---|---|---|"]
    for m, r in out["methods"].items():
        lines.append(f"| {LABELS[m]} | {r['accuracy']:.3f} +- {r['accuracy_std']:.3f} | {r['nll']:.3f} | "
                     f"{r['pgr_accuracy']:.2f} +- {r['pgr_accuracy_std']:.2f} | {r['pgr_base_accuracy']:.2f} | {r['pgr_nll']:.2f} |")
    if "proxy_tuning" not in out["methods"]:
        lines.append(f"| {LABELS['proxy_tuning']} | {out['proxy_tuning']} | | | | |")
    for m, r in out["multi_org"].items():
        lines.append(f"| {LABELS.get(m, m)} (union of test splits) | {r['accuracy']:.3f} | {r['nll']:.3f} | | | |")
    beats = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in out["beats"].items())
    lines.append(f"Grad-Transformer beats -> {beats}. Proxy-tuning: {out['proxy_tuning']}.")
    lines.append("")
    lines.append("Per-organization accuracy (first seed): " + "; ".join(
        f"org{j} k={o['secret_k']}: tiny {o['accuracy']['tiny_ft']:.2f} / gen {o['accuracy']['grad_transformer']:.2f} / llm {o['accuracy']['llm_ft']:.2f}"
        for j, o in enumerate(out["per_seed"][out["seeds"][0]]["orgs"])))
    return "\n".join(lines)


def main(argv=None) -> None:
    args = base_parser("Evaluate generated updates for simulated organizations").parse_args(argv)
    evaluate(load_config(args.config))

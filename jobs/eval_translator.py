"""Vector-level and function-level evaluation of the translator on held-out test subsets.

    gt-ray translator eval --config configs/tiny.yaml

For every test subset (never used to train or to choose anything: not the validation
subsets that chose epochs and sweep trials): the translator's LLM vector from the subset's
final TinyLM vector, against baselines fitted on exactly the translator's training subsets
(mean LLM vector, ridge map, nearest-neighbour retrieval with k=1 and k=3); figures are
cosine and relative L2 error on raw LoRA coordinates and in weight space (B @ A per module),
and the LLM's answer NLL / accuracy with the update applied on examples of the subset's own
task drawn from the ``private_test`` input pool, which no shadow fine-tune ever saw.
``true`` is the LLM's own fine-tuned update (the ceiling), ``base`` none. Subsets are also
grouped by whether some training subset teaches the same combination (tasks of weight >=
``tasks.MIN_WEIGHT`` with the same secrets).
"""

from __future__ import annotations

import time

import torch

from gt_ray.baselines import MeanUpdate, NearestNeighbour, RidgeMap
from gt_ray.config import ExperimentConfig
from gt_ray.pipeline import (N_TEST, collect_subset_rows, fit_baselines, held_out, load_corpus_and_translator, load_translators,
                             score_subset)
from jobs.common import UserError, init_ray, kv, map_tasks, provenance, work_location, write_json

EVAL_FILE = "translator_eval.json"


def evaluate(cfg: ExperimentConfig, serial: bool = False, address: str | None = None) -> dict:
    """Score every method on every held-out test subset and write ``translator_eval.json``.

    The subsets are scored as Ray tasks, one CPU and one torch thread each
    (:func:`jobs.common.map_tasks`; a local cluster is started unless ``address`` or
    RAY_ADDRESS names one); ``serial`` scores them here one after another (the reference:
    the same figures on one torch thread). The predictions are made here."""
    torch.set_num_threads(cfg.eval.num_threads)
    try:
        corpus, _ = load_corpus_and_translator(cfg)
        translators = load_translators(cfg, corpus)
        tr, va_final, tests, llm, scale, test_ids, seen = held_out(cfg, corpus)
    except ValueError as e:
        raise UserError(str(e)) from None
    methods = fit_baselines(tr, {"mean": MeanUpdate(), "ridge": RidgeMap(), "nn1": NearestNeighbour(k=1),
                                 "nn3": NearestNeighbour(k=3)})
    preds = {name: m.predict(va_final["tiny"]) for name, m in methods.items()}
    for seed, translator in translators.items():  # one row per training seed; "grad_transformer" is their mean
        preds[f"grad_transformer_seed{seed}"] = translator.translate(va_final["tiny"])
    preds["true"] = va_final["llm"]
    preds["base"] = torch.zeros_like(va_final["llm"])
    if not serial:
        init_ray(address)
    t0, finished = time.time(), 0

    def progress(i: int, _) -> None:
        nonlocal finished
        finished += 1
        kv(stage="translator_eval", subset=int(va_final["subset_id"][i]), done=f"{finished}/{len(tests)}",
           seconds=round(time.time() - t0, 1))

    items = [({name: p[i] for name, p in preds.items()}, va_final["llm"][i], test) for i, test in enumerate(tests)]
    rows = collect_subset_rows(preds, map_tasks(score_one_subset, (llm, scale), items, on_result=progress, serial=serial))
    per_seed = [rows[f"grad_transformer_seed{s}"] for s in translators]
    rows["grad_transformer"] = {k: [sum(v) / len(v) for v in zip(*(r[k] for r in per_seed))] for k in ("nll", "accuracy")}
    rows["grad_transformer"]["vector"] = [  # the mean of each scalar metric over seeds
        {key: sum(v[key] for v in vs) / len(vs) for key in vs[0] if isinstance(vs[0][key], (int, float))}
        for vs in zip(*(r["vector"] for r in per_seed))]
    table = {}
    for name, r in rows.items():
        entry = {"nll": _mean(r["nll"]), "accuracy": _mean(r["accuracy"])}
        if r["vector"]:
            for key in ("cosine", "rel_l2", "weight_cosine", "weight_rel_l2"):
                entry[key] = _mean([v[key] for v in r["vector"]])
        table[name] = entry
    groups = {}
    for group, flag in (("seen", True), ("unseen", False)):
        idx = [i for i, s in enumerate(seen) if s == flag]
        groups[group] = {"n_subsets": len(idx),
                         **{name: _mean([r["accuracy"][i] for i in idx]) for name, r in rows.items()}}
    out = {"n_test_subsets": len(test_ids), "n_train_subsets": len(set(tr["subset_id"].tolist())),
           "n_test_per_subset": N_TEST, "methods": table, "groups": groups, "seen": seen,
           "per_subset": {name: {"nll": r["nll"], "accuracy": r["accuracy"]} for name, r in rows.items()},
           "test_subsets": test_ids, "translator_seeds": list(translators),
           "translator_seed_accuracy": {str(s): _mean(rows[f"grad_transformer_seed{s}"]["accuracy"]) for s in translators},
           "provenance": provenance(cfg)}
    write_json(work_location(cfg, EVAL_FILE), out)
    print(format_table(out))
    return out


def score_one_subset(shared: tuple, preds: dict, true: torch.Tensor, test: list) -> dict:
    """:func:`gt_ray.pipeline.score_subset` with ``shared = (llm, scale)``: one task of :func:`evaluate`."""
    llm, scale = shared
    return score_subset(preds, true, test, llm, scale)


def format_table(out: dict) -> str:
    lines = [f"held-out test subsets: {out['n_test_subsets']} ({out['groups']['seen']['n_subsets']} whose combination a "
             f"training subset has, {out['groups']['unseen']['n_subsets']} new), {out['n_test_per_subset']} test examples each",
             "| update | cosine | rel L2 | weight cosine | weight rel L2 | answer NLL | accuracy |", "|---|---|---|---|---|---|---|"]
    order = ["base", "mean", "ridge", "nn1", "nn3", "grad_transformer", "true"]
    for name in order:
        m = out["methods"][name]
        f = lambda k: f"{m[k]:.3f}" if k in m else "-"
        lines.append(f"| {name} | {f('cosine')} | {f('rel_l2')} | {f('weight_cosine')} | {f('weight_rel_l2')} | {m['nll']:.3f} | {m['accuracy']:.3f} |")
    g = out["groups"]
    lines.append("accuracy by group (seen / new combination): " + ", ".join(
        f"{name} {g['seen'][name]:.3f} / {g['unseen'][name]:.3f}" for name in order))
    by_seed = out.get("translator_seed_accuracy", {})
    if len(by_seed) > 1:
        lines.append("grad_transformer accuracy per training seed (the row above is their mean): " + ", ".join(
            f"seed {s} {a:.3f}" for s, a in by_seed.items()))
    return "\n".join(lines)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")

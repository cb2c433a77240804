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

import dataclasses
import time

import torch

from gt_ray import tasks
from gt_ray.baselines import MeanUpdate, NearestNeighbour, RidgeMap, vector_metrics
from gt_ray.config import ExperimentConfig, LoraSpec
from gt_ray.corpus import Corpus
from gt_ray.evaluate import score_update
from gt_ray.models import load_card_side
from jobs.common import kv, work_location, write_json
from jobs.train_translator import load_corpus_and_translator, subset_split

EVAL_FILE = "translator_eval.json"
N_TEST = 200


def final_rows(data: dict) -> dict:
    """Keep each subset's last snapshot."""
    last = {}
    for i, (s, st) in enumerate(zip(data["subset_id"].tolist(), data["step"].tolist())):
        if s not in last or st > data["step"][last[s]]:
            last[s] = i
    idx = torch.tensor([last[s] for s in sorted(last)])
    return {k: v[idx] for k, v in data.items()}


def held_out(cfg: ExperimentConfig, corpus: Corpus, n_test: int = N_TEST):
    """The training rows, the test subsets' final rows, their test examples and the LLM.

    Returns:
        (train rows, test final rows, one test list per test subset, LoadedModel of the
        card's LLM, its LoRA scale alpha / r, test subset ids, whether each test subset's
        combination is taught by some training subset)
    """
    card = corpus.card()  # from the manifest: works for a corpus at a URI too
    train_ids, _, test_ids = subset_split(cfg, corpus)
    tr = corpus.load(train_ids)
    te_final = final_rows(corpus.load(test_ids))
    specs = corpus.subset_specs()
    world = corpus.task_config()  # generated tasks, or the corpus' data files
    seen_combos = {specs[i].combination() for i in train_ids}
    tests, seen = [], []
    for sid in te_final["subset_id"].tolist():
        spec = specs[sid]  # the subset's own task (secrets, mixture) on inputs no shadow fine-tune saw
        tests.append(tasks.dataset_examples(dataclasses.replace(spec, split="private_test"), world, n=n_test))
        seen.append(spec.combination() in seen_combos)
    lora = LoraSpec(**card.lora)
    return tr, te_final, tests, load_card_side(card, "llm"), lora.alpha / lora.rank, test_ids, seen


def score_predictions(preds: dict, va_final: dict, tests: list, llm, scale: float) -> dict:
    """Answer NLL / accuracy of the LLM with each predicted update on each subset's test
    examples, and vector metrics against the true update (not for ``true``/``base``)."""
    rows = {name: {"nll": [], "accuracy": [], "vector": []} for name in preds}
    t0 = time.time()
    for i, test in enumerate(tests):
        for name, p in preds.items():
            s = score_update(llm, p[i], test)
            rows[name]["nll"].append(s.nll)
            rows[name]["accuracy"].append(s.accuracy)
            if name not in ("true", "base"):
                rows[name]["vector"].append(vector_metrics(p[i], va_final["llm"][i], llm.layout, llm.init, scale))
        kv(stage="translator_eval", subset=int(va_final["subset_id"][i]), done=f"{i + 1}/{len(tests)}",
           seconds=round(time.time() - t0, 1))
    return rows


def evaluate(cfg: ExperimentConfig) -> dict:
    torch.set_num_threads(cfg.eval.num_threads)
    corpus, translator = load_corpus_and_translator(cfg)
    tr, va_final, tests, llm, scale, test_ids, seen = held_out(cfg, corpus)
    methods = {"mean": MeanUpdate(), "ridge": RidgeMap(), "nn1": NearestNeighbour(k=1), "nn3": NearestNeighbour(k=3)}
    preds = {name: m.fit(tr["tiny"], tr["llm"], tr["subset_id"]).predict(va_final["tiny"]) for name, m in methods.items()}
    preds["grad_transformer"] = translator.translate(va_final["tiny"])
    preds["true"] = va_final["llm"]
    preds["base"] = torch.zeros_like(va_final["llm"])
    rows = score_predictions(preds, va_final, tests, llm, scale)
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
           "test_subsets": test_ids}
    write_json(work_location(cfg, EVAL_FILE), out)
    print(format_table(out))
    return out


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
    return "\n".join(lines)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")

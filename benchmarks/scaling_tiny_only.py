"""The scaling curve of TinyLM-only shadow subsets: does shadow signal without LLM fine-tunes help?

    .venv/bin/python benchmarks/scaling_tiny_only.py [--config configs/tiny.yaml] [--points 0 250 500 1000]
        [--seeds 0 1] [--epochs 60] [--patience 15] [--n-test 100] [--inputs tinylm|code]
        [--subset-budget 22400] [--inputs behaviour --behaviour-rows 2 --input-norm-eps 0.05]

Needs a built corpus (``gt-ray corpus build``) with at least ``max(points)`` TinyLM-only
training subsets (``corpus.n_tiny_only``). The protocol is the pipeline's
(`gt_ray.pipeline.translator_split`): paired and TinyLM-only subsets are each split into
train / validation / test by subset; every point trains on all paired training subsets plus
the first ``n`` TinyLM-only training subsets, chooses epochs on the *same* validation
subsets (paired and TinyLM-only: the function objective needs no LLM update), and is scored
on the *same* test subsets: the paired ones (where the true LLM update gives the ceiling)
and the TinyLM-only ones (more subsets, tighter intervals). Nearest-neighbour retrieval can
only use paired subsets, so it is the same at every point. "new": a test subset whose
combination no paired training subset has (retrieval's reach).

``--subset-budget B`` trains every point for the same compute: at most ``ceil(B / n)``
epochs over its ``n`` training subsets (one snapshot of each per epoch), with the config's
patience scaled by the same factor; without it every point gets the same epochs.

``--inputs code`` is the diagnostic upper bound of the composing half: the same translator
and function loss, fed an exact code of each subset's secrets and mixture (for every task,
its mixture weight in the slot of its behaviourally canonical secret, tiled to the TinyLM
update's size) in place of the TinyLM update. Can composition be learned at all, and how
does it scale with subsets, when reading the secret is solved?

``--inputs behaviour`` feeds what the update does instead (`gt_ray.translator.behaviour`):
the updated TinyLM's next-token probabilities along its greedy answers to public probe
prompts. By default one input token per prompt; ``--behaviour-rows N`` concatenates them and
cuts the result into ``N`` wide tokens, as the update's own layer rows are.
``--input-norm-eps`` floors the input side's per-coordinate std (probabilities near 0 on
every training row otherwise standardize to thousands on a test row).

Costs: a TinyLM-only and a paired fine-tune of one subset are timed here (one thread), so
each point's provider compute is corpus CPU-seconds (paired training subsets x pair cost +
``n`` x TinyLM cost) plus training seconds. Prints a table and writes JSON (default
``benchmarks/results/scaling_tiny_only.json``), with the git commit and config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gt_ray import tasks  # noqa: E402
from gt_ray.baselines import NearestNeighbour  # noqa: E402
from gt_ray.corpus import Corpus  # noqa: E402
from gt_ray.evaluate import score_update  # noqa: E402
from gt_ray.models import load_card_side  # noqa: E402
from gt_ray.pipeline import (behaviour_input, final_rows, function_objective, load_rows, resolve_settings,  # noqa: E402
                             translator_split)
from gt_ray.shadow import finetune_pair, finetune_tiny_only, is_tiny_only, plan_subsets  # noqa: E402
from gt_ray.stats import paired_bootstrap, per_task_accuracy  # noqa: E402
from gt_ray.translator.config import TranslatorConfig  # noqa: E402
from gt_ray.translator.train import train_translator  # noqa: E402
from jobs.common import load_config, provenance  # noqa: E402


def fine_tune_costs(cfg, card, reps: int = 3) -> dict:
    """Seconds per shadow subset of each kind on one thread (mean of ``reps`` fresh subsets)."""
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    subsets = plan_subsets(cfg, reps, seed=987_654, kind="tiny_only")
    t0 = time.perf_counter()
    for s in subsets:
        finetune_tiny_only(tiny, s, cfg.finetune, cfg.tasks)
    t_tiny = (time.perf_counter() - t0) / reps
    paired = plan_subsets(cfg, reps, seed=987_654)
    t0 = time.perf_counter()
    for s in paired:
        finetune_pair(tiny, llm, s, cfg.finetune, cfg.tasks)
    t_pair = (time.perf_counter() - t0) / reps
    return {"tiny_only_seconds_per_subset": round(t_tiny, 3), "paired_seconds_per_subset": round(t_pair, 3)}


def oracle_code(specs: dict, subset_ids: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One row per subset id: each task's mixture weight at (task, canonical secret) in a
    ``len(tasks) x N_PARAMS`` grid, tiled to ``shape`` (one TinyLM update's (layers, width),
    so the translator's input layout is unchanged)."""
    dim = math.prod(shape)
    names = sorted({t for s in specs.values() for t in s.mixture})
    rows = []
    for sid in subset_ids.tolist():
        spec = specs[int(sid)]
        grid = torch.zeros(len(names), tasks.N_PARAMS)
        for t, w in spec.mixture.items():
            grid[names.index(t), tasks.canonical_secret(t, spec.secret(t))] = w
        flat = grid.flatten()
        rows.append(flat.repeat(dim // flat.numel() + 1)[:dim].reshape(shape))
    return torch.stack(rows)


def training_split(cfg, corpus, n_tiny_only: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """The pipeline's split (`translator_split`) as the benches use it: the paired training
    subsets, the TinyLM-only training subsets (in order: a point takes the first ``n``), and
    the validation and test subsets. Exits with a clear message when fewer than
    ``n_tiny_only`` TinyLM-only training subsets exist."""
    train_ids, val_ids, test_ids = translator_split(cfg, corpus)
    paired_train = [i for i in train_ids if not is_tiny_only(i)]
    only_train = [i for i in train_ids if is_tiny_only(i)]
    if n_tiny_only > len(only_train):
        raise SystemExit(f"error: the corpus has {len(only_train)} TinyLM-only training subsets, fewer than "
                         f"{n_tiny_only}: raise corpus.n_tiny_only and rebuild")
    return paired_train, only_train, val_ids, test_ids


def behaviour_inputs(corpus, train_ids, prompts: int, steps: int, rows: int | None = None, tiny=None):
    """The rows' behaviour tokens as the pipeline's ``input: behaviour`` makes them
    (`gt_ray.pipeline.behaviour_input`: ``prompts`` probe prompts drawn from 4 public examples
    of each training subset, seed 0, ``steps`` greedy positions each), cut into ``rows`` input
    tokens (default: one per prompt); a ``rows`` that does not divide the matrix exits at once.
    ``tiny``: the card's TinyLM when the caller has loaded it (else it is loaded here)."""
    cfg = TranslatorConfig(input="behaviour", behaviour_prompts=prompts, behaviour_steps=steps,
                           behaviour_rows=rows or prompts)
    try:
        enc = behaviour_input(corpus, cfg, train_ids, tiny=tiny)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    drawn = enc.prompts
    print(f"behaviour inputs: {enc.shape} per update; probe tasks "
          f"{sorted((t, sum(p.task == t for p in drawn)) for t in {p.task for p in drawn})}", flush=True)

    def encode(batch):
        t0 = time.perf_counter()
        f = enc(batch["tiny"])
        print(f"behaviour of {f.shape[0]} updates: {time.perf_counter() - t0:.0f} s", flush=True)
        return f
    return encode


def update_and(encode):
    """``--inputs both``: each row's raw update tokens, zero-padded to the width of
    ``encode``'s tokens, followed by those tokens (one sequence the translator reads)."""
    def both(batch):
        extra = encode(batch)
        raw = batch["tiny"].float()
        if raw.shape[2] > extra.shape[2]:
            raise SystemExit(f"error: --inputs both needs behaviour tokens at least as wide as the update's rows "
                             f"({extra.shape[2]} < {raw.shape[2]}): lower --behaviour-rows")
        return torch.cat([torch.nn.functional.pad(raw, (0, extra.shape[2] - raw.shape[2])), extra], dim=1)
    return both


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--points", type=int, nargs="+", default=[0, 250, 500, 1000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: the config's)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (default: the config's)")
    p.add_argument("--subset-budget", type=int, default=None,
                   help="subset-epochs per point (equal training compute): max epochs = ceil(budget / training subsets)")
    p.add_argument("--n-test", type=int, default=100, help="test examples per test subset")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inputs", choices=["tinylm", "code", "behaviour", "both"], default="tinylm",
                   help="what the translator reads: the TinyLM update, the oracle code of secrets and mixture, "
                        "the updated TinyLM's answers to public probe prompts, or both: the update's rows "
                        "(zero-padded to the behaviour tokens' width) followed by the behaviour tokens")
    p.add_argument("--probe-prompts", type=int, default=64, help="probe prompts of --inputs behaviour")
    p.add_argument("--probe-steps", type=int, default=8, help="greedy answer positions per probe prompt")
    p.add_argument("--behaviour-rows", type=int, default=None,
                   help="--inputs behaviour: cut the concatenated behaviour matrix into this many input tokens "
                        "(default: one token per probe prompt); must divide prompts x steps x vocabulary")
    p.add_argument("--input-norm-eps", type=float, default=None,
                   help="floor on the input side's per-coordinate std (translator.model.input_norm_eps); "
                        "behaviour inputs need one, their rare probability moves standardize to thousands")
    p.add_argument("--snapshot-stride", type=int, default=1,
                   help="train on every k-th snapshot of each subset (the last kept); 1 = all")
    p.add_argument("--out", default="benchmarks/results/scaling_tiny_only.json")
    args = p.parse_args()
    # one line per epoch from the training loop, so a long point shows its progress
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("gt_ray.translator.train").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    run_provenance = provenance(cfg)  # the code as it is when the run starts: edits during a long run do not count
    corpus = Corpus(cfg.corpus_dir)
    card = corpus.card()
    model_cfg, train_cfg, settings = resolve_settings(cfg, corpus)
    if args.behaviour_rows is not None and (args.inputs not in ("behaviour", "both") or args.behaviour_rows < 1):
        raise SystemExit("error: --behaviour-rows needs --inputs behaviour or both and a positive count")
    if args.input_norm_eps is not None:
        model_cfg = dataclasses.replace(model_cfg, input_norm_eps=args.input_norm_eps)
    if args.epochs:
        train_cfg = dataclasses.replace(train_cfg, max_epochs=args.epochs)
    if args.patience:
        train_cfg = dataclasses.replace(train_cfg, patience=args.patience)
    paired_train, only_train, val_ids, test_ids = training_split(cfg, corpus, max(args.points))
    costs = fine_tune_costs(cfg, card)
    print(f"fine-tune cost per subset: {costs}", flush=True)

    # what every point shares: validation rows, test subsets and examples, the LLM, retrieval
    va = load_rows(corpus, val_ids)
    te = final_rows(load_rows(corpus, test_ids))
    specs = corpus.subset_specs()
    world = corpus.task_config()
    tests = [tasks.dataset_examples(dataclasses.replace(specs[s], split="private_test"), world, n=args.n_test)
             for s in te["subset_id"].tolist()]
    paired_combos = {specs[i].combination() for i in paired_train}
    new = [specs[s].combination() not in paired_combos for s in te["subset_id"].tolist()]
    has_true = te["paired"].tolist()
    mixtures = [specs[s].mixture for s in te["subset_id"].tolist()]
    llm = load_card_side(card, "llm")
    shadow = load_rows(corpus, paired_train)
    nn = NearestNeighbour(k=1).fit(shadow["tiny"], shadow["llm"], shadow["subset_id"])
    fixed = {"nearest_neighbour": nn.predict(te["tiny"]), "base": torch.zeros_like(te["llm"])}
    code = (lambda rows: oracle_code(specs, rows["subset_id"], tuple(rows["tiny"].shape[1:]))) if args.inputs == "code" else None
    te_updates = te["tiny"].clone()
    tiny = load_card_side(card, "tiny")  # the organization's own updated TinyLM is a row
    if args.inputs in ("behaviour", "both"):
        code = behaviour_inputs(corpus, paired_train + only_train,
                                args.probe_prompts, args.probe_steps, args.behaviour_rows, tiny=tiny)
        if args.inputs == "both":
            code = update_and(code)
    if code is not None:
        va["tiny"], te["tiny"] = code(va), code(te)
        model_cfg = model_cfg.with_layouts(L_tiny=va["tiny"].shape[1], d_tiny=va["tiny"].shape[2],
                                           L_llm=model_cfg.L_llm, d_llm=model_cfg.d_llm)
    scores = {name: [score_update(llm, u, t).accuracy for u, t in zip(pred, tests)] for name, pred in fixed.items()}
    scores["tinylm"] = [score_update(tiny, u, t).accuracy for u, t in zip(te_updates, tests)]
    scores["true"] = [score_update(llm, u, t).accuracy if ok else float("nan") for u, t, ok in zip(te["llm"], tests, has_true)]

    points = []
    for n in args.points:
        ids = paired_train + only_train[:n]
        tr = load_rows(corpus, ids)
        point_cfg = train_cfg
        if args.subset_budget:
            epochs = math.ceil(args.subset_budget / len(ids))
            point_cfg = dataclasses.replace(train_cfg, max_epochs=epochs,
                                            patience=max(5, math.ceil(train_cfg.patience * epochs / train_cfg.max_epochs)))
        if args.snapshot_stride > 1:  # every k-th snapshot of each subset, the last one kept
            keep = (tr["step"] % args.snapshot_stride) == (max(tr["step"].tolist()) % args.snapshot_stride)
            tr = {k: v[keep] for k, v in tr.items()}
        if code is not None:
            tr["tiny"] = code(tr)
        objective = function_objective(corpus, ids, val_ids, train_cfg)
        runs = []
        for seed in args.seeds:
            t0 = time.time()
            translator, hist = train_translator(
                tr["tiny"], tr["llm"], va["tiny"], va["llm"], dataclasses.replace(point_cfg, seed=seed), model_cfg,
                train_subsets=tr["subset_id"], val_subsets=va["subset_id"], function=objective,
                train_paired=tr["paired"], val_paired=va["paired"])
            seconds = time.time() - t0
            pred = translator.translate(te["tiny"])
            acc = [score_update(llm, u, t).accuracy for u, t in zip(pred, tests)]
            best = next((h for h in hist if h["epoch"] == translator.metadata.get("best_epoch")), {})
            runs.append({"seed": seed, "train_seconds": round(seconds, 1), "epochs": len(hist),
                         "max_epochs": point_cfg.max_epochs, "patience": point_cfg.patience,
                         "best_epoch": translator.metadata.get("best_epoch"), "val_accuracy": best.get("val_accuracy"),
                         "accuracy": acc})
            print(f"n_tiny_only={n} seed={seed} test_accuracy={statistics.fmean(acc):.3f} "
                  f"val_accuracy={best.get('val_accuracy')} best_epoch={translator.metadata.get('best_epoch')} "
                  f"train_seconds={seconds:.0f}", flush=True)
        mean_acc = [statistics.fmean(r["accuracy"][i] for r in runs) for i in range(len(tests))]
        points.append(summarize_point(n, len(paired_train), runs, mean_acc, scores, new, has_true, costs, mixtures))
        probe = ({"prompts": args.probe_prompts, "steps": args.probe_steps, "rows": args.behaviour_rows,
                  "input_norm_eps": args.input_norm_eps} if args.inputs in ("behaviour", "both") else None)
        out = {"config": args.config, "inputs": args.inputs, "snapshot_stride": args.snapshot_stride, "probe": probe,
               "seeds": args.seeds, "subset_budget": args.subset_budget,
               "max_epochs": train_cfg.max_epochs, "patience": train_cfg.patience,
               # the resolved settings (the sweep's best YAML may override the config's lr) and the
               # validation subsets, so a pipeline run can be compared like for like
               "train": dataclasses.asdict(train_cfg), "settings_source": settings["settings_source"],
               "val_subsets": [int(i) for i in val_ids],
               "n_paired_train": len(paired_train), "n_tiny_only_train_available": len(only_train),
               "n_val": {"paired": sum(not is_tiny_only(i) for i in val_ids),
                         "tiny_only": sum(is_tiny_only(i) for i in val_ids)},
               "n_test": {"paired": sum(has_true), "tiny_only": len(has_true) - sum(has_true), "new": sum(new)},
               "n_test_examples": args.n_test, "fine_tune_costs": costs,
               "baselines": {name: group_means(v, new, has_true) for name, v in scores.items()},
               # per test subset, so any split can be recomputed: ids, mixtures, each baseline's accuracy
               "test_subsets": te["subset_id"].tolist(), "test_mixtures": mixtures, "test_new": new,
               "baseline_accuracy_per_subset": scores,
               "baseline_per_task": {name: split_by_task(mixtures, v) for name, v in scores.items()},
               "points": points, "complete": len(points) == len(args.points), "provenance": run_provenance}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every point: a long run keeps what it did
        Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True, default=str))
    print(format_table(out))


def group_means(acc: list[float], new: list[bool], has_true: list[bool]) -> dict:
    """Mean accuracy over all test subsets, the new ones, the seen ones, and the paired ones."""
    def m(flags):
        xs = [a for a, f in zip(acc, flags) if f and a == a]
        return statistics.fmean(xs) if xs else float("nan")
    return {"all": m([True] * len(acc)), "new": m(new), "seen": m([not x for x in new]), "paired": m(has_true)}


def split_by_task(mixtures: list[dict], acc: list[float]) -> dict:
    """Least-squares split of per-subset accuracy by task weight (`gt_ray.stats.per_task_accuracy`),
    over the subsets with a score (the true update has none on TinyLM-only subsets)."""
    keep = [i for i, a in enumerate(acc) if a == a]
    try:
        return per_task_accuracy([mixtures[i] for i in keep], [acc[i] for i in keep])
    except ValueError as e:  # too few scored subsets to determine every task
        return {"skipped": str(e)}


def summarize_point(n, n_paired, runs, mean_acc, scores, new, has_true, costs, mixtures) -> dict:
    nn = scores["nearest_neighbour"]
    per_seed = [group_means(r["accuracy"], new, has_true) for r in runs]
    entry = {"n_tiny_only": n, "accuracy": group_means(mean_acc, new, has_true),
             "accuracy_per_seed": per_seed,
             "accuracy_per_subset": [r["accuracy"] for r in runs],  # per seed, in test_subsets order
             "per_task": split_by_task(mixtures, mean_acc),
             "minus_nn": {g: paired_bootstrap([a for a, f in zip(mean_acc, flags) if f], [b for b, f in zip(nn, flags) if f])
                          for g, flags in (("all", [True] * len(nn)), ("new", new))},
             "train_seconds": [r["train_seconds"] for r in runs], "best_epoch": [r["best_epoch"] for r in runs],
             "max_epochs": [r["max_epochs"] for r in runs], "epochs_run": [r["epochs"] for r in runs],
             "val_accuracy": [r["val_accuracy"] for r in runs],
             "corpus_cpu_seconds": round(n_paired * costs["paired_seconds_per_subset"]
                                         + n * costs["tiny_only_seconds_per_subset"], 1)}
    entry["provider_cpu_seconds"] = round(entry["corpus_cpu_seconds"] + statistics.fmean(entry["train_seconds"]), 1)
    return entry


def format_table(out: dict) -> str:
    n = out["n_test"]
    lines = [f"translator input: {out.get('inputs', 'tinylm')}; {n['paired'] + n['tiny_only']} test subsets ({n['paired']} paired, {n['tiny_only']} TinyLM-only; "
             f"{n['new']} new combinations), {out['n_paired_train']} paired training subsets, seeds {out['seeds']}",
             "| TinyLM-only subsets | test accuracy (mean over seeds) | per seed | new | minus NN, all [95%] | "
             "minus NN, new [95%] | corpus CPU s | train s |", "|---|---|---|---|---|---|---|---|"]
    for p in out["points"]:
        a, d = p["accuracy"], p["minus_nn"]
        seeds = " / ".join(f"{s['all']:.3f}" for s in p["accuracy_per_seed"])
        iv = lambda x: f"{x['mean_diff']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}]"  # noqa: E731
        lines.append(f"| {p['n_tiny_only']} | {a['all']:.3f} | {seeds} | {a['new']:.3f} | {iv(d['all'])} | {iv(d['new'])} | "
                     f"{p['corpus_cpu_seconds']:.0f} | {statistics.fmean(p['train_seconds']):.0f} |")
    b = out["baselines"]
    lines.append(f"nearest neighbour: {b['nearest_neighbour']['all']:.3f} (new {b['nearest_neighbour']['new']:.3f}); "
                 f"true LLM update on the paired test subsets: {b['true']['paired']:.3f}; LLM base {b['base']['all']:.3f}"
                 + (f"; TinyLM with its own update {b['tinylm']['all']:.3f} (new {b['tinylm']['new']:.3f})" if "tinylm" in b else ""))
    lines += per_task_table(out)
    return "\n".join(lines)


def per_task_table(out: dict) -> list[str]:
    """Per-task accuracy (least-squares split by task weight over the test subsets) of the
    translator at each point and of the baselines; empty for results written before the split."""
    base = out.get("baseline_per_task")
    if not base:
        return []
    rows = [(f"translator, {p['n_tiny_only']} TinyLM-only", p["per_task"]) for p in out["points"]]
    rows += [(name, base[name]) for name in ("tinylm", "nearest_neighbour", "true") if name in base]
    tasks_ = next((list(r) for _, r in rows if "skipped" not in r), [])
    lines = ["", "Per task (least-squares split of test-subset accuracy by task weight; 'true' on the paired subsets only):",
             "| method | " + " | ".join(tasks_) + " |", "|---|" + "---|" * len(tasks_)]
    for name, r in rows:
        cells = [r["skipped"]] if "skipped" in r else [f"{r[t]:.3f}" for t in tasks_]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()

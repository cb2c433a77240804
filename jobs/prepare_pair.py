"""Prepare the model pair: build and pretrain (or locate) both models, write the pair card.

    gt-ray pair prepare --config configs/tiny.yaml
    gt-ray pair report  --config configs/tiny.yaml   # the README's pair table
    gt-ray pair report  --config configs/tiny.yaml --n-probe-train 160 --n-probe-test 60 \\
        --pretrain-seeds 11 12                        # the world criteria on a second pretraining

Pretraining (a few CPU minutes at tiny scale) runs the two models at once, one process each
(``--serial``: one after the other in this process), and is cached on disk keyed by the
model's config hash, so a rerun takes seconds.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import random
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from gt_ray import storage, tasks, world
from gt_ray.config import ExperimentConfig
from gt_ray.evaluate import score_model
from gt_ray.finetune import finetune
from gt_ray.updates import read_lora
from gt_ray.models import (BUILD_FILE, COMPLETE_MARKER, PairCard, cached_model_dir, load_card_side, make_pair_card,
                           prepare_model, recipe_of)
from jobs.common import (UserError, base_parser, kv, load_config, provenance, run_main, work_dir, work_location,
                         write_json)

CARD_FILE = "pair_card.json"
REPORT_FILE = "pair_report.json"
SIDE_NAMES = {"tiny": "TinyLM", "llm": "LLM"}


def prepare(cfg: ExperimentConfig, concurrent: bool = True) -> PairCard:
    """Build or find both models and write ``{work_dir}/pair_card.json``.

    With ``concurrent``, two models to pretrain are pretrained at once, each in a process of
    its own with its configured thread count (:func:`pretrain_concurrently`); a TinyLM derived
    from the LLM waits for it, as does everything with ``concurrent=False``.
    """
    specs = {side: getattr(cfg.pair, side) for side in ("llm", "tiny")}
    to_build = [side for side, spec in specs.items() if _needs_build(spec, cfg)]
    if (concurrent and len(to_build) == 2 and all(specs[side].arch is not None for side in to_build)
            and specs["tiny"] != specs["llm"]):  # one model for both sides: built once
        pretrain_concurrently(cfg, to_build)  # then found in the cache below
    paths = {}
    for side, spec in specs.items():  # the LLM first: a TinyLM may be derived from it
        if _needs_build(spec, cfg):
            what, recipe = ("pretrain", spec.pretrain) if spec.arch is not None else ("heal", spec.heal)
            torch.set_num_threads(recipe.num_threads)
            bar = tqdm(total=recipe.steps, desc=f"{what} {side}", unit="step", mininterval=2)

            def on_step(step: int, loss: float, bar=bar) -> None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")

            t0 = time.time()
            paths[side] = _prepare_model(spec, cfg, side, on_step)
            bar.close()
            kv(stage=what, model=side, seconds=round(time.time() - t0, 1), path=paths[side])
        else:
            t0 = time.time()
            paths[side] = _prepare_model(spec, cfg, side)
            if spec.registry is not None:
                kv(stage="fetch", model=side, registry=spec.registry, seconds=round(time.time() - t0, 1), path=paths[side])
    card = make_pair_card(cfg.pair, paths["tiny"], paths["llm"], recipe=recipe_of(cfg))
    card_path = card.save(work_location(cfg, CARD_FILE))  # work_dir may be a URI
    kv(stage="pair", card=card_path, card_id=card.card_id,
       tiny_layout=f"{card.tiny.n_layers}x{card.tiny.d_layer}", llm_layout=f"{card.llm.n_layers}x{card.llm.d_layer}")
    return card


def _needs_build(spec, cfg: ExperimentConfig) -> bool:
    """Whether gt-ray builds the model of ``spec`` (pretrained or derived) and has not yet."""
    built = spec.arch is not None or spec.derive_from is not None
    return built and not (cached_model_dir(spec, cfg.cache_dir, cfg.tasks.names) / COMPLETE_MARKER).exists()


def _prepare_model(spec, cfg: ExperimentConfig, side: str, on_step=None) -> Path:
    try:
        return prepare_model(spec, cfg.cache_dir, cfg.tasks.names, on_step)
    except ValueError as e:  # a bad path, a missing registry package, a layer the LLM lacks
        raise UserError(f"pair.{side}: {e}") from None


def pretrain_concurrently(cfg: ExperimentConfig, sides: list[str], lines_per_model: int = 10) -> dict[str, Path]:
    """Pretrain the ``arch`` models of ``sides`` at once, one spawned process each (torch
    threads from its ``pretrain.num_threads``), into the cache; the weights are the bytes a
    pretraining in this process gives. Prints one ``key=value`` line per tenth of each
    model's steps, and one when it is done.

    Returns:
        ``{side: model directory}``.

    Raises:
        UserError: if a model cannot be built (a ``ValueError`` in its process), naming the side.
        RuntimeError: on any other error in a process, or if one dies without a result; the
            other processes are stopped then.
    """
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
    messages = ctx.Queue()
    procs = {side: ctx.Process(target=_pretrain_in_process, name=f"pretrain-{side}", daemon=True,
                               args=(side, getattr(cfg.pair, side), cfg.cache_dir, cfg.tasks.names,
                                     max(1, getattr(cfg.pair, side).pretrain.steps // lines_per_model), messages))
             for side in sides}
    t0 = time.time()
    for proc in procs.values():
        proc.start()
    paths: dict[str, Path] = {}
    try:
        while len(paths) < len(procs):
            try:
                kind, side, *rest = messages.get(timeout=2.0)
            except queue.Empty:
                dead = {s: p.exitcode for s, p in procs.items() if s not in paths and p.exitcode not in (None, 0)}
                if dead:  # killed (out of memory?) or crashed below Python; exit code 0 still has a message on its way
                    side, code = next(iter(dead.items()))
                    raise RuntimeError(f"pair.{side}: its pretraining process died (exit code {code}) without a result")
                continue
            steps = getattr(cfg.pair, side).pretrain.steps
            if kind == "step":
                step, loss = rest
                kv(stage="pretrain", model=side, step=f"{step}/{steps}", loss=round(loss, 4),
                   seconds=round(time.time() - t0, 1))
            elif kind == "done":
                paths[side] = Path(rest[0])
                kv(stage="pretrain", model=side, seconds=round(time.time() - t0, 1), path=paths[side])
            else:  # "error"
                error_type, message, trace = rest
                if error_type == "ValueError":
                    raise UserError(f"pair.{side}: {message}")
                raise RuntimeError(f"pair.{side}: {error_type}: {message} (in its pretraining process)\n{trace}")
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()  # after an error: the other model stops too
            proc.join()
    return paths


def _pretrain_in_process(side: str, spec, cache_dir: str, task_names: list[str], every: int, messages) -> None:
    """One spawned process of :func:`pretrain_concurrently`: ``("step", side, step, loss)``
    every ``every`` steps, then ``("done", side, path)`` or ``("error", side, type, message,
    traceback)`` on ``messages``."""
    torch.set_num_threads(spec.pretrain.num_threads)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            messages.put(("step", side, step, loss))

    try:
        messages.put(("done", side, str(prepare_model(spec, cache_dir, task_names, on_step))))
    except Exception as e:  # reported to the parent, which raises it
        messages.put(("error", side, type(e).__name__, str(e), traceback.format_exc()))


def load_or_prepare_card(cfg: ExperimentConfig) -> PairCard:
    """The pair card of ``cfg``, preparing the pair if the card is missing or stale."""
    path = work_location(cfg, CARD_FILE)
    if storage.is_file(path):
        card = PairCard.load(path)
        def current(spec, side_card) -> bool:
            want = cached_model_dir(spec, cfg.cache_dir, cfg.tasks.names)
            return (want is None or Path(side_card.path) == want.resolve()) and Path(side_card.path).is_dir()

        recipe_current = card.recipe is None or card.recipe == recipe_of(cfg)  # None: a card from before recipes
        if current(cfg.pair.tiny, card.tiny) and current(cfg.pair.llm, card.llm) and recipe_current:
            return card
    return prepare(cfg)


def report_mixture(cfg: ExperimentConfig, i: int) -> tasks.DatasetSpec:
    """The report's ``i``-th organization-like mixture (the config's tasks, mixture and
    secrets, private split; seeds other than the evaluation's)."""
    return tasks.draw_dataset_spec(random.Random(f"report-mixture|{cfg.seed}|{i}"), "private_train", cfg.tasks.names,
                                   cfg.finetune.n_examples, cfg.tasks.dirichlet_alpha, cfg.tasks.secret_per_task)


def report(cfg: ExperimentConfig, card: PairCard, n_datasets: int = 3, n_test: int = 300,
           task_names: list[str] | None = None, n_mixtures: int = 0, n_probe_train: int = 0,
           n_probe_test: int = 0) -> dict:
    """Accuracy of both models per task, and the world criteria (:mod:`gt_ray.world`).

    Per task: k shown (pretraining ability), k hidden before and after LoRA fine-tuning on a
    single-task dataset with a secret k, trained on ``private_train`` and tested on
    ``private_test`` as an organization's data is. ``task_names`` defaults to the config's
    tasks; others show what a model could learn outside the world it was pretrained on (a
    built TinyLM knows only the config's). ``n_mixtures`` more datasets are drawn as
    organizations' are (the config's mixture and secrets, private split, other seeds than the
    evaluation's): criterion 3 wants a TinyLM clearly below the LLM after fine-tuning on these.
    ``n_probe_train`` TinyLM fine-tunes on public mixtures (the provider's) and
    ``n_probe_test`` on private ones (organizations') measure criterion 2: how well a probe
    fit on the first reads each task's secret from the second.
    """
    torch.set_num_threads(cfg.finetune.num_threads)  # 2 OpenMP threads crawl when the cores are shared
    rows = {}
    models = {side: load_card_side(card, side, getattr(cfg.pair, side).dtype) for side in ("tiny", "llm")}
    rng = random.Random(cfg.seed)
    t0 = time.time()
    code = provenance(cfg)  # at the start: the commit whose code runs, even if HEAD moves during the report
    ft_seconds: dict[str, list[float]] = {"tiny": [], "llm": []}

    def timed_finetune(side: str, examples, seed: int) -> None:
        t = time.time()
        finetune(models[side], examples, cfg.finetune, seed=seed)
        ft_seconds[side].append(time.time() - t)

    for name in (task_names or cfg.tasks.names) if n_datasets > 0 else []:
        row = {}
        for side, lm in models.items():
            shown, before, after = [], [], []
            for _ in range(n_datasets):
                spec = tasks.DatasetSpec("private_train", rng.randrange(tasks.N_PARAMS), {name: 1.0}, cfg.finetune.n_examples,
                                         rng.randrange(2**31))
                lm.reset()
                shown.append(score_model(lm.model, lm.tokenizer,
                                         tasks.generate_dataset(spec, show_k=True, split="private_test", n=n_test)).accuracy)
                test = tasks.generate_dataset(spec, split="private_test", n=n_test)
                before.append(score_model(lm.model, lm.tokenizer, test).accuracy)
                timed_finetune(side, tasks.generate_dataset(spec), spec.seed)
                after.append(score_model(lm.model, lm.tokenizer, test).accuracy)
            row[side] = {"k_shown": _mean(shown), "hidden_before": _mean(before), "hidden_after_ft": _mean(after)}
            kv(stage="report", task=name, model=side, **{k: round(v, 3) for k, v in row[side].items()})
        rows[name] = row
    mixtures = []
    for i in range(n_mixtures):
        spec = report_mixture(cfg, i)
        test = tasks.generate_dataset(spec, split="private_test", n=n_test)
        acc = {}
        for side, lm in models.items():
            timed_finetune(side, tasks.generate_dataset(spec), spec.seed)
            acc[side] = score_model(lm.model, lm.tokenizer, test).accuracy
        mixtures.append({"mixture": {t: round(w, 3) for t, w in spec.mixture.items() if w >= tasks.MIN_WEIGHT},
                         "tiny_ft": acc["tiny"], "llm_ft": acc["llm"]})
        kv(stage="report", mixture=f"{i + 1}/{n_mixtures}", tiny_ft=round(acc["tiny"], 3), llm_ft=round(acc["llm"], 3))
    probes = _probe_secrets(cfg, models["tiny"], n_probe_train, n_probe_test, ft_seconds["tiny"]) if n_probe_test else {}
    builds = {side: json.loads((Path(getattr(card, side).path) / BUILD_FILE).read_text())
              if (Path(getattr(card, side).path) / BUILD_FILE).is_file() else {} for side in ("tiny", "llm")}
    out = {"card_id": card.card_id, "tasks": rows, "n_datasets_per_task": n_datasets, "n_test": n_test,
           "models": {side: {"params": getattr(card, side).n_params, "layout": [getattr(card, side).n_layers, getattr(card, side).d_layer],
                             "weights_sha256": getattr(card, side).weights_sha256,  # compare reports across machines
                             "built": "derived" if "derived_from" in builds[side] else "pretrained" if builds[side] else None,
                             "pretrain_seconds": builds[side].get("seconds"), "pretrain_final_loss": builds[side].get("final_loss"),
                             "pretrain_seed": getattr(cfg.pair, side).pretrain.seed if builds[side] else None,
                             "finetune_seconds": _mean(ft_seconds[side]) if ft_seconds[side] else None,
                             **({"derived": {k: builds[side][k] for k in ("keep_layers", "heal", "kd_loss_before", "kd_loss_after")}
                                 | {"teacher_layers": builds[side]["derived_from"]["n_layers"]}}
                                if "derived_from" in builds[side] else {})}
                      for side in ("tiny", "llm")}}
    orgs = None
    if mixtures:
        tiny_ft, llm_ft = (_mean([m[k] for m in mixtures]) for k in ("tiny_ft", "llm_ft"))
        out["mixtures"] = orgs = {"n": len(mixtures), "tiny_ft": tiny_ft, "llm_ft": llm_ft, "gap": llm_ft - tiny_ft,
                                  "llm_ft_min": min(m["llm_ft"] for m in mixtures),
                                  "llm_ft_below_0.5": sum(m["llm_ft"] < 0.5 for m in mixtures), "rows": mixtures}
    if probes:
        out["probes"] = probes
    if not cfg.tasks.data_files:
        distinct = {name: world.distinct_share(name) for name in (task_names or cfg.tasks.names)}
        out["criteria"] = world.evaluate_criteria(rows, probes.get("tasks", {}), orgs, distinct)
    out["report_seconds"] = round(time.time() - t0, 1)
    out["provenance"] = code  # the commit and config a committed report came from
    return out


def _probe_secrets(cfg: ExperimentConfig, lm, n_train: int, n_test: int, ft_seconds: list[float],
                   n_inputs: int = 32) -> dict:
    """Criterion 2: fine-tune the TinyLM on ``n_train`` public and ``n_test`` private
    organization-like mixtures; per task, read the secret of each private update where the
    task weighs at least :data:`gt_ray.world.PROBE_MIN_WEIGHT` by a linear probe fit on the
    public updates, and by the behaviour of the updated TinyLM on ``n_inputs`` public inputs."""
    names = cfg.tasks.names
    inputs = {name: [tasks.sample_input(tasks.TASKS[name], "public", random.Random(f"probe-inputs|{name}|{i}"))
                     for i in range(n_inputs)] for name in names}
    rows = {"train": [], "test": []}
    for split, part, n in (("public", "train", n_train), ("private_train", "test", n_test)):
        for i in range(n):
            spec = tasks.draw_dataset_spec(random.Random(f"report-probe|{cfg.seed}|{part}|{i}"), split, names,
                                           cfg.finetune.n_examples, cfg.tasks.dirichlet_alpha, secret_per_task=True)
            t = time.time()
            finetune(lm, tasks.generate_dataset(spec), cfg.finetune, seed=spec.seed)
            ft_seconds.append(time.time() - t)
            update = (read_lora(lm.model, lm.layout) - lm.init).reshape(-1)  # (n_layers * d_layer,)
            read = {name: world.behavioural_secret(lm.model, lm.tokenizer, name, inputs[name])
                    for name in names if part == "test" and spec.mixture[name] >= world.PROBE_MIN_WEIGHT}
            rows[part].append((spec, update, read))
            if (i + 1) % 20 == 0 or i + 1 == n:
                kv(stage="report", probe=part, done=f"{i + 1}/{n}")
    per_task = {}
    for name in names:
        train = [(s, u) for s, u, _ in rows["train"] if s.mixture[name] >= world.PROBE_MIN_WEIGHT]
        test = [(s, u, r) for s, u, r in rows["test"] if s.mixture[name] >= world.PROBE_MIN_WEIGHT]
        linear, lam = float("nan"), None
        if len(train) >= 2 and test:
            # fit on behaviour classes: secrets that act alike are one class (world.same_secret)
            labels = [tasks.canonical_secret(name, s.secrets[name]) for s, _ in train]
            pred, lam = world.linear_probe(torch.stack([u for _, u in train]), labels, torch.stack([u for _, u, _ in test]))
            linear = _mean([float(world.same_secret(name, p, s.secrets[name])) for p, (s, _, _) in zip(pred.tolist(), test)])
        behavioural = (_mean([float(world.same_secret(name, r[name], s.secrets[name])) for s, _, r in test])
                       if test else float("nan"))
        per_task[name] = {"linear": linear, "behavioural": behavioural, "n_train": len(train), "n_test": len(test),
                          "ridge_lambda": lam}
        kv(stage="report", probe=name, linear=round(linear, 3), behavioural=round(behavioural, 3), n_test=len(test))
    return {"n_train": n_train, "n_test": n_test, "n_inputs": n_inputs, "tasks": per_task}


def format_report(rep: dict) -> str:
    """The report as markdown: the models, then per task (left out when the report has no
    single-task datasets: ``--n-datasets 0``), the mixtures and the world criteria."""
    lines = ["| model | params | LoRA layout | weights sha256 | how it was made |", "|---|---|---|---|---|"]
    for side in ("tiny", "llm"):  # the JSON is written with sorted keys: llm would come first
        m = rep["models"][side]
        if m.get("built") == "derived":
            d = m["derived"]
            took = (f"layers {d['keep_layers']} of the LLM's {d['teacher_layers']}, healed {d['heal']['steps']} steps in "
                    f"{m['pretrain_seconds']} s (distillation KL {d['kd_loss_before']:.3f} -> {d['kd_loss_after']:.3f})")
        elif m["pretrain_seconds"] is None:
            took = "- (pretrained elsewhere)"
        else:
            took = f"pretrained {m['pretrain_seconds']} s"
        sha = m["weights_sha256"][:12] if m.get("weights_sha256") else "-"  # reports before it had none
        lines.append(f"| {SIDE_NAMES[side]} | {m['params']:,} | {m['layout'][0]} x {m['layout'][1]} | {sha} | {took} |")
    if rep["tasks"]:
        lines += ["", "| task | TinyLM k shown | TinyLM k hidden | TinyLM ft | LLM k shown | LLM k hidden | LLM ft |",
                  "|---|---|---|---|---|---|---|"]
    for name, row in rep["tasks"].items():
        t, l = row["tiny"], row["llm"]
        lines.append(f"| {name} | {t['k_shown']:.3f} | {t['hidden_before']:.3f} | {t['hidden_after_ft']:.3f} | "
                     f"{l['k_shown']:.3f} | {l['hidden_before']:.3f} | {l['hidden_after_ft']:.3f} |")
    m = rep.get("mixtures")
    if m:
        lines += ["", f"On {m['n']} organization-like mixtures: TinyLM ft {m['tiny_ft']:.3f}, LLM ft {m['llm_ft']:.3f} "
                      f"(gap {m['gap']:.3f}; LLM ft lowest {m['llm_ft_min']:.3f}, below 0.5 on {m['llm_ft_below_0.5']})"]
    if "criteria" in rep:
        seeds = {side: m.get("pretrain_seed") for side, m in rep["models"].items()}
        lines += ["", f"World criteria (docs/world.md; pretrain seeds TinyLM {seeds['tiny']}, LLM {seeds['llm']}; "
                      "criterion 5 compares reports of several seeds):", world.format_criteria(rep["criteria"])]
    return "\n".join(lines)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main(argv=None) -> None:
    p = base_parser("Prepare the model pair and its card")
    p.add_argument("action", nargs="?", default="prepare", choices=["prepare", "report"])
    p.add_argument("--tasks", nargs="+", choices=sorted(tasks.TASKS), default=None,
                   help="report: tasks to report (default: the config's)")
    p.add_argument("--n-datasets", type=int, default=3, help="report: single-task datasets per task (default 3; 0 skips)")
    p.add_argument("--n-mixtures", type=int, default=10,
                   help="report: organization-like mixtures fine-tuned on both models (default 10; 0 skips)")
    p.add_argument("--n-test", type=int, default=300, help="report: test examples per dataset (default 300)")
    p.add_argument("--n-probe-train", type=int, default=0,
                   help="report: public TinyLM fine-tunes the secret probes are fit on (default 0)")
    p.add_argument("--n-probe-test", type=int, default=0,
                   help="report: private TinyLM fine-tunes the secret probes are scored on (default 0: no probes)")
    p.add_argument("--pretrain-seeds", type=int, nargs=2, metavar=("TINY", "LLM"), default=None,
                   help="pretrain the pair from these seeds instead of the config's (a second world for criterion 5); "
                        "its card goes to {work_dir}/pretrain-seeds-TINY-LLM")
    p.add_argument("--serial", action="store_true",
                   help="prepare: pretrain one model after the other in this process (default: both at once, "
                        "one process each)")
    p.add_argument("--out", default=None, help=f"report: JSON path (default {{work_dir}}/{REPORT_FILE})")
    args = p.parse_args(argv)
    for flag in ("n_datasets", "n_mixtures", "n_probe_train", "n_probe_test"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.n_test < 1:
        raise UserError(f"--n-test must be >= 1, got {args.n_test}")
    if args.n_probe_test and args.n_probe_train < 2:
        raise UserError(f"--n-probe-test needs --n-probe-train >= 2, got {args.n_probe_train}")
    cfg = load_config(args.config)
    if args.pretrain_seeds is not None:
        cfg = with_pretrain_seeds(cfg, *args.pretrain_seeds)
    card = load_or_prepare_card(cfg) if args.action == "report" else prepare(cfg, concurrent=not args.serial)
    if args.action == "report":
        rep = report(cfg, card, n_datasets=args.n_datasets, n_test=args.n_test, task_names=args.tasks,
                     n_mixtures=args.n_mixtures, n_probe_train=args.n_probe_train, n_probe_test=args.n_probe_test)
        rep["command"] = " ".join(["gt-ray", "pair", *(sys.argv[1:] if argv is None else argv)])
        write_json(Path(args.out) if args.out else work_dir(cfg) / REPORT_FILE, rep)
        print(format_report(rep))


def with_pretrain_seeds(cfg: ExperimentConfig, tiny_seed: int, llm_seed: int) -> ExperimentConfig:
    """``cfg`` with both models pretrained from other seeds, in a work directory of their own.

    Raises:
        UserError: if a side of the pair is not pretrained by gt-ray (an ``arch`` spec).
    """
    for side in ("tiny", "llm"):
        if getattr(cfg.pair, side).arch is None:
            raise UserError(f"--pretrain-seeds: pair.{side} is not built from an arch, so it has no pretraining seed")
    pair = replace(cfg.pair, tiny=replace(cfg.pair.tiny, pretrain=replace(cfg.pair.tiny.pretrain, seed=tiny_seed)),
                   llm=replace(cfg.pair.llm, pretrain=replace(cfg.pair.llm.pretrain, seed=llm_seed)))
    return replace(cfg, pair=pair, work_dir=f"{cfg.work_dir.rstrip('/')}/pretrain-seeds-{tiny_seed}-{llm_seed}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))

"""Prepare the model pair: build and pretrain (or locate) both models, write the pair card.

    gt-ray pair prepare --config configs/tiny.yaml
    gt-ray pair report  --config configs/tiny.yaml   # the README's pair table

Pretraining runs in this process (a few CPU minutes at tiny scale) and is cached on disk
keyed by the model's config hash, so a rerun takes seconds.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gt_ray import storage, tasks
from gt_ray.config import ExperimentConfig
from gt_ray.evaluate import score_model
from gt_ray.finetune import finetune
from gt_ray.models import (BUILD_FILE, COMPLETE_MARKER, PairCard, cached_model_dir, load_card_side, make_pair_card,
                           prepare_model, recipe_of)
from jobs.common import UserError, base_parser, kv, load_config, run_main, work_dir, work_location, write_json

CARD_FILE = "pair_card.json"
REPORT_FILE = "pair_report.json"


def prepare(cfg: ExperimentConfig) -> PairCard:
    """Build or find both models and write ``{work_dir}/pair_card.json``."""
    paths = {}
    for side in ("llm", "tiny"):  # the LLM first: a TinyLM may be derived from it
        spec = getattr(cfg.pair, side)
        built = spec.arch is not None or spec.derive_from is not None
        if built and not (cached_model_dir(spec, cfg.cache_dir, cfg.tasks.names) / COMPLETE_MARKER).exists():
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


def _prepare_model(spec, cfg: ExperimentConfig, side: str, on_step=None) -> Path:
    try:
        return prepare_model(spec, cfg.cache_dir, cfg.tasks.names, on_step)
    except ValueError as e:  # a bad path, a missing registry package, a layer the LLM lacks
        raise UserError(f"pair.{side}: {e}") from None


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


def report(cfg: ExperimentConfig, card: PairCard, n_datasets: int = 3, n_test: int = 300,
           task_names: list[str] | None = None, n_mixtures: int = 0) -> dict:
    """Accuracy of both models per task: k shown (pretraining ability), k hidden before
    and after LoRA fine-tuning on a single-task dataset with a secret k (public split).

    ``task_names`` defaults to the config's tasks; others show what a model could learn
    outside the world it was pretrained on (a built TinyLM knows only the config's).
    ``n_mixtures`` more datasets are drawn as organizations' are (the config's mixture and
    secrets, private split, other seeds than the evaluation's): the conditioning the method
    needs is a TinyLM clearly below the LLM after fine-tuning on these."""
    torch.set_num_threads(cfg.finetune.num_threads)  # 2 OpenMP threads crawl when the cores are shared
    rows = {}
    models = {side: load_card_side(card, side, getattr(cfg.pair, side).dtype) for side in ("tiny", "llm")}
    rng = random.Random(cfg.seed)
    t0 = time.time()
    for name in (task_names or cfg.tasks.names) if n_datasets > 0 else []:
        row = {}
        for side, lm in models.items():
            shown, before, after = [], [], []
            for _ in range(n_datasets):
                spec = tasks.DatasetSpec("public", rng.randrange(tasks.N_PARAMS), {name: 1.0}, cfg.finetune.n_examples, rng.randrange(2**31))
                test_spec = tasks.DatasetSpec("public", spec.secret_k, {name: 1.0}, n_test, spec.seed + 1)
                lm.reset()
                shown.append(score_model(lm.model, lm.tokenizer, tasks.generate_dataset(test_spec, show_k=True)).accuracy)
                test = tasks.generate_dataset(test_spec)
                before.append(score_model(lm.model, lm.tokenizer, test).accuracy)
                finetune(lm, tasks.generate_dataset(spec), cfg.finetune, seed=spec.seed)
                after.append(score_model(lm.model, lm.tokenizer, test).accuracy)
            row[side] = {"k_shown": _mean(shown), "hidden_before": _mean(before), "hidden_after_ft": _mean(after)}
            kv(stage="report", task=name, model=side, **{k: round(v, 3) for k, v in row[side].items()})
        rows[name] = row
    mixtures = []
    for i in range(n_mixtures):
        spec = tasks.draw_dataset_spec(random.Random(f"report-mixture|{cfg.seed}|{i}"), "private_train", cfg.tasks.names,
                                       cfg.finetune.n_examples, cfg.tasks.dirichlet_alpha, cfg.tasks.secret_per_task)
        test = tasks.generate_dataset(spec, split="private_test", n=n_test)
        acc = {}
        for side, lm in models.items():
            finetune(lm, tasks.generate_dataset(spec), cfg.finetune, seed=spec.seed)
            acc[side] = score_model(lm.model, lm.tokenizer, test).accuracy
        mixtures.append({"mixture": {t: round(w, 3) for t, w in spec.mixture.items() if w >= tasks.MIN_WEIGHT},
                         "tiny_ft": acc["tiny"], "llm_ft": acc["llm"]})
        kv(stage="report", mixture=f"{i + 1}/{n_mixtures}", tiny_ft=round(acc["tiny"], 3), llm_ft=round(acc["llm"], 3))
    builds = {side: json.loads((Path(getattr(card, side).path) / BUILD_FILE).read_text())
              if (Path(getattr(card, side).path) / BUILD_FILE).is_file() else {} for side in ("tiny", "llm")}
    out = {"card_id": card.card_id, "tasks": rows, "n_datasets_per_task": n_datasets, "n_test": n_test,
           "models": {side: {"params": getattr(card, side).n_params, "layout": [getattr(card, side).n_layers, getattr(card, side).d_layer],
                             "built": "derived" if "derived_from" in builds[side] else "pretrained" if builds[side] else None,
                             "pretrain_seconds": builds[side].get("seconds"), "pretrain_final_loss": builds[side].get("final_loss"),
                             **({"derived": {k: builds[side][k] for k in ("keep_layers", "heal", "kd_loss_before", "kd_loss_after")}
                                 | {"teacher_layers": builds[side]["derived_from"]["n_layers"]}}
                                if "derived_from" in builds[side] else {})}
                      for side in ("tiny", "llm")},
           "report_seconds": round(time.time() - t0, 1)}
    if mixtures:
        tiny_ft, llm_ft = (_mean([m[k] for m in mixtures]) for k in ("tiny_ft", "llm_ft"))
        out["mixtures"] = {"n": len(mixtures), "tiny_ft": tiny_ft, "llm_ft": llm_ft, "gap": llm_ft - tiny_ft,
                           "llm_ft_min": min(m["llm_ft"] for m in mixtures),
                           "llm_ft_below_0.5": sum(m["llm_ft"] < 0.5 for m in mixtures), "rows": mixtures}
    return out


def format_report(rep: dict) -> str:
    lines = ["| model | params | LoRA layout | how it was made |", "|---|---|---|---|"]
    for side, m in rep["models"].items():
        if m.get("built") == "derived":
            d = m["derived"]
            took = (f"layers {d['keep_layers']} of the LLM's {d['teacher_layers']}, healed {d['heal']['steps']} steps in "
                    f"{m['pretrain_seconds']} s (distillation KL {d['kd_loss_before']:.3f} -> {d['kd_loss_after']:.3f})")
        elif m["pretrain_seconds"] is None:
            took = "- (pretrained elsewhere)"
        else:
            took = f"pretrained {m['pretrain_seconds']} s"
        lines.append(f"| {side} | {m['params']:,} | {m['layout'][0]} x {m['layout'][1]} | {took} |")
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
    p.add_argument("--out", default=None, help=f"report: JSON path (default {{work_dir}}/{REPORT_FILE})")
    args = p.parse_args(argv)
    if args.n_datasets < 0:
        raise UserError(f"--n-datasets must be >= 0, got {args.n_datasets}")
    if args.n_mixtures < 0:
        raise UserError(f"--n-mixtures must be >= 0, got {args.n_mixtures}")
    if args.n_test < 1:
        raise UserError(f"--n-test must be >= 1, got {args.n_test}")
    cfg = load_config(args.config)
    card = load_or_prepare_card(cfg) if args.action == "report" else prepare(cfg)
    if args.action == "report":
        rep = report(cfg, card, n_datasets=args.n_datasets, n_test=args.n_test, task_names=args.tasks, n_mixtures=args.n_mixtures)
        write_json(Path(args.out) if args.out else work_dir(cfg) / REPORT_FILE, rep)
        print(format_report(rep))


if __name__ == "__main__":
    raise SystemExit(run_main(main))

"""Which modules get LoRA, per side: does the fine-tune hold organizations' mixtures?

    .venv/bin/python benchmarks/lora_modules.py [--config configs/tiny.yaml] [--n-mixtures 12]
        [--n-test 200] [--modules q_proj,v_proj all] [--sides tiny llm] [--workers 2]

The world criterion 3 (`gt-ray pair report`, docs/world.md) wants the LLM fine-tune >= 0.95
on organization-like mixtures with none below 0.8, and the TinyLM fine-tune well below it.
With LoRA on q and v only, the LLM fine-tune of some mixtures loses a whole second task.
This bench fine-tunes both models of the config's prepared pair (``gt-ray pair prepare``)
on the pair report's mixtures (the same draws: ``report-mixture|seed|i``, private split,
the config's fine-tune recipe and LoRA rank, alpha and init seeds) once per module set
("all": every linear module of a layer), and scores each on ``n_test`` private test
examples. One process per (module set, side), ``--workers`` at a time, one torch thread
each. Prints a table and writes JSON (default ``benchmarks/results/lora_modules_tiny.json``)
with the git commit and config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gt_ray import tasks  # noqa: E402
from jobs.common import load_config, provenance, work_dir  # noqa: E402
from jobs.prepare_pair import CARD_FILE, report_mixture  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def modules_of(name: str) -> list[str]:
    """``all`` or a comma-separated list of module names."""
    return list(ALL) if name == "all" else [m for m in name.split(",") if m]


def run_side(cfg_path: str, side: str, modules: list[str], n_mixtures: int, n_test: int) -> dict:
    """Fine-tune one side with LoRA on ``modules`` on every mixture; accuracy and seconds each."""
    import torch

    from gt_ray.evaluate import score_model
    from gt_ray.finetune import finetune
    from gt_ray.models import PairCard, load_with_lora

    torch.set_num_threads(1)
    cfg = load_config(cfg_path)
    card = PairCard.load(work_dir(cfg) / CARD_FILE)
    lora = dataclasses.replace(cfg.pair.lora, target_modules=modules, llm_target_modules=None)
    seed = lora.init_seed_tiny if side == "tiny" else lora.init_seed_llm
    lm = load_with_lora(getattr(card, side).path, lora, seed, getattr(cfg.pair, side).dtype)
    accs, secs = [], []
    for spec in (report_mixture(cfg, i) for i in range(n_mixtures)):
        t = time.time()
        finetune(lm, tasks.generate_dataset(spec), cfg.finetune, seed=spec.seed)
        secs.append(time.time() - t)
        accs.append(score_model(lm.model, lm.tokenizer, tasks.generate_dataset(spec, split="private_test", n=n_test)).accuracy)
    return {"side": side, "modules": modules, "update_size": lm.layout.n_layers * lm.layout.d_layer, "accuracy": accs,
            "mean": statistics.mean(accs), "min": min(accs), "finetune_seconds": statistics.mean(secs)}


def table(rows: list[dict]) -> str:
    by = {(tuple(r["modules"]), r["side"]): r for r in rows}
    lines = ["| LoRA modules | TinyLM ft | LLM ft | lowest LLM ft | LLM mixtures < 0.8 | update size (TinyLM / LLM) | "
             "s per fine-tune (TinyLM / LLM) |", "|---|---|---|---|---|---|---|"]
    for mods in dict.fromkeys(tuple(r["modules"]) for r in rows):
        t, l = by.get((mods, "tiny")), by.get((mods, "llm"))  # a side not run shows "-"

        def cell(r: dict | None, key: str, fmt: str) -> str:
            return "-" if r is None else format(r[key], fmt)

        below = "-" if l is None else f"{sum(a < 0.8 for a in l['accuracy'])} of {len(l['accuracy'])}"
        name = "all linear" if mods == ALL else ", ".join(mods)
        lines.append(f"| {name} | {cell(t, 'mean', '.3f')} | {cell(l, 'mean', '.3f')} | {cell(l, 'min', '.3f')} | "
                     f"{below} | {cell(t, 'update_size', ',')} / {cell(l, 'update_size', ',')} | "
                     f"{cell(t, 'finetune_seconds', '.1f')} / {cell(l, 'finetune_seconds', '.1f')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--n-mixtures", type=int, default=12)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--modules", nargs="+", default=["q_proj,v_proj", "all"], help="module sets: 'all' or a,b,c")
    p.add_argument("--sides", nargs="+", choices=["tiny", "llm"], default=["tiny", "llm"], help="which models to fine-tune")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_modules_tiny.json"))
    args = p.parse_args()
    cfg = load_config(args.config)
    from gt_ray.models import PairCard

    path = work_dir(cfg) / CARD_FILE
    if not path.is_file():
        sys.exit(f"no prepared pair at {path}: run `gt-ray pair prepare --config {args.config}` first")
    card = PairCard.load(path)
    jobs = [(args.config, side, modules_of(m), args.n_mixtures, args.n_test) for m in args.modules for side in args.sides]
    t0 = time.time()
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        rows = list(pool.map(run_side, *zip(*jobs)))
    print(table(rows))
    mixtures = [{"mixture": spec.mixture, "secrets": spec.secrets}
                for spec in (report_mixture(cfg, i) for i in range(args.n_mixtures))]
    out = {"card_id": card.card_id, "n_mixtures": args.n_mixtures, "n_test": args.n_test, "mixtures": mixtures, "rows": rows,
           "seconds": round(time.time() - t0, 1),
           "provenance": {**provenance(cfg), "command": " ".join(["benchmarks/lora_modules.py", *sys.argv[1:]])}}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

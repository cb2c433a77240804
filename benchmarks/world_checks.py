"""Quick checks behind world candidates (docs/world.md, "A world whose gap comes from input
length"): can a model of a given size learn the per-character map tasks from pretraining, per
input length; and does a TinyLM LoRA fine-tune learn a hidden k from single-task data.

    # pretrain a Llama from scratch with k shown; exact match per input length
    python benchmarks/world_checks.py pretrain --tasks shift mirror affine spell --steps 1500 --max-input-length 4
    python benchmarks/world_checks.py pretrain --tasks shift --steps 600 --alphabet 10 --lengths 5
    # fine-tune the TinyLM of a prepared pair on 8 single-task datasets (k hidden), per LoRA variant
    python benchmarks/world_checks.py finetune --config configs/world/lengths.yaml
    # both models of a prepared pair on the pair report's mixtures, per LoRA rank and steps
    python benchmarks/world_checks.py mixtures --config configs/world/lengths.yaml --card CARD --mixtures 0 3 7

Prints a table; writes nothing. Single seeds: a screen, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gt_ray import tasks  # noqa: E402
from gt_ray.config import LoraSpec, PretrainConfig, load_yaml  # noqa: E402
from gt_ray.distill import greedy_answers  # noqa: E402
from gt_ray.evaluate import score_model  # noqa: E402
from gt_ray.finetune import finetune  # noqa: E402
from gt_ray.models import PairCard, build_char_tokenizer, load_with_lora, pretrain  # noqa: E402

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_VARIANTS = {"q_proj, v_proj, rank 2": (["q_proj", "v_proj"], 2), "all seven, rank 2": (ALL_MODULES, 2),
                 "q_proj, v_proj, rank 8": (["q_proj", "v_proj"], 8)}


def _swap_tasks(names: list[str], alphabet: int | None, lengths: list[int] | None) -> None:
    """Replace the named map tasks in ``tasks.TASKS`` by versions on the first ``alphabet``
    letters and/or fixed input ``lengths`` (this process only)."""
    for name in names:
        t = tasks.TASKS[name]
        letters = tasks.LETTERS[:alphabet] if alphabet else tasks.LETTERS
        source = tasks.DIGITS if name == "spell" else letters
        sizes = lengths or list(tasks.SPAN_LENGTHS)
        make = (lambda src, ls: lambda rng: "".join(rng.choice(src) for _ in range(rng.choice(ls))))(source, sizes)
        solve = t.solve
        if alphabet and name != "spell":
            f = {"shift": lambda i, k: i + k, "mirror": lambda i, k: len(letters) - 1 - i + k,
                 "affine": lambda i, k: 3 * i + k}[name]
            solve = tasks._char_map(letters, f, target=letters)
        tasks.TASKS[name] = dataclasses.replace(t, make_input=make, solve=solve, lengths=(min(sizes), max(sizes)))


def check_pretrain(args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    _swap_tasks(args.tasks, args.alphabet, args.lengths)
    torch.set_num_threads(1)
    tok = build_char_tokenizer(args.tasks)
    cfg = AutoConfig.for_model("llama", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                               num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=64, tie_word_embeddings=False, vocab_size=len(tok),
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg)
    pc = PretrainConfig(steps=args.steps, lr=args.lr, batch_size=128, warmup_steps=100, seed=args.seed, num_threads=1,
                        max_input_length=args.max_input_length)
    stats = pretrain(model, tok, pc, args.tasks,
                     on_step=lambda s, loss: print(f"step {s} loss {loss:.4f}", flush=True) if s % 300 == 0 else None)
    print(f"final loss {stats['final_loss']:.4f}")
    rng = random.Random(5)
    print("| task | input length | exact match, k shown (n) |\n|---|---|---|")
    for name in args.tasks:
        t = tasks.TASKS[name]
        ex = [tasks.make_example(t, tasks.sample_input(t, "private_test", rng), rng.randrange(tasks.N_PARAMS), True)
              for _ in range(400)]
        answers = greedy_answers(model, tok, [e.prompt for e in ex], max_new_tokens=12)
        for n in sorted({len(e.answer) - 1 for e in ex}):
            sel = [(a, e) for a, e in zip(answers, ex) if len(e.answer) - 1 == n]
            print(f"| {name} | {n} | {sum(a + tasks.EOS == e.answer for a, e in sel) / len(sel):.3f} ({len(sel)}) |")


def check_finetune(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    cfg = load_yaml(args.config)
    card = PairCard.load(Path(cfg.work_dir) / "pair_card.json")
    rng = random.Random(3)
    specs = [tasks.DatasetSpec("private_train", rng.randrange(tasks.N_PARAMS), {name: 1.0}, cfg.finetune.n_examples,
                               rng.randrange(2**31)) for name in cfg.tasks.names for _ in range(2)]
    ft = dataclasses.replace(cfg.finetune, **({"lr": args.lr} if args.lr else {}),
                             **({"steps": args.steps, "snapshot_steps": [args.steps]} if args.steps else {}))
    print("| TinyLM LoRA | task | k | k shown | fine-tuned, k hidden: all | short inputs |\n|---|---|---|---|---|---|")
    for label, (modules, rank) in LORA_VARIANTS.items():
        lm = load_with_lora(card.tiny.path, LoraSpec(rank=rank, alpha=16, target_modules=modules), card.tiny.init_seed)
        for spec in specs:
            test = tasks.generate_dataset(spec, split="private_test", n=300)
            short = [e for e in test if len(e.answer) - 1 == min(tasks.SPAN_LENGTHS)]
            lm.reset()
            shown = score_model(lm.model, lm.tokenizer, tasks.generate_dataset(spec, show_k=True, split="private_test", n=300))
            data = tasks.generate_dataset(spec)
            if args.short_only:
                data = [e for e in data if len(e.answer) - 1 == min(tasks.SPAN_LENGTHS)]
            finetune(lm, data, ft, seed=spec.seed)
            name = next(iter(spec.mixture))
            print(f"| {label} | {name} | {spec.secret_k} | {shown.accuracy:.3f} | "
                  f"{score_model(lm.model, lm.tokenizer, test).accuracy:.3f} | "
                  f"{score_model(lm.model, lm.tokenizer, short).accuracy:.3f} |", flush=True)


def check_mixtures(args: argparse.Namespace) -> None:
    from jobs.prepare_pair import report_mixture

    torch.set_num_threads(1)
    cfg = load_yaml(args.config)
    card = PairCard.load(args.card or Path(cfg.work_dir) / "pair_card.json")
    print("| LoRA rank | steps | mixture | tasks | TinyLM ft | LLM ft |\n|---|---|---|---|---|---|")
    for rank in args.ranks:
        for steps in args.steps:
            ft = dataclasses.replace(cfg.finetune, steps=steps, snapshot_steps=[steps])
            lora = dataclasses.replace(LoraSpec(**card.lora), rank=rank)
            models = {side: load_with_lora(getattr(card, side).path, lora.for_side(side), getattr(card, side).init_seed)
                      for side in ("tiny", "llm")}
            for i in args.mixtures:
                spec = report_mixture(cfg, i)
                test = tasks.generate_dataset(spec, split="private_test", n=300)
                acc = {}
                for side, lm in models.items():
                    lm.reset()
                    finetune(lm, tasks.generate_dataset(spec), ft, seed=spec.seed)
                    acc[side] = score_model(lm.model, lm.tokenizer, test).accuracy
                mix = " ".join(f"{t} {w:.2f}" for t, w in spec.mixture.items() if w >= tasks.MIN_WEIGHT)
                print(f"| {rank} | {steps} | {i + 1} | {mix} | {acc['tiny']:.3f} | {acc['llm']:.3f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pretrain", help="pretrain a Llama on map tasks; exact match per input length")
    a.add_argument("--tasks", nargs="+", default=["shift", "mirror", "affine", "spell"])
    a.add_argument("--steps", type=int, default=1500)
    a.add_argument("--lr", type=float, default=3e-3)
    a.add_argument("--hidden", type=int, default=32)
    a.add_argument("--layers", type=int, default=2)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--max-input-length", type=int, default=None)
    a.add_argument("--alphabet", type=int, default=None, help="letters of the maps (default 16)")
    a.add_argument("--lengths", type=int, nargs="+", default=None, help="input lengths (default 3 8)")
    b = sub.add_parser("finetune", help="TinyLM LoRA variants on single-task datasets of a prepared pair")
    b.add_argument("--config", default="configs/world/lengths.yaml")
    b.add_argument("--lr", type=float, default=None)
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--short-only", action="store_true", help="fine-tune on the short inputs only")
    c = sub.add_parser("mixtures", help="both models of a prepared pair on the report's mixtures, per LoRA rank and steps")
    c.add_argument("--config", default="configs/world/lengths.yaml")
    c.add_argument("--card", default=None, help="pair card (default {work_dir}/pair_card.json)")
    c.add_argument("--mixtures", type=int, nargs="+", default=[0, 1, 2], help="report mixture indices (0-based)")
    c.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    c.add_argument("--steps", type=int, nargs="+", default=[150, 300])
    args = p.parse_args(argv)
    {"pretrain": check_pretrain, "finetune": check_finetune, "mixtures": check_mixtures}[args.cmd](args)


if __name__ == "__main__":
    main()

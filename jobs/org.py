"""``gt-ray org``: what an organization runs on its own machine (no Ray): the private
fine-tune of the card's TinyLM, the upload of its update vector, and the check of a
round's adapter on its own test data.

    gt-ray org finetune --card pair_card.json --data private.jsonl --out vector.safetensors \\
        [--model-path DIR] [--steps N --lr X --batch-size B] \\
        [--dp-epsilon E --dp-delta D --max-grad-norm C] \\
        [--vector-epsilon E --vector-delta D --vector-clip C --vector-mechanism gaussian|laplace \\
         --neighbouring replace|add_remove --ledger ledger.json --eps-budget E --delta-budget D] \\
        [--round R --org-id ORG] [--seed S]
    gt-ray org submit --endpoint https://provider.example --token-file token.txt \\
        --round R --org-id ORG [--idempotency-key K] [--max-attempts 5] vector.safetensors
    gt-ray org evaluate --card pair_card.json --adapter r1-adapter.zip --data test.jsonl \
        [--model-path DIR] [--dtype bfloat16] [--batch-size 8] [--device cuda]

``evaluate`` prints two lines, the LLM alone and the LLM with the adapter (exact-match
accuracy and mean answer-token NLL on the test file): how an organization decides whether
to use the round's update. It needs the card (which LLM, which data format) and nothing
else of the provider's.

``--data`` is a local ``.jsonl``/``.parquet`` file or, at the tiny scale,
``generated:k=3,mix=caesar:0.5/add:0.5[,split=private_train][,n=256][,seed=0]``
(:mod:`gt_ray.org.data`). The library it calls is :mod:`gt_ray.org` (privacy in
:mod:`gt_ray.org.finetune`, the service's HTTP API in :mod:`gt_ray.org.client`); this
module parses flags, shows progress (tqdm) and prints the ``key=value`` result lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from gt_ray.config import DPConfig, FinetuneConfig
from gt_ray.org.client import SubmissionError, submit_vector
from gt_ray.org.data import read_card_recipe
from gt_ray.org.evaluate import evaluate_adapter
from gt_ray.org.finetune import FinetuneError, finetune_org, open_ledger, progress_steps
from gt_ray.privacy import MECHANISM_KINDS, NEIGHBOURING_RELATIONS, VectorMechanism
from gt_ray.wire import load_update

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become one ``error:`` line (exit 2) in main."""

    def error(self, message: str):
        raise ValueError(f"{self.prog}: {message} (see --help)")


def _finite_float(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and (value > 0 or allow_zero and value == 0)):
        raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if allow_zero else '>'} 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _finite_float(text, allow_zero=False)


def _nonneg_float(text: str) -> float:
    return _finite_float(text, allow_zero=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``gt-ray org`` argument parser (``finetune``, ``evaluate`` and ``submit``)."""
    parser = _Parser(prog="gt-ray org", description="An organization's private fine-tune and its upload.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{finetune,evaluate,submit}")

    f = sub.add_parser("finetune", help="fine-tune the card's TinyLM on private data, write the update vector",
                       description="Fine-tune the card's TinyLM on private data and write the update vector.")
    f.add_argument("--card", required=True, metavar="CARD.json", help="the provider's pair card JSON")
    f.add_argument("--data", required=True, metavar="FILE|generated:SPEC", help="private .jsonl/.parquet file, or generated:k=3,mix=caesar:0.5/add:0.5,n=256,seed=7")
    f.add_argument("--out", required=True, metavar="VECTOR.safetensors", help="update vector file to write (.safetensors)")
    f.add_argument("--model-path", metavar="DIR", help="local directory of the card's TinyLM (default: the card's path)")
    f.add_argument("--round", dest="round_id", metavar="R", help="round id (in the metadata; required with --vector-epsilon)")
    f.add_argument("--org-id", metavar="ORG", help="organization id (in the metadata; required with --vector-epsilon)")
    g = f.add_argument_group("fine-tuning (defaults: the card's recipe, else gt_ray.config.FinetuneConfig)")
    g.add_argument("--steps", type=_positive_int, metavar="N")
    g.add_argument("--lr", type=_positive_float, metavar="X")
    g.add_argument("--batch-size", type=_positive_int, metavar="B")
    g.add_argument("--allow-recipe-mismatch", action="store_true",
                   help="use --steps/--lr/--batch-size even where they differ from the card's recipe")
    g.add_argument("--seed", type=int, metavar="S", help="seed of sampling and noise (default: a secret random one; "
                   "under DP it is not written to the vector, keep it private)")
    g = f.add_argument_group("DP-SGD, unit of privacy: one example (defaults: gt_ray.config.DPConfig)")
    g.add_argument("--dp-epsilon", type=_positive_float, metavar="E", help="train with DP-SGD to this epsilon")
    g.add_argument("--dp-delta", type=_positive_float, metavar="D")
    g.add_argument("--max-grad-norm", type=_positive_float, metavar="C", help="per-example clipping norm")
    g = f.add_argument_group("vector mechanism and its budget ledger, unit of privacy: the organization "
                          "(defaults: gt_ray.privacy.VectorMechanism)")
    g.add_argument("--vector-epsilon", type=_positive_float, metavar="E", help="privatize the final update with this epsilon")
    g.add_argument("--vector-delta", type=_nonneg_float, metavar="D", help="delta of the release (0 for laplace)")
    g.add_argument("--vector-clip", type=_positive_float, metavar="C", help="norm bound (L2 for gaussian, L1 for laplace)")
    g.add_argument("--vector-mechanism", choices=MECHANISM_KINDS)
    g.add_argument("--neighbouring", choices=NEIGHBOURING_RELATIONS)
    g.add_argument("--ledger", metavar="LEDGER.json", help="privacy ledger JSON (created if missing); required with --vector-epsilon")
    g.add_argument("--eps-budget", type=_positive_float, metavar="E", help="total epsilon the organization may spend")
    g.add_argument("--delta-budget", type=_nonneg_float, metavar="D", help="total delta (required for gaussian)")
    f.set_defaults(func=_cmd_finetune)

    e = sub.add_parser("evaluate", help="score the LLM with a round's adapter against the LLM alone on your test data",
                       description="Score the card's LLM with a round's adapter against the LLM alone on the "
                                   "organization's own test data: exact-match accuracy and answer NLL, one line each.")
    e.add_argument("--card", required=True, metavar="CARD.json", help="the provider's pair card JSON")
    e.add_argument("--adapter", required=True, metavar="DIR|ZIP", help="the round's adapter: the zip from "
                   "/v1/rounds/R/adapter or its unpacked directory")
    e.add_argument("--data", required=True, metavar="FILE|generated:SPEC", help="private test .jsonl/.parquet file")
    e.add_argument("--model-path", metavar="DIR", help="local directory of the card's LLM (default: the card's path)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights dtype (default float32)")
    e.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="examples per forward pass (default 8)")
    e.add_argument("--device", metavar="DEV", help="torch device (default: cuda when available, else cpu)")
    e.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("submit", help="send an update vector to the provider, with retries",
                       description="Send an update vector to the provider (idempotent, retried).")
    s.add_argument("vector", help="update vector file written by `gt-ray org finetune`")
    s.add_argument("--endpoint", required=True, metavar="URL", help="provider base URL, e.g. https://provider.example")
    t = s.add_mutually_exclusive_group(required=True)
    t.add_argument("--token", metavar="TOKEN", help="bearer token (visible in the process list: prefer --token-file)")
    t.add_argument("--token-file", metavar="F", help="file holding the bearer token")
    s.add_argument("--round", dest="round_id", required=True, metavar="R")
    s.add_argument("--org-id", required=True, metavar="ORG")
    s.add_argument("--idempotency-key", metavar="K", help="default: sha256 of (org id, round, vector file bytes)")
    s.add_argument("--max-attempts", type=_positive_int, default=5, metavar="N", help="requests at most (default 5)")
    s.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS", help="seconds per request (default 30)")
    s.set_defaults(func=_cmd_submit)
    return parser


def _cmd_finetune(args: argparse.Namespace) -> None:
    dp = _dp_config(args)
    vector = _vector_mechanism(args)
    ledger = None
    if vector is not None:
        missing = [flag for flag, v in (("--ledger", args.ledger), ("--eps-budget", args.eps_budget),
                                        ("--round", args.round_id), ("--org-id", args.org_id)) if v is None]
        if args.delta_budget is None and vector.kind == "gaussian":
            missing.append("--delta-budget")
        if missing:
            raise ValueError(f"--vector-epsilon needs {', '.join(missing)}")
        delta_budget = args.delta_budget if args.delta_budget is not None else 0.0
        ledger = open_ledger(args.ledger, args.eps_budget, delta_budget)
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size))
                 if v is not None}
    recipe = read_card_recipe(args.card) or {}
    settings = {**{k: recipe[k] for k in ("steps", "lr", "batch_size", "weight_decay") if k in recipe}, **overrides}
    cfg = FinetuneConfig(**settings, snapshot_steps=progress_steps(settings.get("steps", FinetuneConfig.steps)))
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    if args.seed is not None and (dp is not None or vector is not None):
        logger.warning("--seed fixes the DP noise: whoever learns the seed can remove it; keep it private")

    t0 = time.time()
    bar = tqdm(total=cfg.steps, desc="fine-tune", unit="step", disable=None)

    def on_progress(step: int, total: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        path, meta = finetune_org(args.card, args.data, args.out, model_path=args.model_path, cfg=cfg, dp=dp,
                                  vector=vector, ledger=ledger, org_id=args.org_id, round_id=args.round_id,
                                  seed=seed, on_progress=on_progress,
                                  allow_recipe_mismatch=args.allow_recipe_mismatch)
    finally:
        bar.close()
    update, _ = load_update(path, expected_fingerprint=meta["fingerprint"])  # read back what was written
    lines: list[tuple[str, Any]] = [
        ("path", path), ("card_id", meta["card_id"]), ("fingerprint", meta["fingerprint"]),
        ("org_id", meta["org_id"]), ("round", meta["round_id"]), ("n_examples", meta["n_examples"]),
        ("steps", meta["steps"]), ("update_norm", float(update.norm())), ("seed", seed),
        ("recipe_fingerprint", meta["recipe_fingerprint"]), ("recipe_mismatch", meta["recipe_mismatch"]),
    ]
    sgd = meta["dp_sgd"]
    lines += ([("dp_sgd_epsilon", sgd["epsilon"]), ("dp_sgd_delta", sgd["delta"]),
               ("dp_sgd_noise_multiplier", sgd["noise_multiplier"]), ("dp_sgd_unit", sgd["privacy_unit"])]
              if sgd["dp"] else [("dp_sgd", "off")])
    rep = meta["vector_mechanism"]
    if rep is None:
        lines.append(("vector_mechanism", "off"))
    else:
        spent = ledger.spent(args.org_id)
        lines += [("vector_mechanism", rep["mechanism"]), ("vector_epsilon", rep["epsilon"]),
                  ("vector_delta", rep["delta"]), ("vector_noise_scale", rep["sigma"] or rep["laplace_scale"]),
                  ("vector_clip", rep["clip_norm"]), ("vector_unit", rep["unit"]), ("ledger", ledger.path),
                  ("ledger_spent_epsilon", spent.epsilon), ("ledger_spent_delta", spent.delta),
                  ("ledger_releases", spent.n_releases), ("ledger_eps_budget", ledger.eps_budget),
                  ("ledger_delta_budget", ledger.delta_budget)]
        if spent.gaussian_rdp_epsilon is not None:
            lines.append(("ledger_gaussian_rdp_epsilon", spent.gaussian_rdp_epsilon))
    lines.append(("seconds", round(time.time() - t0, 1)))
    for key, value in lines:
        if value is None:
            continue
        print(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    t0 = time.time()
    out = evaluate_adapter(args.card, args.adapter, args.data, model_path=args.model_path, dtype=args.dtype,
                           batch_size=args.batch_size, device=args.device)
    for name in ("llm", "llm+adapter"):
        s = out[name]
        print(f"model={name} accuracy={s.accuracy:.4f} answer_nll={s.nll:.4f} n_examples={s.n}")
    logger.info("card %s, %.1f s", out["card_id"], time.time() - t0)


def _dp_config(args: argparse.Namespace) -> DPConfig | None:
    if args.dp_epsilon is None:
        stray = [flag for flag, v in (("--dp-delta", args.dp_delta), ("--max-grad-norm", args.max_grad_norm))
                 if v is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} given without --dp-epsilon")
        return None
    extra = {k: v for k, v in (("delta", args.dp_delta), ("max_grad_norm", args.max_grad_norm)) if v is not None}
    return DPConfig(enabled=True, target_epsilon=args.dp_epsilon, **extra)


def _vector_mechanism(args: argparse.Namespace) -> VectorMechanism | None:
    flags = (("--vector-delta", args.vector_delta), ("--vector-clip", args.vector_clip),
             ("--vector-mechanism", args.vector_mechanism), ("--neighbouring", args.neighbouring),
             ("--ledger", args.ledger), ("--eps-budget", args.eps_budget), ("--delta-budget", args.delta_budget))
    if args.vector_epsilon is None:
        stray = [flag for flag, v in flags if v is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} given without --vector-epsilon")
        return None
    kind = args.vector_mechanism or VectorMechanism.kind
    kwargs: dict[str, Any] = {"kind": kind, "epsilon": args.vector_epsilon}
    if args.vector_delta is not None:
        kwargs["delta"] = args.vector_delta
    elif kind == "laplace":
        kwargs["delta"] = 0.0  # pure epsilon-DP; VectorMechanism's default delta is the gaussian one
    if args.vector_clip is not None:
        kwargs["clip_norm"] = args.vector_clip
    if args.neighbouring is not None:
        kwargs["neighbouring"] = args.neighbouring
    return VectorMechanism(**kwargs)


def _cmd_submit(args: argparse.Namespace) -> None:
    if args.token_file is not None:
        token_path = Path(args.token_file).expanduser()
        if not token_path.is_file():
            raise ValueError(f"token file not found: {token_path}")
        token = token_path.read_text().strip()
    else:
        token = args.token
    receipt = submit_vector(args.endpoint, token, args.round_id, args.org_id, args.vector,
                            idempotency_key=args.idempotency_key, max_attempts=args.max_attempts,
                            timeout_s=args.timeout)
    print(json.dumps(receipt, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> None:
    """``gt-ray org finetune|submit``: user mistakes print one ``error:`` line and exit 2.

    Raises:
        SystemExit: 2 on a ``ValueError``, ``OSError``, :class:`FinetuneError` or
            :class:`SubmissionError`.
    """
    if not logging.getLogger().handlers:  # run directly, not through jobs.cli (which sets it up)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        args.func(args)
    except (ValueError, OSError, FinetuneError, SubmissionError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

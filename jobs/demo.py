"""The main job: the whole Grad-Transformer pipeline at the configured scale.

    gt-ray demo                      # configs/tiny.yaml on an embedded local Ray cluster
    gt-ray demo --config configs/ci.yaml

Stages: prepare the pair (pretraining on the first run) -> shadow corpus on Ray Train ->
Ray Tune sweep -> translator training on Ray Train -> held-out translator evaluation ->
the Serve app (``gt-ray serve``) -> simulated organizations fine-tune locally and submit
over HTTP, the service aggregates the round and exports a PEFT adapter -> evaluation
table (the generated updates come from the service's /v1/translate), ``results.json``
and PNG plots -> the service is shut down.
Every stage is cached in ``work_dir`` (pretrained models in ``cache_dir``), so a rerun
reuses what is done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gt_ray.pipeline import BEST_CONFIG_FILE, translator_dir, translator_dir_from
from gt_ray.translator.checkpoint import load_history
from jobs import build_corpus, eval_translator, evaluate, prepare_pair, service_round, train_translator, tune_translator
from jobs.common import CpuMeter, base_parser, init_ray, kv, load_config, provenance, work_dir


def main(argv=None) -> None:
    p = base_parser("Run the gt-ray pipeline end to end")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    t0 = time.time()
    times = {}

    usage = {}

    def stage(name: str, fn, *a, **kw):
        kv(stage="demo", step=name, status="start")
        with CpuMeter() as meter:
            out = fn(*a, **kw)
        usage[name] = meter.result()
        times[name] = usage[name]["wall_seconds"]
        kv(stage="demo", step=name, status="done", seconds=times[name], cpu_seconds=usage[name]["cpu_seconds"],
           core_utilization=usage[name]["core_utilization"])
        return out

    card = stage("pair", prepare_pair.load_or_prepare_card, cfg)
    ray = init_ray(args.address)
    stage("corpus", build_corpus.build, cfg, card, args.address)
    if not (work_dir(cfg) / BEST_CONFIG_FILE).is_file() and cfg.translator.best_config is None:
        stage("sweep", tune_translator.tune, cfg, args.address)
    stage("translator", train_translator.train, cfg, args.address)
    stage("translator_eval", eval_translator.evaluate, cfg)
    out = work_dir(cfg)
    card_path = out / prepare_pair.CARD_FILE
    tokens = service_round.write_tokens(out / "tokens.json", [f"org-{i}" for i in range(cfg.eval.n_orgs)])
    with service_round.running_service(cfg, translator_dir(cfg), card_path, out / "tokens.json",
                                       ray.get_runtime_context().gcs_address) as url:
        round_info = stage("service_round", service_round.run_round, cfg, card_path, url, tokens, cfg.eval.seeds[0])
        translate = service_round.http_translator(url, tokens["admin"], card)
        results = stage("eval", evaluate.evaluate, cfg, translate)
    results["service_round"] = round_info
    results["stage_seconds"] = times
    results["stage_usage"] = usage  # wall and CPU seconds (driver + Ray workers), core utilization
    results["total_seconds"] = round(time.time() - t0, 1)
    results["provenance"] = provenance(cfg)
    (out / evaluate.RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    write_plots(out, results)
    kv(stage="demo", status="done", seconds=results["total_seconds"], results=out / evaluate.RESULTS_FILE)


def write_plots(out: Path, results: dict) -> None:
    """results.png (:func:`jobs.evaluate.write_plot`) and training_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluate.write_plot(out, results)
    hist = load_history(translator_dir_from(out))
    if hist is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([h["epoch"] for h in hist], [h["train_loss"] for h in hist], label="train (the objective)")
        ax.plot([h["epoch"] for h in hist], [h["val_loss"] for h in hist], label="validation (chooses the epoch)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("answer NLL (+ weighted MSE) or MSE")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=120)
        plt.close(fig)

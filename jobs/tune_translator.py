"""Search the translator's hyperparameters with Ray Tune (ASHA early stopping, or none).

    gt-ray translator tune --config configs/tiny.yaml

Learning rate (log scale), width, depth, dropout and batch size; trials are named by the
hash of their config (so a run can be restored). Each trial reserves ``sweep.cpus_per_trial``
CPUs and ``sweep.gpus_per_trial`` GPUs (a fraction shares a GPU) and trains on its GPU when it
has one; ``sweep.max_concurrent_trials`` run at once, whatever the cluster holds at start
(an autoscaling cluster grows to fit them). The best config goes to
``{work_dir}/translator_best.yaml`` and Ray's results to ``{work_dir}/ray_results``
(``work_dir`` may be a URI such as ``s3://bucket/run``), which ``gt-ray translator train`` reads.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import threading
import time

import torch
import yaml

from gt_ray import storage
from gt_ray.config import ExperimentConfig
from gt_ray.yaml_io import config_hash, from_dict
from gt_ray.corpus import Corpus
from gt_ray.pipeline import BEST_CONFIG_FILE, features_cache_dir, fit, load_split, resolve_settings
from gt_ray.translator.config import SweepConfig, TrainConfig, TranslatorConfig
from jobs.common import UserError, init_ray, kv, ray_storage, work_location

SEARCH_KEYS = ("lr", "d_model", "num_layers", "dropout", "batch_size")


def trial_name(trial) -> str:
    return "trial-" + config_hash({k: trial.config[k] for k in SEARCH_KEYS}, n=10)


def trial_resources(sw: SweepConfig) -> dict[str, float]:
    """What one trial reserves, for ``tune.with_resources``."""
    return {"cpu": sw.cpus_per_trial, **({"gpu": sw.gpus_per_trial} if sw.gpus_per_trial else {})}


def trial_device(sw: SweepConfig) -> torch.device:
    """The trial's device: Ray shows a trial only its own GPUs (CUDA_VISIBLE_DEVICES), so
    ``cuda`` is the trial's GPU; a trial without GPUs trains on the CPU.

    Raises:
        RuntimeError: if the trial reserved a GPU but torch sees none (a CPU-only torch).
    """
    if not sw.gpus_per_trial:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"sweep.gpus_per_trial={sw.gpus_per_trial} but torch sees no GPU in this trial")
    return torch.device("cuda")


TRIAL_EXIT_JOIN_S = 30.0


def join_this_thread_at_exit() -> None:
    """Make the process wait, at exit, for the calling (trial) thread to finish.

    Tune stops a function trial by raising SystemExit in its thread (in ``tune.report``) and
    lets the actor exit without waiting for that thread; the thread then frees the trial's
    tensors and corpus while the interpreter finalizes, and a free that releases the GIL
    (a torch tensor, a pyarrow Dataset) makes the process abort (SIGABRT and a native stack
    in the user's log after every stopped trial; apache/arrow#45017). ``atexit`` runs before
    finalization starts, so joining the thread there lets it finish first (at most
    ``TRIAL_EXIT_JOIN_S``). Nothing is registered from the main thread.
    """
    thread = threading.current_thread()
    if thread is not threading.main_thread():
        atexit.register(thread.join, TRIAL_EXIT_JOIN_S)


def tune_trial(config: dict, experiment: dict, corpus_dir: str, base_model: dict, base_train: dict) -> None:
    """One Tune trial: train a translator with the trial's hyperparameters, report val_loss
    per epoch: the training loop's selection criterion on the validation subsets (with
    ``translator.train.select_on: accuracy``, one minus exact-match accuracy with the decoded
    update, the answer NLL breaking ties; with ``nll``, the answer NLL)."""
    from ray import tune

    join_this_thread_at_exit()
    cfg: ExperimentConfig = from_dict(ExperimentConfig, experiment)
    torch.set_num_threads(max(1, int(cfg.sweep.cpus_per_trial)))
    corpus = Corpus(corpus_dir, verify=False)
    tr, va, train_ids, val_ids = load_split(cfg, corpus)
    model = {**base_model, "d_model": config["d_model"], "num_layers": config["num_layers"], "dropout": config["dropout"]}
    if model["d_model"] % model["num_heads"]:
        model["num_heads"] = math.gcd(model["d_model"], model["num_heads"])
    model_cfg = TranslatorConfig.from_dict(model)
    train_cfg = TrainConfig.from_dict({**base_train, "lr": config["lr"], "batch_size": config["batch_size"],
                                       "max_epochs": cfg.sweep.max_epochs})

    def on_epoch(epoch: int, train_loss: float, val_loss: float) -> bool:
        tune.report({"val_loss": val_loss if math.isfinite(val_loss) else 1e9, "train_loss": train_loss, "epoch": epoch})
        return False

    fit(tr, va, train_ids, val_ids, corpus, model_cfg, train_cfg, features_cache=features_cache_dir(cfg),
        on_epoch=on_epoch, device=trial_device(cfg.sweep))


def search_space(sw: SweepConfig) -> dict:
    """The trials' search space (import after `init_ray`: it imports ray.tune)."""
    from ray import tune as rtune

    return {"lr": rtune.loguniform(sw.lr[0], sw.lr[1]), "d_model": rtune.choice(sw.d_model),
            "num_layers": rtune.choice(sw.num_layers), "dropout": rtune.choice(sw.dropout),
            "batch_size": rtune.choice(sw.batch_size)}


def scheduler(sw: SweepConfig):
    """ASHA early stopping, or none (``sweep.scheduler: fifo``: every trial to ``max_epochs``);
    import after `init_ray`."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sw.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(max_t=sw.max_epochs, grace_period=sw.grace_period)


def best_val_loss(result) -> float:
    """A trial's lowest validation loss over its epochs: what ``get_best_result(scope="all")``
    chooses by (``result.metrics`` holds its last epoch's)."""
    df = result.metrics_dataframe
    if df is not None and "val_loss" in df and len(df):
        return float(df["val_loss"].min())
    return float((result.metrics or {}).get("val_loss", float("nan")))


def search_algorithm(sw: SweepConfig):
    """Random search seeded by ``sweep.seed``: the same config draws the same trials."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sw.seed)


def tune(cfg: ExperimentConfig, address: str | None = None) -> str:
    """Run the sweep and write the best config YAML."""
    try:
        corpus = Corpus(cfg.corpus_dir)
        model_cfg, train_cfg, _ = resolve_settings(cfg, corpus)
    except ValueError as e:
        raise UserError(str(e)) from None
    storage_path, storage_fs = ray_storage(work_location(cfg, "ray_results"))
    init_ray(address)  # before any other ray import: it fixes the local cluster's environment
    from ray import tune as rtune

    sw = cfg.sweep
    space = search_space(sw)
    trainable = rtune.with_resources(
        rtune.with_parameters(tune_trial, experiment=dataclasses.asdict(cfg), corpus_dir=storage.absolute(cfg.corpus_dir),
                              base_model=model_cfg.to_dict(), base_train=train_cfg.to_dict()),
        trial_resources(sw))
    name = "sweep-" + config_hash({"sweep": dataclasses.asdict(sw), "card": corpus.card_id, "n": len(corpus.subset_ids)}, n=10)
    tuner = rtune.Tuner(
        trainable, param_space=space,
        tune_config=rtune.TuneConfig(metric="val_loss", mode="min", num_samples=sw.num_samples,
                                     max_concurrent_trials=sw.max_concurrent_trials, trial_name_creator=trial_name,
                                     trial_dirname_creator=trial_name,
                                     scheduler=scheduler(sw),
                                     search_alg=search_algorithm(sw)),
        run_config=rtune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs, verbose=1),
    )
    t0 = time.time()
    results = tuner.fit()
    best = results.get_best_result(metric="val_loss", mode="min", scope="all")
    c = best.config
    out = work_location(cfg, BEST_CONFIG_FILE)
    best_doc = {"model": {"d_model": c["d_model"], "num_layers": c["num_layers"], "dropout": c["dropout"]},
                "train": {"lr": float(c["lr"]), "batch_size": c["batch_size"]}}
    header = (f"# Written by `gt-ray translator tune` ({name}); read by `gt-ray translator train`.\n"
              f"# best val_loss={best_val_loss(best):.5f} (its best epoch) over {len(results)} trials\n")
    storage.write_text(out, header + yaml.safe_dump(best_doc, sort_keys=True))
    rows = sorted(((best_val_loss(r), len(r.metrics_dataframe) if r.metrics_dataframe is not None else 0, r.config)
                   for r in results if r.metrics), key=lambda row: row[:2])
    for loss, epochs, conf in rows:  # what the choice compares: each trial's best epoch (scope="all")
        kv(stage="sweep", val_loss=loss, epochs=epochs, **{k: conf[k] for k in SEARCH_KEYS})
    kv(stage="sweep", status="done", trials=len(results), seconds=round(time.time() - t0, 1), best=out)
    return out

"""Train the Grad-Transformer on the shadow corpus with Ray Train (data parallel).

    gt-ray translator train --config configs/tiny.yaml [--address ...]

Train / validation / test split by shadow subset (a subset is on one side only; test is
never used here), early stopping on the validation subsets' answer NLL of the LLM with the
decoded update (the LLM is loaded on the worker), checkpoint = safetensors + JSON with the pair card's
fingerprints and the normalization statistics, in ``{work_dir}/translator``. The sweep's
best config (``{work_dir}/translator_best.yaml``, from ``gt-ray translator tune``) overrides
the config's model/train values when it exists. A rerun with an unchanged corpus and
settings reuses the checkpoint. With several ``translator.seeds``, their runs start at once
as far as the free CPUs hold them (``--serial``: one after another).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gt_ray import storage
from gt_ray.config import ExperimentConfig
from gt_ray.yaml_io import config_hash, from_dict
from gt_ray.corpus import Corpus
from gt_ray.pipeline import features_cache_dir, fit, load_split, resolve_settings, translator_dir, translator_seeds
from gt_ray.translator.checkpoint import read_metadata, save_translator
from gt_ray.translator.config import TrainConfig, TranslatorConfig
from jobs.common import UserError, base_parser, init_ray, kv, load_config, ray_storage, work_location


# ----------------------------------------------------------------------------- per worker

def translator_worker(config: dict) -> None:
    """Ray Train worker: one data-parallel replica; rank 0 writes the checkpoint."""
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(1)
    cfg: ExperimentConfig = from_dict(ExperimentConfig, config["experiment"])
    corpus = Corpus(config["corpus_dir"], verify=False)
    model_cfg = TranslatorConfig.from_dict(config["model"])
    train_cfg = TrainConfig.from_dict(config["train"])
    tr, va, train_ids, val_ids = load_split(cfg, corpus)
    t0 = time.time()

    def on_epoch(epoch: int, train_loss: float, val_loss: float) -> bool:
        ray.train.report({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if rank == 0:
            print(f"translator epoch={epoch} train_loss={train_loss:.5f} val_loss={val_loss:.5f} "
                  f"seconds={time.time() - t0:.1f}", flush=True)
        return False

    translator, history = fit(
        tr, va, train_ids, val_ids, corpus, model_cfg, train_cfg, features_cache=features_cache_dir(cfg),
        on_epoch=on_epoch, device=ray.train.torch.get_device(), prepare_model=ray.train.torch.prepare_model,
        prepare_train_loader=ray.train.torch.prepare_data_loader)
    if rank == 0:
        # input_vectors: the service refuses inputs whose norm lies far outside what the corpus shows
        save_translator(translator.cpu(), config["out_dir"],  # a path or a URI
                        {"fingerprints": corpus.fingerprints, "card_id": corpus.card_id, "train_subsets": train_ids,
                         "val_subsets": val_ids, "key": config["key"], **config["extra"]},
                        history=history, input_vectors=torch.cat([tr["tiny"], va["tiny"]]))


# ----------------------------------------------------------------------------- driver

def train(cfg: ExperimentConfig, address: str | None = None, force: bool = False, serial: bool = False) -> Path:
    """Train (or reuse) one translator checkpoint per training seed (``translator.seeds``)
    for the current corpus and settings; returns the first (served) seed's directory.

    The seeds still to train start their Ray Train runs at once, as many as the free CPUs
    hold (``translator.num_workers`` each; :func:`concurrent_runs`); each run is seeded by
    its own seed alone, so it trains what it would alone. ``serial`` trains one after another."""
    try:
        corpus = Corpus(cfg.corpus_dir)
        model_cfg, train_cfg, extra = resolve_settings(cfg, corpus)
    except ValueError as e:
        raise UserError(str(e)) from None
    seeds = translator_seeds(cfg)
    todo = []
    for seed in seeds:
        seed_cfg = dataclasses.replace(train_cfg, seed=seed)
        key = checkpoint_key(cfg, corpus, model_cfg, seed_cfg)
        if not force and (read_metadata(translator_dir(cfg, seed)) or {}).get("key") == key:
            kv(stage="translator", status="cached", train_seed=seed, path=translator_dir(cfg, seed))
        else:
            todo.append((seed_cfg, key))
    if todo:
        ray = init_ray(address)  # before any other ray import: it fixes the local cluster's environment
        n = 1 if serial else min(len(todo), concurrent_runs(ray, cfg))

        def run(job: tuple) -> Path:
            seed_cfg, key = job
            return train_seed(cfg, corpus, model_cfg, seed_cfg, key, extra)

        if n == 1:
            for job in todo:
                run(job)
        else:  # each fit() blocks on its own Ray Train controller: one driver thread per run
            kv(stage="translator", status="start", train_seeds=[c.seed for c, _ in todo], at_once=n)
            with ThreadPoolExecutor(max_workers=n) as pool:
                list(pool.map(run, todo))
    return translator_dir(cfg, seeds[0])


def checkpoint_key(cfg: ExperimentConfig, corpus: Corpus, model_cfg, train_cfg) -> str:
    """What a checkpoint was trained from (settings, split, corpus shards): a rerun whose key
    matches reuses it."""
    return config_hash({"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "val_fraction": cfg.translator.val_fraction,
                        "test_fraction": cfg.translator.test_fraction,
                        "seed": cfg.seed, "corpus": {n: s["sha256"] for n, s in corpus.manifest["shards"].items()}})


def concurrent_runs(ray, cfg: ExperimentConfig) -> int:
    """How many translator runs fit at once in the cluster's free CPUs (and GPUs): at least
    one. (A run waiting for resources that another run holds could time out in Ray Train's
    worker-group start instead of waiting.)"""
    free = ray.available_resources()
    n = int(free.get("CPU", 0) // cfg.translator.num_workers)
    if cfg.translator.use_gpu:
        n = min(n, int(free.get("GPU", 0) // cfg.translator.num_workers))
    return max(1, n)


def train_seed(cfg: ExperimentConfig, corpus: Corpus, model_cfg, train_cfg, key: str, extra: dict) -> Path:
    """Train the checkpoint of one training seed (``train_cfg.seed``) as a Ray Train run."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = translator_dir(cfg, train_cfg.seed)
    storage_path, storage_fs = ray_storage(work_location(cfg, "ray_results"))
    t0 = time.time()
    trainer = TorchTrainer(
        translator_worker,
        train_loop_config={"experiment": dataclasses.asdict(cfg), "corpus_dir": storage.absolute(cfg.corpus_dir),
                           "model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "out_dir": storage.absolute(out),
                           "key": key, "extra": extra},
        scaling_config=ScalingConfig(num_workers=cfg.translator.num_workers, use_gpu=cfg.translator.use_gpu),
        run_config=RunConfig(name=f"translator-{key}", storage_path=storage_path, storage_filesystem=storage_fs),
    )
    trainer.fit()
    meta = read_metadata(out)
    kv(stage="translator", status="trained", train_seed=train_cfg.seed, seconds=round(time.time() - t0, 1),
       best_epoch=meta.get("best_epoch"), best_val_loss=meta.get("best_val_loss"), path=out)
    return out


def main(argv=None) -> None:
    p = base_parser("Train the Grad-Transformer (train), search its hyperparameters (tune), or evaluate it (eval)")
    p.add_argument("action", choices=["train", "tune", "eval"])
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--force", action="store_true", help="retrain even if a matching checkpoint exists")
    p.add_argument("--serial", action="store_true",
                   help="train: one seed after another; eval: the test subsets one after another here, without Ray")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.action == "train":
        train(cfg, args.address, args.force, args.serial)
    elif args.action == "tune":
        from jobs.tune_translator import tune

        tune(cfg, args.address)
    else:
        from jobs.eval_translator import evaluate

        evaluate(cfg, serial=args.serial, address=args.address)

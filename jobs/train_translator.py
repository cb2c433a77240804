"""Train the Grad-Transformer on the shadow corpus with Ray Train (data parallel).

    gt-ray translator train --config configs/tiny.yaml [--address ...]

Train / validation / test split by shadow subset (a subset is on one side only; test is
never used here), early stopping on the validation subsets' answer NLL of the LLM with the
decoded update (the LLM is loaded on the worker), checkpoint = safetensors + JSON with the pair card's
fingerprints and the normalization statistics, in ``{work_dir}/translator``. The sweep's
best config (``{work_dir}/translator_best.yaml``, from ``gt-ray translator tune``) overrides
the config's model/train values when it exists. A rerun with an unchanged corpus and
settings reuses the checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from gt_ray import storage
from gt_ray.config import ExperimentConfig, config_hash, from_dict
from gt_ray.corpus import Corpus
from gt_ray.pipeline import fit, load_split, resolve_settings, translator_dir, translator_seeds
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
        tr, va, train_ids, val_ids, corpus, model_cfg, train_cfg, on_epoch=on_epoch,
        device=ray.train.torch.get_device(), prepare_model=ray.train.torch.prepare_model,
        prepare_train_loader=ray.train.torch.prepare_data_loader)
    if rank == 0:
        # input_vectors: the service refuses inputs whose norm lies far outside what the corpus shows
        save_translator(translator.cpu(), config["out_dir"],  # a path or a URI
                        {"fingerprints": corpus.fingerprints, "card_id": corpus.card_id, "train_subsets": train_ids,
                         "val_subsets": val_ids, "key": config["key"], **config["extra"]},
                        history=history, input_vectors=torch.cat([tr["tiny"], va["tiny"]]))


# ----------------------------------------------------------------------------- driver

def train(cfg: ExperimentConfig, address: str | None = None, force: bool = False) -> Path:
    """Train (or reuse) one translator checkpoint per training seed (``translator.seeds``)
    for the current corpus and settings; returns the first (served) seed's directory."""
    try:
        corpus = Corpus(cfg.corpus_dir)
        model_cfg, train_cfg, extra = resolve_settings(cfg, corpus)
    except ValueError as e:
        raise UserError(str(e)) from None
    seeds = translator_seeds(cfg)
    for seed in seeds:
        train_seed(cfg, corpus, model_cfg, dataclasses.replace(train_cfg, seed=seed), extra, address, force)
    return translator_dir(cfg, seeds[0])


def train_seed(cfg: ExperimentConfig, corpus: Corpus, model_cfg, train_cfg, extra: dict, address: str | None,
               force: bool) -> Path:
    """Train (or reuse) the checkpoint of one training seed (``train_cfg.seed``)."""
    key = config_hash({"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "val_fraction": cfg.translator.val_fraction,
                       "test_fraction": cfg.translator.test_fraction,
                       "seed": cfg.seed, "corpus": {n: s["sha256"] for n, s in corpus.manifest["shards"].items()}})
    out = translator_dir(cfg, train_cfg.seed)
    if not force and (read_metadata(out) or {}).get("key") == key:
        kv(stage="translator", status="cached", train_seed=train_cfg.seed, path=out)
        return out
    init_ray(address)  # before any ray import: it fixes the local cluster's environment
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.action == "train":
        train(cfg, args.address, args.force)
    elif args.action == "tune":
        from jobs.tune_translator import tune

        tune(cfg, args.address)
    else:
        from jobs.eval_translator import evaluate

        evaluate(cfg)

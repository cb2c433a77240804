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
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from gt_ray import storage
from gt_ray.config import ExperimentConfig, config_hash, from_dict
from gt_ray.corpus import Corpus, split_by_subset
from gt_ray.wire import write_norm_bound
from gt_ray.translator import CONFIG_FILENAME, TrainConfig, TranslatorConfig, save_translator, train_translator
from jobs.common import UserError, base_parser, init_ray, kv, load_config, ray_storage, work_location, write_json

BEST_CONFIG_FILE = "translator_best.yaml"
HISTORY_FILE = "history.json"


def translator_dir(cfg: ExperimentConfig) -> str | Path:
    """``{work_dir}/translator``: a ``Path`` for a local ``work_dir``, else the URI."""
    location = work_location(cfg, "translator")
    return location if storage.is_uri(location) else Path(location)


def translator_dir_from(work: Path) -> Path:
    return work / "translator"


def load_corpus_and_translator(cfg: ExperimentConfig):
    """The finished corpus and the trained translator checkpoint, checked against each other."""
    from gt_ray.translator import load_translator

    try:
        corpus = Corpus(cfg.corpus_dir)
        return corpus, load_translator(translator_dir(cfg), expected_fingerprints=corpus.fingerprints)
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve_settings(cfg: ExperimentConfig, corpus: Corpus) -> tuple[TranslatorConfig, TrainConfig, dict[str, Any]]:
    """The model and train config: config values, overridden by the sweep's best YAML."""
    model, train = dict(cfg.translator.model), dataclasses.asdict(cfg.translator.train)
    best_path = cfg.translator.best_config or work_location(cfg, BEST_CONFIG_FILE)  # a path or a URI
    source = "config"
    if storage.is_file(best_path):
        best = yaml.safe_load(storage.read_text(best_path)) or {}
        model.update(best.get("model", {}))
        train.update(best.get("train", {}))
        source = str(best_path)
    elif cfg.translator.best_config:
        raise UserError(f"translator.best_config {best_path} does not exist (run `gt-ray translator tune`)")
    (L_t, d_t), (L_l, d_l) = corpus.tiny_shape, corpus.llm_shape
    try:
        model_cfg = TranslatorConfig(d_tiny=d_t, L_tiny=L_t, d_llm=d_l, L_llm=L_l, **model)
        train_cfg = TrainConfig(**train)
    except (TypeError, ValueError) as e:
        raise UserError(f"translator settings from {source}: {e}") from None
    return model_cfg, train_cfg, {"settings_source": source}


def subset_split(cfg: ExperimentConfig, corpus: Corpus) -> tuple[list[int], list[int], list[int]]:
    """Train, validation and test subset ids: the one split every stage and method uses."""
    try:
        return split_by_subset(corpus.subset_ids, cfg.translator.val_fraction, cfg.translator.test_fraction, cfg.seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_split(cfg: ExperimentConfig, corpus: Corpus) -> tuple[dict, dict, list[int], list[int]]:
    """Training and validation rows and their subset ids (the test subsets stay unread)."""
    train_ids, val_ids, _ = subset_split(cfg, corpus)
    return corpus.load(train_ids), corpus.load(val_ids), train_ids, val_ids


def function_objective(corpus: Corpus, train_ids: list[int], val_ids: list[int], train_cfg: TrainConfig,
                       device: str | torch.device = "cpu"):
    """The card's LLM, frozen, with the training and validation subsets' examples."""
    from gt_ray.config import LoraSpec
    from gt_ray.function_loss import shadow_objective
    from gt_ray.models import load_card_side

    card = corpus.card()  # from the manifest: works for a corpus at a URI too
    llm = load_card_side(card, "llm")
    llm.model.to(device)
    lora = LoraSpec(**card.lora)
    return shadow_objective(corpus, llm, lora.alpha / lora.rank, train_ids, val_ids, train_cfg.examples_per_subset)


def fit(tr: dict, va: dict, train_ids: list[int], val_ids: list[int], corpus: Corpus, model_cfg: TranslatorConfig,
        train_cfg: TrainConfig, **kwargs):
    """``train_translator`` on the split, scored by what the update does (validation answer NLL)."""
    device = kwargs.get("device", "cpu")
    objective = function_objective(corpus, train_ids, val_ids, train_cfg, device)
    return train_translator(tr["tiny"], tr["llm"], va["tiny"], va["llm"], train_cfg, model_cfg,
                            train_subsets=tr["subset_id"], val_subsets=va["subset_id"], function=objective, **kwargs)


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
        out = config["out_dir"]  # a path or a URI
        save_translator(translator.cpu(), out, {"fingerprints": corpus.fingerprints, "card_id": corpus.card_id,
                                                "train_subsets": train_ids, "val_subsets": val_ids,
                                                "key": config["key"], **config["extra"]})
        write_json(storage.join(out, HISTORY_FILE), history)
        # the service refuses inputs whose norm lies far outside what the corpus shows
        write_norm_bound(out, torch.cat([tr["tiny"], va["tiny"]]), corpus.fingerprints["tiny"])


# ----------------------------------------------------------------------------- driver

def train(cfg: ExperimentConfig, address: str | None = None, force: bool = False) -> Path:
    """Train (or reuse) the translator checkpoint for the current corpus and settings."""
    try:
        corpus = Corpus(cfg.corpus_dir)
    except ValueError as e:
        raise UserError(str(e)) from None
    model_cfg, train_cfg, extra = resolve_settings(cfg, corpus)
    key = config_hash({"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "val_fraction": cfg.translator.val_fraction,
                       "test_fraction": cfg.translator.test_fraction,
                       "seed": cfg.seed, "corpus": {n: s["sha256"] for n, s in corpus.manifest["shards"].items()}})
    out = translator_dir(cfg)
    meta_path = storage.join(out, CONFIG_FILENAME)
    if not force and storage.is_file(meta_path) and json.loads(storage.read_text(meta_path)).get("metadata", {}).get("key") == key:
        kv(stage="translator", status="cached", path=out)
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
    meta = json.loads(storage.read_text(meta_path))["metadata"]
    kv(stage="translator", status="trained", seconds=round(time.time() - t0, 1), best_epoch=meta.get("best_epoch"),
       best_val_loss=meta.get("best_val_loss"), path=out)
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

"""Build the shadow corpus with Ray Train workers.

    gt-ray corpus build --config configs/tiny.yaml [--address ray://...]
    gt-ray corpus stats --config configs/tiny.yaml

The corpus directory (``corpus.storage_path``, default ``{work_dir}/corpus``) and Ray's
results (``{work_dir}/ray_results``) may be URIs (``s3://``, ``gs://``): see gt_ray.storage.

Each worker takes shadow subsets ``rank, rank + world, ...`` of the plan (the paired ones,
then the TinyLM-only ones: ``corpus.n_tiny_only``), fine-tunes the TinyLM and, for a
paired subset, the LLM from the pair card's LoRA init on each, and writes one Parquet
shard per subset.
Shards appear only complete, so a rerun (or Ray Train's restart after a worker dies)
skips finished subsets. Only the public split is read: see ``gt_ray.corpus.SHADOW_SPLIT``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import torch

from gt_ray import storage
from gt_ray.config import ExperimentConfig
from gt_ray.yaml_io import from_dict
from gt_ray.corpus import Corpus, completed_subsets, corpus_ids, corpus_schema, corpus_stats, subset_config, write_manifest, write_shard
from gt_ray.shadow import finetune_pair, finetune_tiny_only, is_tiny_only, plan_corpus, plan_subsets, shadow_examples
from gt_ray.models import PairCard, load_card_side
from jobs.common import UserError, base_parser, init_ray, kv, load_config, ray_storage, work_location
from jobs.prepare_pair import load_or_prepare_card


# ----------------------------------------------------------------------------- per worker

def corpus_worker(config: dict) -> None:
    """Ray Train worker: fine-tune this rank's share of subsets and write their shards."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg: ExperimentConfig = from_dict(ExperimentConfig, config["experiment"])
    card = PairCard.load(config["card_path"])
    torch.set_num_threads(max(1, int(cfg.corpus.cpus_per_worker)))
    out = config["out_dir"]
    done = completed_subsets(out)
    todo = [s for j, s in enumerate(plan_corpus(cfg)) if j % world == rank and s.subset_id not in done]
    if todo:
        import ray.train.torch

        device = ray.train.torch.get_device()  # a GPU on GPU workers, else the CPU
        tiny = load_card_side(card, "tiny", cfg.pair.tiny.dtype)
        tiny.model.to(device)
        llm = None
        if any(not is_tiny_only(s.subset_id) for s in todo):  # a TinyLM-only share never loads the LLM
            llm = load_card_side(card, "llm", cfg.pair.llm.dtype)
            llm.model.to(device)
        schema = corpus_schema(card)
        t0 = time.time()
        for i, subset in enumerate(todo, 1):
            if is_tiny_only(subset.subset_id):
                rows = finetune_tiny_only(tiny, subset, cfg.finetune, cfg.tasks)
            else:
                rows = finetune_pair(tiny, llm, subset, cfg.finetune, cfg.tasks)
            write_shard(out, subset.subset_id, rows, schema)
            print(f"corpus_worker rank={rank} subset={subset.subset_id} done={i}/{len(todo)} "
                  f"s_per_subset={(time.time() - t0) / i:.2f}", flush=True)
    ray.train.report({"rank": rank, "written": len(todo)})  # a barrier: every rank reports once


# ----------------------------------------------------------------------------- driver

def build(cfg: ExperimentConfig, card: PairCard, address: str | None = None) -> dict:
    """Run the Ray Train job until every subset has a shard, then write the manifest."""
    out = storage.absolute(cfg.corpus_dir)
    check_data_files(cfg)
    try:
        storage.makedirs(out)
    except (ValueError, OSError) as e:
        raise UserError(f"corpus directory {out}: {e}") from None
    card_path = card.save(storage.join(out, "pair_card.json"))
    ids = corpus_ids(cfg.corpus.n_subsets, cfg.corpus.n_tiny_only)
    n = len(ids)
    before = _counts(out, ids)
    if sum(before.values()) < n:
        init_ray(address)  # before any ray import: it fixes the local cluster's environment
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        storage_path, storage_fs = ray_storage(work_location(cfg, "ray_results"))

        resources = {"CPU": cfg.corpus.cpus_per_worker, **({"GPU": 1} if cfg.corpus.use_gpu else {})}
        trainer = TorchTrainer(
            corpus_worker,
            train_loop_config={"experiment": dataclasses.asdict(cfg), "card_path": str(card_path), "out_dir": str(out)},
            scaling_config=ScalingConfig(num_workers=cfg.corpus.num_workers, use_gpu=cfg.corpus.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=f"corpus-{card.card_id}", storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=cfg.corpus.max_failures)),
        )
        stop = threading.Event()
        monitor = threading.Thread(target=_progress, args=(out, ids, before, stop), daemon=True)
        monitor.start()
        t0 = time.time()
        try:
            trainer.fit()
        finally:
            stop.set()
            monitor.join()
        kv(stage="corpus", subsets=n, built=n - sum(before.values()), seconds=round(time.time() - t0, 1),
           **_rates(_counts(out, ids), before, time.time() - t0))
    manifest = write_manifest(out, card, subset_config(cfg), cfg.corpus.n_subsets, cfg.corpus.n_tiny_only)
    kv(stage="corpus", status="complete", subsets=manifest["n_subsets"], tiny_only_subsets=manifest["n_tiny_only_subsets"],
       rows=manifest["n_rows"], tiny_only_rows=manifest["n_tiny_only_rows"], path=out)
    return manifest


def _counts(out: str, ids: list[int]) -> dict[str, int]:
    """Finished subsets of each kind among ``ids``."""
    done = completed_subsets(out) & set(ids)
    tiny = sum(1 for i in done if is_tiny_only(i))
    return {"paired": len(done) - tiny, "tiny_only": tiny}


def _rates(now: dict[str, int], before: dict[str, int], seconds: float) -> dict[str, float]:
    """Subsets per minute of each kind since the start (a worker's time is shared between kinds)."""
    minutes = max(1e-9, seconds / 60)
    return {"paired_per_min": round((now["paired"] - before["paired"]) / minutes, 1),
            "tiny_only_per_min": round((now["tiny_only"] - before["tiny_only"]) / minutes, 1)}


def check_data_files(cfg: ExperimentConfig) -> None:
    """With ``tasks.data_files``, draw the first subset's examples here, so a bad file or
    too few public rows is one error line from the driver, not a worker's traceback."""
    if cfg.tasks.data_files:
        try:
            shadow_examples(plan_subsets(cfg, 1, cfg.corpus.seed)[0], cfg.tasks)
        except ValueError as e:
            raise UserError(str(e)) from None


def _progress(out: str, ids: list[int], before: dict[str, int], stop: threading.Event, every: float = 10.0) -> None:
    t0 = time.time()
    while not stop.wait(every):
        now = _counts(out, ids)
        kv(stage="corpus", done=sum(now.values()), total=len(ids), **now, **_rates(now, before, time.time() - t0))


def load_corpus(cfg: ExperimentConfig) -> Corpus:
    try:
        return Corpus(cfg.corpus_dir)
    except ValueError as e:
        raise UserError(str(e)) from None


def main(argv=None) -> None:
    p = base_parser("Build or inspect the shadow corpus")
    p.add_argument("action", choices=["build", "stats"])
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.action == "build":
        check_data_files(cfg)  # before the pair is prepared (that may take long)
        build(cfg, load_or_prepare_card(cfg), args.address)
    else:
        stats = corpus_stats(load_corpus(cfg))
        for key, value in stats.items():
            print(f"{key}: {json.dumps(value)}")

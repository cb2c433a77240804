"""The corpus job on a local Ray cluster: completes, resumes, survives a killed worker."""

import os
import signal
import threading
import time

import psutil
import pytest

from gt_ray.config import CorpusConfig, ExperimentConfig, FinetuneConfig, PairConfig, TaskConfig
from gt_ray.corpus import Corpus, completed_subsets
from gt_ray.shadow import TINY_ONLY_BASE
from gt_ray.models import make_pair_card
from jobs.build_corpus import build
from tests.conftest import TASK_NAMES, tiny_spec

pytestmark = pytest.mark.ray

FT = FinetuneConfig(lr=3e-3, steps=30, batch_size=8, n_examples=32, snapshot_steps=[20, 30])


def _cfg(tmp_path, n, n_tiny_only=0):
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96))
    return ExperimentConfig(pair=pair, tasks=TaskConfig(names=TASK_NAMES), finetune=FT, work_dir=str(tmp_path),
                            corpus=CorpusConfig(n_subsets=n, num_workers=2, max_failures=3, seed=1,
                                                n_tiny_only=n_tiny_only))


def _train_workers():
    """This test's Ray Train workers: descendants of this process (the local cluster's
    raylet is a child of the driver), so other Ray runs on the machine are left alone."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "RayTrainWorker" in cmd and "run_train_fn" in cmd or cmd.startswith("ray::RayTrainWorker"):
            out.append(p)
    return out


def test_build_survives_a_killed_worker_and_resumes(ray_cluster, tiny_path, gqa_path, tmp_path):
    cfg = _cfg(tmp_path, n=8, n_tiny_only=4)
    card = make_pair_card(cfg.pair, tiny_path, gqa_path)
    out = tmp_path / "corpus"
    errors = []
    runner = threading.Thread(target=lambda: _run(build, cfg, card, errors))
    runner.start()
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and killed is None and runner.is_alive():
        if len(completed_subsets(out)) >= 1:
            workers = _train_workers()
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    runner.join(timeout=600)
    assert not errors, errors
    assert killed is not None, "no Ray Train worker was found to kill"
    corpus = Corpus(out)
    data = corpus.load()
    keys = list(zip(data["subset_id"].tolist(), data["step"].tolist()))
    assert sorted(keys) == [(s, st) for s in range(8) for st in (20, 30)]  # complete, no duplicates
    only = corpus.load(corpus.tiny_only_ids, sides=("tiny",))
    base = TINY_ONLY_BASE
    assert sorted(zip(only["subset_id"].tolist(), only["step"].tolist())) == [
        (s, st) for s in range(base, base + 4) for st in (20, 30)]  # the TinyLM-only kind, on the same workers
    assert corpus.manifest["n_tiny_only_subsets"] == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    # a rerun finds every shard complete and rewrites none
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    build(cfg, card)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")} == mtimes


def _run(fn, cfg, card, errors):
    try:
        fn(cfg, card)
    except Exception as e:  # reported by the test thread
        errors.append(repr(e))

"""What every job shares: config loading, logging, threads, the local Ray cluster."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gt_ray import storage
from gt_ray.config import ExperimentConfig, load_yaml

DEFAULT_CONFIG = "configs/default.yaml"


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file): printed without a traceback."""


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
    return p


def load_config(path: str) -> ExperimentConfig:
    try:
        return load_yaml(path)
    except ValueError as e:
        raise UserError(str(e)) from None


def work_dir(cfg: ExperimentConfig) -> Path:
    """The local work directory, created if missing.

    Raises:
        UserError: if ``work_dir`` is a remote URI: the stages that call this (the demo,
            the pair report, the demo's service round) write local files only; the corpus,
            the sweep, the translator checkpoint, evaluation results and Ray's results use
            :func:`work_location`, which takes a URI.
    """
    if not storage.is_local(cfg.work_dir):
        raise UserError(f"work_dir {cfg.work_dir} is remote, but this stage writes local files only: "
                        "use a local work_dir for it (corpus build, translator tune/train/eval and eval take a URI)")
    p = Path(cfg.work_dir) if not storage.is_uri(cfg.work_dir) else storage.local_path(cfg.work_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p


def work_location(cfg: ExperimentConfig, *names: str) -> str:
    """``{work_dir}/name/...`` as an absolute path or a URI (``work_dir`` may be either)."""
    return storage.join(storage.absolute(cfg.work_dir), *names)


def ray_storage(location: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for a Ray ``RunConfig`` from a path or URI.

    Raises:
        UserError: if the URI's filesystem cannot be set up (unknown scheme, no credentials).
    """
    try:
        return storage.ray_storage(location)
    except ValueError as e:
        raise UserError(str(e)) from None


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def kv(**items: Any) -> None:
    """One ``key=value`` progress line on stdout."""
    print(" ".join(f"{k}={_fmt(v)}" for k, v in items.items()), flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_json(location: str | Path, data: Any) -> str | Path:
    """Write JSON atomically to a path or a URI (:func:`gt_ray.storage.write_text`)."""
    storage.write_text(location, json.dumps(data, indent=2, sort_keys=True, default=str))
    return location


def provenance(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a results file must name to be re-checked: the git commit of the code (and
    whether the work tree had uncommitted changes), the command line and the config.
    ``git_commit`` is None where the code is not a git checkout (e.g. an installed wheel)."""

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None,
            "command": " ".join(["gt-ray" if sys.argv[0].endswith("gt-ray") else sys.argv[0], *sys.argv[1:]]),
            "config": dataclasses.asdict(cfg)}


class CpuMeter:
    """CPU seconds (user + system) of this process and every descendant (a local Ray
    cluster's raylet and workers are descendants of the driver), sampled once a second in
    a thread so that processes which end between two readings still count (up to the last
    second). ``core_utilization = cpu_seconds / (wall_seconds x cores)``.

    Use as ``with CpuMeter() as m: ...`` then ``m.result()``.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.seen: dict[int, float] = {}  # pid -> latest CPU seconds read
        self.start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> None:
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self.seen[p.pid] = max(self.seen.get(p.pid, 0.0), t.user + t.system)
            except psutil.Error:  # ended while we looked
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self) -> "CpuMeter":
        self._read()
        self.start = dict(self.seen)
        self.t0 = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        self.wall = time.time() - self.t0

    def result(self) -> dict[str, float]:
        """``wall_seconds``, ``cpu_seconds`` and ``core_utilization`` of the block."""
        cpu = sum(v - self.start.get(pid, 0.0) for pid, v in self.seen.items())
        cores = os.cpu_count() or 1
        return {"wall_seconds": round(self.wall, 1), "cpu_seconds": round(cpu, 1),
                "core_utilization": round(cpu / max(self.wall * cores, 1e-9), 2)}


def local_ray_env() -> dict[str, str]:
    """Environment for the embedded local cluster: loopback only, no auth, no usage stats.

    Applied by :func:`apply_local_ray_env` before ray is imported (see docs/cluster.md, "Local runs").
    """
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        # Ray starts workers at nice 15; the work is in the workers, so they compete with
        # anything else on the machine as the driver does.
        "RAY_worker_niceness": "0",
    }


def apply_local_ray_env() -> None:
    """Set :func:`local_ray_env` in ``os.environ`` where unset; must precede the ray import."""
    for k, v in local_ray_env().items():
        os.environ.setdefault(k, v)


def init_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None):
    """Connect to ``address`` (a real cluster, or RAY_ADDRESS), or start a local one.

    A local cluster binds to 127.0.0.1 only and gets a modest object store.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None:
        apply_local_ray_env()
    import ray

    if ray.is_initialized():
        return ray
    if address is None:
        # The dashboard process serves the state API, which Ray Train's controller polls.
        ray.init(num_cpus=num_cpus, object_store_memory=512 * 1024 * 1024, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1",
                 _temp_dir=temp_dir, log_to_driver=True)
    else:
        ray.init(address=address)
    return ray


def run_main(fn, argv=None) -> int:
    """Run a job's main, turning user mistakes into one clear line and exit code 2."""
    setup_logging()
    try:
        fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _on_one_thread(fn, shared, *args):
    """``fn(shared, *args)`` with torch on one thread: a task owns one CPU."""
    import torch

    torch.set_num_threads(1)
    return fn(shared, *args)


def task_cpus(ray) -> float:
    """CPUs one task of :func:`map_tasks` reserves: one, or, where less than one CPU is free,
    a share of what is free, so that as many tasks run at once as the cluster has CPUs. (A
    running Serve app may hold most CPUs of a small cluster while its replicas mostly idle:
    the demo's service holds 1.5 of the test cluster's 2 during the evaluation.)"""
    free = ray.available_resources().get("CPU", 0.0)
    return 1.0 if free >= 1 else free / max(1, int(ray.cluster_resources().get("CPU", 1)))


def map_tasks(fn, shared, items: list[tuple], on_result=None, serial: bool = False) -> list:
    """``[fn(shared, *args) for args in items]``, on Ray: one task per item, each with
    :func:`task_cpus` CPUs and torch on one thread, as many at once as the CPUs allow.

    ``shared`` (models, fitted baselines) goes into the object store once. ``fn`` must not
    depend on state that an earlier item leaves behind (each task deserializes its own
    copy of ``shared``): seed every item from its own arguments. ``serial`` (or no free CPU)
    calls ``fn`` here, one item after another, on this process' torch threads.

    Args:
        fn: a module-level function ``fn(shared, *args) -> result``.
        shared: what every item reads.
        items: one argument tuple per item.
        on_result: called as ``on_result(i, result)`` as item ``i`` finishes (on Ray, in
            the order of finishing): progress lines.
        serial: run here, in order (the reference path).

    Returns:
        The results in the order of ``items``.
    """
    cpus = 0.0
    if not serial:
        import ray

        cpus = task_cpus(ray) if ray.is_initialized() else 0.0
    if cpus <= 0:
        out = []
        for i, args in enumerate(items):
            out.append(fn(shared, *args))
            if on_result is not None:
                on_result(i, out[-1])
        return out
    task = ray.remote(_on_one_thread).options(num_cpus=cpus)
    ref = ray.put(shared)
    pending = {task.remote(fn, ref, *args): i for i, args in enumerate(items)}
    results: list = [None] * len(items)
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done)
        results[i] = ray.get(done)
        if on_result is not None:
            on_result(i, results[i])
    return results

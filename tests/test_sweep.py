"""The sweep's resources come from the config: validation, per-trial resources, the device;
its draws come from ``sweep.seed``."""

import subprocess
import sys

import pytest
import torch

from gt_ray.config import ExperimentConfig
from gt_ray.yaml_io import from_dict
from gt_ray.translator.config import SweepConfig
from jobs.common import apply_local_ray_env
from jobs.tune_translator import SEARCH_KEYS, search_algorithm, search_space, trial_device, trial_resources
from tests.conftest import ROOT


def test_sweep_resources_are_validated():
    with pytest.raises(ValueError, match=r"cpus_per_trial must be > 0 \(Ray refuses 0; a GPU trial can take 0.01\), got 0.0"):
        SweepConfig(cpus_per_trial=0.0)
    with pytest.raises(ValueError, match="gpus_per_trial must be >= 0, got -1"):
        SweepConfig(gpus_per_trial=-1)
    with pytest.raises(ValueError, match="sweep: gpus_per_trial above 1 must be a whole number, got 1.5"):
        from_dict(ExperimentConfig, {"pair": {"tiny": {"path": "a"}, "llm": {"path": "b"}},
                                     "sweep": {"gpus_per_trial": 1.5}})
    with pytest.raises(ValueError, match="max_concurrent_trials must be > 0, got 0"):
        SweepConfig(max_concurrent_trials=0)


def test_trial_resources_and_device_follow_the_config():
    assert trial_resources(SweepConfig()) == {"cpu": 1.0}
    assert trial_resources(SweepConfig(cpus_per_trial=2, gpus_per_trial=0.25)) == {"cpu": 2.0, "gpu": 0.25}
    assert trial_resources(SweepConfig(cpus_per_trial=0.01, gpus_per_trial=2)) == {"cpu": 0.01, "gpu": 2.0}
    assert trial_device(SweepConfig()) == torch.device("cpu")
    if torch.cuda.is_available():
        assert trial_device(SweepConfig(gpus_per_trial=0.5)) == torch.device("cuda")
    else:
        with pytest.raises(RuntimeError, match="sweep.gpus_per_trial=0.5 but torch sees no GPU in this trial"):
            trial_device(SweepConfig(gpus_per_trial=0.5))


def test_real_scale_sweeps_run_on_gpus():
    from pathlib import Path

    from gt_ray.config import load_yaml

    for path in sorted((Path(__file__).resolve().parents[1] / "configs/qwen2.5").glob("*.yaml")):
        sw = load_yaml(path).sweep
        assert sw.gpus_per_trial > 0 and trial_resources(sw)["gpu"] == sw.gpus_per_trial, path.name
        assert sw.cpus_per_trial <= 8 * min(1.0, sw.gpus_per_trial), f"{path.name}: a trial must fit its share of a GPU worker"


def _draws(sw: SweepConfig) -> list[tuple]:
    """The trials' configs the search draws for ``sw``, as Tune would start them."""
    alg = search_algorithm(sw)
    alg.add_configurations({"sweep": {"run": lambda config: None, "config": search_space(sw),
                                      "num_samples": sw.num_samples}})
    out = []
    while (trial := alg.next_trial()) is not None:
        out.append(tuple(trial.config[k] for k in SEARCH_KEYS))
    return out


def test_the_search_draws_the_same_trials_for_the_same_seed():
    apply_local_ray_env()  # as init_ray does before ray is imported
    sw = SweepConfig(num_samples=4, lr=[3e-4, 3e-3])
    first = _draws(sw)
    assert len(first) == 4 and len({d[0] for d in first}) == 4
    assert all(3e-4 <= d[0] <= 3e-3 for d in first)
    assert _draws(sw) == first
    assert [d[0] for d in _draws(SweepConfig(num_samples=4, lr=[3e-4, 3e-3], seed=1))] != [d[0] for d in first]


def test_a_trial_thread_is_joined_before_the_process_exits(tmp_path):
    """Tune stops a trial by raising SystemExit in its (daemon) thread and lets the actor
    exit; the process must wait for that thread to finish freeing its objects (freed during
    finalization they abort the process). A daemon thread that registered itself finishes
    its work after the main thread has returned; one that did not is cut off."""
    script = """
import sys, threading, time
from jobs.tune_translator import join_this_thread_at_exit

def trial(path, register):
    if register:
        join_this_thread_at_exit()
    time.sleep(1.0)
    open(path, "w").write("finished")

threading.Thread(target=trial, args=(sys.argv[1], sys.argv[2] == "1"), daemon=True).start()
time.sleep(0.2)
"""
    for register in ("1", "0"):
        out = tmp_path / f"done-{register}"
        subprocess.run([sys.executable, "-c", script, str(out), register], cwd=ROOT, check=True, timeout=120)
        assert out.exists() == (register == "1"), register
    assert (tmp_path / "done-1").read_text() == "finished"


def test_fifo_runs_every_trial_to_max_epochs_where_asha_stops_the_later_ones(ray_cluster, tmp_path):
    """Four trials one at a time, each worse than the first: ASHA keeps the first to reach its
    rung and stops the others there (the order decides); fifo trains all of them fully. A
    trial's loss is its best epoch's, not its last."""
    from ray import tune

    from jobs.tune_translator import best_val_loss, scheduler

    def trainable(config):
        for epoch in range(4):
            tune.report({"val_loss": config["x"] + (0.04, 0.01, 0.02, 0.03)[epoch]})

    def fit(kind: str):
        sw = SweepConfig(num_samples=1, max_epochs=4, grace_period=1, scheduler=kind)
        tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 0.5}), param_space={"x": tune.grid_search([0, 1, 2, 3])},
                           tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler(sw),
                                                       max_concurrent_trials=1),
                           run_config=tune.RunConfig(name=kind, storage_path=str(tmp_path), verbose=0))
        return list(tuner.fit())

    fifo = fit("fifo")
    assert sorted(len(r.metrics_dataframe) for r in fifo) == [4, 4, 4, 4]
    for r in fifo:
        assert r.metrics["val_loss"] == pytest.approx(r.config["x"] + 0.03)  # the last epoch
        assert best_val_loss(r) == pytest.approx(r.config["x"] + 0.01)  # the best one
    asha = sorted(len(r.metrics_dataframe) for r in fit("asha"))
    assert asha[-1] == 4 and asha[0] < 4
    with pytest.raises(ValueError, match="scheduler must be one of asha, fifo, got 'hyperband'"):
        SweepConfig(scheduler="hyperband")

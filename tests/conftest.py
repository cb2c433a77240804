"""Shared fixtures: tiny seeded models built from configs (no download, no pretraining)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from gt_ray.config import LoraSpec, ModelSpec, PretrainConfig
from gt_ray.models import prepare_model

ROOT = Path(__file__).resolve().parents[1]
TASK_NAMES = ["caesar", "index", "add"]


def tiny_spec(hidden=32, layers=2, heads=4, kv_heads=4, ffn=64, steps=2) -> ModelSpec:
    return ModelSpec(arch=dict(model_type="llama", hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                               tie_word_embeddings=False),
                     pretrain=PretrainConfig(steps=steps, warmup_steps=0, batch_size=8, seed=0))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_path(model_cache) -> Path:
    """A 2-layer, 32-wide Llama with the character tokenizer."""
    return prepare_model(tiny_spec(), model_cache, TASK_NAMES)


@pytest.fixture(scope="session")
def gqa_path(model_cache) -> Path:
    """A 3-layer, 48-wide Llama with grouped-query attention: v_proj narrower than q_proj."""
    return prepare_model(tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), model_cache, TASK_NAMES)


@pytest.fixture
def lora() -> LoraSpec:
    return LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on 2 cores: a second thread only adds contention with Ray workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _environment() -> dict[str, str]:
    """The driver's environment as Ray workers inherit it (pytest's per-test variable aside)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


@pytest.fixture(scope="session")
def _shared_ray():
    """The session's local Ray cluster: {"env": the environment it started with, "temp": its temp dir}."""
    state = {"env": None, "temp": None}
    yield state
    _stop_ray(state)


def _stop_ray(state: dict) -> None:
    import ray

    ray.shutdown()
    shutil.rmtree(state["temp"], ignore_errors=True)
    state.update(env=None, temp=None)


@pytest.fixture(scope="module")
def ray_cluster(_shared_ray):
    """One local Ray cluster, loopback only (see docs/cluster.md, "Local runs"), shared by every
    module that asks for it (a start is ~5 s and 1 GB; shutdown ~1.3 s). Workers inherit the
    driver's environment when the cluster starts, so a module that changed ``os.environ`` first
    (tests/test_storage.py's S3 credentials) gets a fresh cluster, as does the next one."""
    import ray

    from jobs.common import init_ray

    state = _shared_ray
    if state["env"] is not None and (state["env"] != _environment() or not ray.is_initialized()):
        _stop_ray(state)
    if state["env"] is None:
        state["temp"] = tempfile.mkdtemp(prefix="gtr-", dir="/tmp")  # short: Ray's unix sockets need it
        init_ray(num_cpus=2, temp_dir=state["temp"])
        state["env"] = _environment()
    yield ray

"""Shadow subsets: what each one teaches, how it is drawn, and the fine-tunes that turn it
into corpus rows.

Two kinds share one corpus (:mod:`gt_ray.corpus`). *Paired* subsets (ids ``0 .. n_subsets-1``)
fine-tune both models: baselines and the translator's MSE term need both updates.
*TinyLM-only* subsets (ids from :data:`TINY_ONLY_BASE`) fine-tune the TinyLM alone: the
translator's function loss needs only the TinyLM update and the subset's spec (the provider
regenerates its examples), at about a fifth of a pair's cost.

Subset ``i`` of a kind depends only on (corpus seed, kind, i), so a corpus grows without
changing earlier subsets. Shadow data comes from the public split only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gt_ray import tasks
from gt_ray.config import ExperimentConfig, FinetuneConfig, TaskConfig
from gt_ray.finetune import finetune
from gt_ray.models import LoadedModel

SHADOW_SPLIT = "public"
"""Shadow subsets come from the public split only; the private splits are the orgs'."""
TINY_ONLY_BASE = 100_000
"""Id of the first TinyLM-only subset (paired subsets are ``0 .. n_subsets-1``): either
kind grows without renumbering the other."""
KINDS = ("paired", "tiny_only")
"""The two kinds of shadow subsets."""


@dataclass(frozen=True)
class ShadowSubset:
    """One shadow subset: its id and what it teaches (a public-split dataset)."""

    subset_id: int
    spec: tasks.DatasetSpec

    def __post_init__(self) -> None:
        if self.spec.split not in tasks.PUBLIC_SPLITS:
            raise ValueError(f"shadow subset {self.subset_id} draws from split {self.spec.split!r}; "
                             f"the shadow corpus may only use {tasks.PUBLIC_SPLITS}")


def is_tiny_only(subset_id: int) -> bool:
    """True for the id of a TinyLM-only subset (see :data:`TINY_ONLY_BASE`)."""
    return subset_id >= TINY_ONLY_BASE


def plan_subsets(cfg: ExperimentConfig, n_subsets: int, seed: int, kind: str = "paired") -> list[ShadowSubset]:
    """Draw ``n_subsets`` shadow subsets from the public split: generated tasks get a secret
    k and a Dirichlet task mixture, data files (``tasks.data_files``) a draw of rows of the
    public file; each gets its own data seed.

    Subset ``i`` depends only on (seed, kind, i), so growing the corpus keeps earlier subsets.

    Args:
        kind: ``paired`` (ids ``0..n-1``) or ``tiny_only`` (ids ``TINY_ONLY_BASE + i``,
            drawn from their own stream: the same distribution, other subsets).
    """
    if kind not in KINDS:
        raise ValueError(f"subset kind must be one of {KINDS}, got {kind!r}")
    base, stream = (0, "shadow") if kind == "paired" else (TINY_ONLY_BASE, "shadow-tiny")
    out = []
    for i in range(n_subsets):
        rng = random.Random(f"{stream}|{seed}|{i}")
        if cfg.tasks.data_files:
            spec = tasks.data_dataset_spec(SHADOW_SPLIT, cfg.finetune.n_examples, rng.randrange(2**31))
        else:
            spec = tasks.draw_dataset_spec(rng, SHADOW_SPLIT, cfg.tasks.names, cfg.finetune.n_examples,
                                           cfg.tasks.dirichlet_alpha, cfg.tasks.secret_per_task)
        out.append(ShadowSubset(base + i, spec))
    return out


def plan_corpus(cfg: ExperimentConfig) -> list[ShadowSubset]:
    """Every subset of ``cfg``'s corpus: the paired ones, then the TinyLM-only ones."""
    return (plan_subsets(cfg, cfg.corpus.n_subsets, cfg.corpus.seed)
            + plan_subsets(cfg, cfg.corpus.n_tiny_only, cfg.corpus.seed, kind="tiny_only"))


def shadow_examples(subset: ShadowSubset, task_cfg: TaskConfig | None = None) -> list[tasks.Example]:
    """The training examples of a shadow subset (public split; generated tasks hide k):
    rows of the public data file when ``task_cfg.data_files`` is set."""
    if subset.spec.split not in tasks.PUBLIC_SPLITS:  # checked again where data is made
        raise ValueError(f"refusing to draw shadow data from split {subset.spec.split!r}")
    return tasks.dataset_examples(subset.spec, task_cfg)


def finetune_pair(tiny: LoadedModel, llm: LoadedModel | None, subset: ShadowSubset, ft: FinetuneConfig,
                  task_cfg: TaskConfig | None = None) -> list[dict[str, Any]]:
    """Fine-tune both models from the card's init on one shadow subset (the TinyLM alone
    when ``llm`` is None: :func:`finetune_tiny_only`, whose rows have ``llm`` null).

    Both see the same examples in the same order (one train seed), each through its own
    tokenizer (and chat template, for data files). Returns one row per snapshot step with
    both update vectors (flattened float32 numpy arrays sharing the snapshots' memory).

    Args:
        task_cfg: the task world (``cfg.tasks``); ``None`` is the generated world.
    """
    examples = shadow_examples(subset, task_cfg)
    train_seed = subset.spec.seed ^ 0x5EED
    res_t = finetune(tiny, examples, ft, seed=train_seed)
    res_l = finetune(llm, examples, ft, seed=train_seed) if llm is not None else None
    rows = []
    for i, st in enumerate(res_t.snapshots):
        sl = res_l.snapshots[i] if res_l is not None else None
        assert sl is None or st.step == sl.step
        rows.append({"subset_id": subset.subset_id, "step": st.step, "secret_k": subset.spec.secret_k,
                     "mixture": json.dumps(subset.spec.mixture, sort_keys=True),
                     "secrets": json.dumps(subset.spec.secrets, sort_keys=True), "data_seed": subset.spec.seed,
                     "train_seed": train_seed, "n_examples": len(examples), "tiny_loss": st.loss,
                     "llm_loss": None if sl is None else sl.loss,
                     "tiny": flat_float32(st.update), "llm": None if sl is None else flat_float32(sl.update)})
    return rows


def finetune_tiny_only(tiny: LoadedModel, subset: ShadowSubset, ft: FinetuneConfig,
                       task_cfg: TaskConfig | None = None) -> list[dict[str, Any]]:
    """Fine-tune the TinyLM alone on a TinyLM-only subset: the rows of :func:`finetune_pair`
    with ``llm`` and ``llm_loss`` null (the same examples, order and train seed the pair
    would have used).

    Raises:
        ValueError: if ``subset`` is not a TinyLM-only subset.
    """
    if not is_tiny_only(subset.subset_id):
        raise ValueError(f"subset {subset.subset_id} is a paired subset: fine-tune both models (finetune_pair)")
    return finetune_pair(tiny, None, subset, ft, task_cfg)


def flat_float32(vector: Any) -> np.ndarray:
    """A vector (tensor, array or list) as a flat float32 numpy array, without a copy when it
    already is one (a contiguous CPU float32 tensor or array)."""
    if isinstance(vector, torch.Tensor):
        vector = vector.detach().to("cpu", torch.float32).contiguous().numpy()
    return np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)

"""Statistics for organization results: paired bootstrap intervals and a per-task split.

A few dozen organizations cannot resolve small differences between methods, so every
comparison is reported with a paired bootstrap interval over organizations, and each
method's accuracy is split by task with a least-squares fit on the organizations' task
weights. Plain numpy; seeds are arguments.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

LEVEL = 0.95
"""Coverage of the bootstrap percentile interval."""


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                     cluster: Sequence | None = None) -> dict:
    """Percentile 95% interval of mean(a - b), resampling organizations with their pairs.

    Row i of ``a`` and ``b`` is one organization scored by two methods. Resampling draws
    organizations with replacement and keeps each one's pair together, so what the two
    methods share about an organization (its difficulty) cancels. Rows with the same
    ``cluster`` id (e.g. one row per translator seed of one organization) are drawn
    together; the statistic is then the mean over the drawn rows.

    Args:
        a: (N,) one method's value per row.
        b: (N,) the other method's value per row.
        n_boot: bootstrap resamples.
        seed: seed of the resampling (same inputs and seed, same interval).
        cluster: (N,) optional hashable ids; rows with one id are resampled as a unit.

    Returns:
        ``{"mean_diff": mean(a - b) over rows, "lo": 2.5th percentile, "hi": 97.5th
        percentile, "n": units resampled (rows, or clusters when given)}``.

    Raises:
        ValueError: on empty input, mismatched lengths, non-finite values or ``n_boot < 1``.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must be 1-D of one length, got shapes {a_arr.shape} and {b_arr.shape}")
    if a_arr.size == 0:
        raise ValueError("no rows to bootstrap")
    if not (np.isfinite(a_arr).all() and np.isfinite(b_arr).all()):
        raise ValueError("a and b must be finite")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    diff = a_arr - b_arr
    if cluster is None:
        codes = np.arange(diff.size)
    else:
        if len(cluster) != diff.size:
            raise ValueError(f"cluster has {len(cluster)} ids for {diff.size} rows")
        _, codes = np.unique(np.asarray([str(c) for c in cluster]), return_inverse=True)
    n_units = int(codes.max()) + 1
    sums = np.bincount(codes, weights=diff, minlength=n_units)  # (U,) summed difference per unit
    sizes = np.bincount(codes, minlength=n_units).astype(np.float64)  # (U,) rows per unit
    draws = np.random.default_rng(seed).integers(0, n_units, size=(n_boot, n_units))  # (n_boot, U)
    stats = sums[draws].sum(1) / sizes[draws].sum(1)  # (n_boot,) mean over the drawn rows
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return {"mean_diff": float(diff.mean()), "lo": float(lo), "hi": float(hi), "n": n_units}


def per_task_accuracy(weights: Sequence[Mapping[str, float]], acc: Sequence[float]) -> dict[str, float]:
    """Least-squares split of organization accuracy by task: acc_org ~= sum_t w_{org,t} a_t.

    An organization's test data mixes tasks with its own weights, so its accuracy is the
    weighted mean of per-task accuracies. Solving for the a_t across organizations (no
    intercept, ``numpy.linalg.lstsq``) estimates each method's accuracy per task. It is an
    estimate, not a measurement: with 24 organizations and five tasks the values are good
    to about +-0.15, can leave [0, 1], and a task with little total weight
    (:func:`task_weight_totals`) is poorly determined.

    Args:
        weights: one mapping task -> weight per organization (its mixture); a task missing
            from a mapping has weight 0. Tasks come out in first-seen order.
        acc: (N,) one accuracy per organization.

    Returns:
        task -> estimated accuracy.

    Raises:
        ValueError: on empty input, mismatched lengths, non-finite values, or weights of
            rank below the number of tasks (the split is not determined, e.g. fewer
            organizations than tasks).
    """
    if len(weights) != len(acc):
        raise ValueError(f"{len(weights)} weight rows for {len(acc)} accuracies")
    if not weights:
        raise ValueError("no organizations to split by task")
    names = list(dict.fromkeys(t for w in weights for t in w))
    w_mat = np.array([[w.get(t, 0.0) for t in names] for w in weights], dtype=np.float64)  # (N, T)
    y = np.asarray(acc, dtype=np.float64)  # (N,)
    if not (np.isfinite(w_mat).all() and np.isfinite(y).all()):
        raise ValueError("weights and accuracies must be finite")
    solution, _, rank, _ = np.linalg.lstsq(w_mat, y, rcond=None)
    if rank < len(names):
        raise ValueError(f"task weights have rank {rank} < {len(names)} tasks: per-task accuracy is not determined")
    return {t: float(v) for t, v in zip(names, solution)}


def task_weight_totals(weights: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each task's weight summed over organizations: how much data pins its per-task estimate.

    Args:
        weights: one mapping task -> weight per organization, as for :func:`per_task_accuracy`.

    Returns:
        task -> total weight, tasks in first-seen order.
    """
    out: dict[str, float] = {}
    for w in weights:
        for t, v in w.items():
            out[t] = out.get(t, 0.0) + float(v)
    return out

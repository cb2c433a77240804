"""Is a generated task world fit to show Grad-Transformer's effect? Its five criteria and
the probes that read a dataset's secrets from TinyLM updates (``docs/world.md``).

A fit world is one where the TinyLM *knows* every secret and *executes* poorly:

1. secret learned: a TinyLM fine-tuned with k hidden reaches at least
   :data:`SECRET_LEARNED_RATIO` of its own accuracy with k shown (single-task datasets);
2. secret readable: a probe fit on training updates reads a task's secret from held-out
   TinyLM updates of mixtures where the task weighs at least :data:`PROBE_MIN_WEIGHT`,
   with accuracy at least :data:`PROBE_ACCURACY` (a linear probe on the standardized
   update, and a behavioural probe that runs the updated TinyLM; either may pass);
3. executes poorly: on organization-like mixtures the TinyLM fine-tune averages at most
   :data:`TINY_FT_MAX`, the LLM fine-tune at least :data:`LLM_FT_MIN` and none below
   :data:`LLM_FT_FLOOR`, a gap of at least :data:`GAP_MIN`;
4. distinct parameters: for every pair k != k' the task's answers differ on at least
   :data:`DISTINCT_MIN` of inputs, so ``DatasetSpec.combination()`` counts what behaves
   differently as different;
5. seed-robust: 1-4 hold for pairs pretrained from other seeds (one report per seed).

This module never imports ray.
"""

from __future__ import annotations

import itertools
import random
from typing import Sequence

import torch

from gt_ray import tasks

SECRET_LEARNED_RATIO = 0.9
PROBE_ACCURACY = 0.8
PROBE_MIN_WEIGHT = 0.2
TINY_FT_MAX = 0.60
LLM_FT_MIN = 0.95
LLM_FT_FLOOR = 0.8
GAP_MIN = 0.35
DISTINCT_MIN = 0.9
RIDGE_LAMBDAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)
"""Ridge penalties the linear probe chooses from by cross-validation on its training rows."""


def distinct_share(task: str, n_inputs: int = 500, seed: int = 0) -> float:
    """The smallest share, over pairs k != k', of public inputs on which ``task``'s answers
    for k and k' differ (1.0: every k is its own map on every input)."""
    t = tasks.TASKS[task]
    rng = random.Random(f"distinct|{task}|{seed}")
    inputs = [tasks.sample_input(t, "public", rng) for _ in range(n_inputs)]
    answers = [[t.solve(x, k) for x in inputs] for k in range(tasks.N_PARAMS)]
    return min(sum(a != b for a, b in zip(answers[k], answers[j])) / n_inputs
               for k, j in itertools.combinations(range(tasks.N_PARAMS), 2))


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Z-score the columns of ``train`` (N, D) and of ``others`` with ``train``'s mean and std."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-8)
    return [(x - mean) / std for x in (train, *others)]


def _ridge_fit(x: torch.Tensor, y_onehot: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge weights (D+1, C) in the dual form (N is small next to D): W = X^T (X X^T + lam I)^-1 Y."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, D+1): a bias column
    gram = x1 @ x1.T + lam * torch.eye(len(x1), dtype=x.dtype)  # (N, N)
    return x1.T @ torch.linalg.solve(gram, y_onehot)  # (D+1, C)


def _ridge_predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w).argmax(1)


def linear_probe(x_train: torch.Tensor, y_train: Sequence[int], x_test: torch.Tensor, n_classes: int = tasks.N_PARAMS,
                 folds: int = 5) -> tuple[torch.Tensor, float]:
    """Fit a ridge classifier (one-hot targets) on standardized flattened updates and predict.

    The penalty is chosen from :data:`RIDGE_LAMBDAS` by ``folds``-fold cross-validated
    accuracy on the training rows only.

    Args:
        x_train: (N, D) training updates, flattened.
        y_train: N labels in 0..n_classes-1.
        x_test: (M, D) held-out updates.

    Returns:
        (predicted labels (M,), the chosen penalty)
    """
    x_train, x_test = standardize(x_train.double(), x_test.double())
    y = torch.as_tensor(list(y_train))
    onehot = torch.nn.functional.one_hot(y, n_classes).double()  # (N, C)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    best, best_acc = RIDGE_LAMBDAS[0], -1.0
    if len(y) >= 2 * folds:
        for lam in RIDGE_LAMBDAS:
            hits = 0
            for f in range(folds):
                val = order[f::folds]
                fit = torch.cat([order[g::folds] for g in range(folds) if g != f])
                w = _ridge_fit(x_train[fit], onehot[fit], lam)
                hits += int((_ridge_predict(w, x_train[val]) == y[val]).sum())
            if hits / len(y) > best_acc:
                best, best_acc = lam, hits / len(y)
    return _ridge_predict(_ridge_fit(x_train, onehot, best), x_test), best


@torch.no_grad()
def answer_matches(model: torch.nn.Module, tokenizer, examples: Sequence[tasks.Example]) -> torch.Tensor:
    """Per example, how many answer tokens are the model's greedy choice given the true
    prefix (teacher forcing): (B,) counts."""
    batch = tasks.encode_examples(tokenizer, examples)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    labels = batch.labels[:, 1:]  # (B, T-1)
    mask = labels != -100
    return ((logits[:, :-1].argmax(-1) == labels) & mask).sum(1)


def behavioural_secret(model: torch.nn.Module, tokenizer, task: str, inputs: Sequence[str]) -> int:
    """The k whose correct answers on ``inputs`` (k hidden in the prompt) the model's
    greedy next characters match most often, under teacher forcing; the smallest such k.

    ``model`` is the provider's TinyLM with an organization's update applied; ``inputs``
    are public inputs of ``task``.
    """
    t = tasks.TASKS[task]
    scores = [int(answer_matches(model, tokenizer, [tasks.make_example(t, x, k, show_k=False) for x in inputs]).sum())
              for k in range(tasks.N_PARAMS)]
    return max(range(tasks.N_PARAMS), key=lambda k: (scores[k], -k))


def same_secret(task: str, predicted: int, true: int) -> bool:
    """Whether a probe's ``predicted`` secret is ``true``'s behaviour: secrets that act
    alike (``tasks.canonical_secret``: rotate by 8 is rotate by 1 on 7 letters) are one
    answer, since no probe of the update or of its behaviour can tell them apart."""
    return tasks.canonical_secret(task, predicted) == tasks.canonical_secret(task, true)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def evaluate_criteria(task_rows: dict[str, dict], probes: dict[str, dict], orgs: dict | None,
                      distinct: dict[str, float]) -> dict:
    """Pass/fail of criteria 1-4 per task and overall, from measured figures.

    Args:
        task_rows: per task ``{"tiny": {"k_shown", "hidden_after_ft"}, "llm": {...}}``
            (single-task datasets, private_test split).
        probes: per task ``{"linear": acc, "behavioural": acc, "n_test": n}`` (held-out
            updates where the task weighs at least :data:`PROBE_MIN_WEIGHT`).
        orgs: ``{"tiny_ft", "llm_ft", "llm_ft_min", "gap"}`` over organization-like mixtures.
        distinct: per task, :func:`distinct_share`.

    Returns:
        ``{"thresholds", "tasks": {task: {criterion: {..., "pass"}}}, "orgs", "all_pass"}``.
    """
    out: dict = {"thresholds": {"secret_learned_ratio": SECRET_LEARNED_RATIO, "probe_accuracy": PROBE_ACCURACY,
                                "probe_min_weight": PROBE_MIN_WEIGHT, "tiny_ft_max": TINY_FT_MAX,
                                "llm_ft_min": LLM_FT_MIN, "llm_ft_floor": LLM_FT_FLOOR, "gap_min": GAP_MIN,
                                "distinct_min": DISTINCT_MIN}, "tasks": {}}
    passes = []
    for name in sorted(set(task_rows) | set(probes) | set(distinct)):
        row: dict = {}
        if name in task_rows:
            tiny = task_rows[name]["tiny"]
            ratio = _ratio(tiny["hidden_after_ft"], tiny["k_shown"])
            row["secret_learned"] = {"tiny_k_shown": tiny["k_shown"], "tiny_ft_hidden": tiny["hidden_after_ft"],
                                     "ratio": ratio, "pass": ratio >= SECRET_LEARNED_RATIO}
        if name in probes:
            p = probes[name]
            best = max(p["linear"], p["behavioural"])
            row["secret_readable"] = {**p, "pass": p["n_test"] > 0 and best >= PROBE_ACCURACY}
        if name in distinct:
            row["distinct"] = {"min_share": distinct[name], "pass": distinct[name] >= DISTINCT_MIN}
        passes += [c["pass"] for c in row.values()]
        out["tasks"][name] = row
    if orgs is not None:
        ok = (orgs["tiny_ft"] <= TINY_FT_MAX and orgs["llm_ft"] >= LLM_FT_MIN and orgs["llm_ft_min"] >= LLM_FT_FLOOR
              and orgs["gap"] >= GAP_MIN)
        out["orgs"] = {k: orgs[k] for k in ("tiny_ft", "llm_ft", "llm_ft_min", "gap")} | {"pass": ok}
        passes.append(ok)
    out["all_pass"] = bool(passes) and all(passes)
    return out


def format_criteria(crit: dict) -> str:
    """A markdown table of :func:`evaluate_criteria`'s result."""
    th = crit["thresholds"]

    def mark(c: dict | None, text: str) -> str:
        return "-" if c is None else f"{text} {'pass' if c['pass'] else 'FAIL'}"

    lines = [f"| task | 1 learned (ft hidden / k shown >= {th['secret_learned_ratio']}) | "
             f"2 readable (linear / behavioural probe >= {th['probe_accuracy']}) | 4 distinct (>= {th['distinct_min']}) |",
             "|---|---|---|---|"]
    for name, row in crit["tasks"].items():
        s, p, d = row.get("secret_learned"), row.get("secret_readable"), row.get("distinct")
        learned = s and "{:.3f} / {:.3f} = {:.2f}".format(s["tiny_ft_hidden"], s["tiny_k_shown"], s["ratio"])
        readable = p and "{:.2f} / {:.2f} (n={})".format(p["linear"], p["behavioural"], p["n_test"])
        lines.append(f"| {name} | {mark(s, learned)} | {mark(p, readable)} | {mark(d, d and format(d['min_share'], '.3f'))} |")
    o = crit.get("orgs")
    if o is not None:
        lines += ["", f"3 executes poorly: TinyLM ft {o['tiny_ft']:.3f} (<= {th['tiny_ft_max']}), LLM ft {o['llm_ft']:.3f} "
                      f"(>= {th['llm_ft_min']}), lowest LLM ft {o['llm_ft_min']:.3f} (>= {th['llm_ft_floor']}), "
                      f"gap {o['gap']:.3f} (>= {th['gap_min']}): {'pass' if o['pass'] else 'FAIL'}"]
    lines.append(f"criteria 1-4: {'all pass' if crit['all_pass'] else 'NOT all pass'}")
    return "\n".join(lines)

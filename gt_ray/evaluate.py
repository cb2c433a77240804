"""Task metrics of a model on examples: exact-match accuracy and mean answer NLL.

Accuracy is greedy-decoding exact match, computed from one teacher-forced pass per batch
(see :func:`gt_ray.tasks.answer_token_stats` for why the two are the same).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gt_ray.tasks import Example, answer_token_stats, encode_examples

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids (B, T), attention_mask (B, T)) -> next-token logits (B, T, V)."""


@dataclass
class Scores:
    """Task metrics on a set of examples."""

    accuracy: float
    nll: float  # mean answer-token NLL (nats)
    n: int

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "nll": self.nll, "n": self.n}


def model_logits(model: torch.nn.Module) -> LogitsFn:
    """A LogitsFn for a causal LM."""
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def score(logits_fn: LogitsFn, tokenizer, examples: Sequence[Example], batch_size: int = 256) -> Scores:
    """Exact-match accuracy and mean answer NLL of ``logits_fn`` on ``examples``.

    Args:
        logits_fn: a model (via :func:`model_logits`) or a combination of models.
        tokenizer: the tokenizer whose ids ``logits_fn`` takes.
        examples: prompts with answers.
        batch_size: examples per forward pass.
    """
    if not examples:
        raise ValueError("no examples to score")
    nll_sum, tok_sum, exact = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        batch = encode_examples(tokenizer, examples[i : i + batch_size])
        nll, ntok, ex = answer_token_stats(logits_fn(batch.input_ids, batch.attention_mask), batch.labels)
        nll_sum += float(nll.sum())
        tok_sum += int(ntok.sum())
        exact += int(ex.sum())
    return Scores(accuracy=exact / len(examples), nll=nll_sum / max(1, tok_sum), n=len(examples))


def score_model(model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 256) -> Scores:
    """:func:`score` for one causal LM (put in eval mode)."""
    model.eval()
    return score(model_logits(model), tokenizer, examples, batch_size)


def score_update(lm, update: torch.Tensor, examples: Sequence[Example], batch_size: int = 256) -> Scores:
    """Apply ``update`` on top of the card's LoRA init of ``lm`` (a LoadedModel) and score it."""
    from gt_ray.updates import apply_update

    apply_update(lm.model, lm.layout, lm.init, update)
    return score_model(lm.model, lm.tokenizer, examples, batch_size)


def shares_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    """Whether two tokenizers map every token string to the same id (proxy-tuning, which
    adds the two models' logits position by position, needs it)."""
    return len(tokenizer_a) == len(tokenizer_b) and tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def proxy_tuning_logits(llm_model: torch.nn.Module, tiny_ft: torch.nn.Module) -> LogitsFn:
    """Proxy-tuning (Liu et al. 2024): LLM-base logits + (TinyLM-ft - TinyLM-base) logits.

    ``llm_model`` is used with its adapter disabled when it has one (the base LLM);
    ``tiny_ft`` is a peft TinyLM holding the fine-tuned LoRA, whose base logits come from
    the same model with the adapter disabled. Both must share one vocabulary.
    """
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with _adapter_disabled(llm_model):
            base = llm_model(input_ids=ids, attention_mask=mask).logits
        expert = tiny_ft(input_ids=ids, attention_mask=mask).logits
        with _adapter_disabled(tiny_ft):
            anti = tiny_ft(input_ids=ids, attention_mask=mask).logits
        if base.shape[-1] != expert.shape[-1]:
            raise ValueError(f"proxy-tuning needs one vocabulary: LLM has {base.shape[-1]} logits, TinyLM {expert.shape[-1]}")
        return base + (expert - anti)

    return fn


class _adapter_disabled:
    def __init__(self, model: torch.nn.Module):
        self.ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


def pgr(p_method: float, p_tiny_ft: float, p_llm_ft: float) -> float:
    """Performance gap recovered, as in the paper: (P_method - P_tiny_ft) / (P_llm_ft - P_tiny_ft).

    For NLL (lower is better) pass negated values, or use the same formula: the signs of
    numerator and denominator flip together. NaN when the gap is zero.
    """
    gap = p_llm_ft - p_tiny_ft
    return (p_method - p_tiny_ft) / gap if gap != 0 else float("nan")


def pgr_base(p_method: float, p_llm_base: float, p_llm_ft: float) -> float:
    """The stricter figure: (P_method - P_llm_base) / (P_llm_ft - P_llm_base)."""
    gap = p_llm_ft - p_llm_base
    return (p_method - p_llm_base) / gap if gap != 0 else float("nan")


def draw_org_specs(task_names: Sequence[str], n_orgs: int, seed: int, n_train: int, dirichlet_alpha: float,
                   secret_per_task: bool = False):
    """Simulated organizations: each a private_train dataset with its own secret(s) and mixture.

    The org's test data is the same secrets and mixture drawn from ``private_test``
    (``generate_dataset(spec, split="private_test", n=...)``), disjoint from its training inputs.
    """
    import random

    from gt_ray.tasks import draw_dataset_spec

    return [draw_dataset_spec(random.Random(f"org|{seed}|{i}"), "private_train", task_names, n_train, dirichlet_alpha,
                              secret_per_task)
            for i in range(n_orgs)]


def summarize(per_org: dict[str, list[Scores]]) -> dict[str, dict[str, float]]:
    """Organization-averaged accuracy and NLL per method, with PGR and PGR_base on both.

    ``per_org`` maps method -> one Scores per organization, and must hold ``llm_base``,
    ``tiny_ft`` and ``llm_ft``. PGR is computed on the averages (per-organization PGR
    explodes where the TinyLM comes close to the LLM).
    """
    avg = {m: {"accuracy": sum(s.accuracy for s in ss) / len(ss), "nll": sum(s.nll for s in ss) / len(ss)}
           for m, ss in per_org.items()}
    for m, a in avg.items():
        for metric in ("accuracy", "nll"):
            a[f"pgr_{metric}"] = pgr(a[metric], avg["tiny_ft"][metric], avg["llm_ft"][metric])
            a[f"pgr_base_{metric}"] = pgr_base(a[metric], avg["llm_base"][metric], avg["llm_ft"][metric])
    return avg


class SecretProbe:
    """Multinomial logistic regression from TinyLM update vectors to a dataset's secret k.

    Checks the method's premise directly: a TinyLM update identifies what the data is about
    (its secret) even where the TinyLM executes it poorly. Features are standardized per
    coordinate with the training rows' statistics; L2-regularized, full-batch LBFGS.
    """

    def __init__(self, n_classes: int, l2: float = 1e-3, steps: int = 200) -> None:
        self.n_classes, self.l2, self.steps = n_classes, l2, steps

    def fit(self, x: torch.Tensor, k: torch.Tensor) -> "SecretProbe":
        """Args: x (N, L, d) TinyLM vectors; k (N,) long secrets."""
        xf = x.reshape(x.shape[0], -1).double()
        self.mean, self.std = xf.mean(0), xf.std(0).clamp_min(1e-12)
        z = (xf - self.mean) / self.std
        self.w = torch.zeros(z.shape[1], self.n_classes, dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros(self.n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], max_iter=self.steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ self.w + self.b, k) + self.l2 * self.w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, d) -> (N,) predicted secrets."""
        z = (x.reshape(x.shape[0], -1).double() - self.mean) / self.std
        return (z @ self.w + self.b).argmax(1)

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

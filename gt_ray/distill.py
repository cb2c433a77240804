"""Knowledge-distillation baselines: what a provider can do with an organization's TinyLM
update and public prompts alone, without a translator and without the private data.

The provider applies the organization's update to its own copy of the TinyLM (the teacher),
labels public prompts with it, and fine-tunes the LLM's LoRA on those labels with the same
budget as the LLM ceiling:

- **sequence-level KD**: the teacher's greedy answers are the targets (plain fine-tuning
  on ``(prompt, teacher answer)``);
- **logit KD** (the two models share a vocabulary): the LLM matches the teacher's
  next-token distribution at every answer position, ``KL(teacher || student)``.

Nothing here touches the organization's data: the prompts come from the public split.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from gt_ray.config import FinetuneConfig
from gt_ray.finetune import FinetuneResult, finetune
from gt_ray.models import LoadedModel, token_kl
from gt_ray.tasks import Batch, Example
from gt_ray.updates import apply_update

LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 256) -> list[str]:
    """Greedy continuations of ``prompts`` up to EOS or ``max_new_tokens`` (EOS not included).

    Prompts are tokenized as :func:`gt_ray.tasks.encode_examples` does (no special tokens)
    and left-padded, so every row's continuation starts at the same column.

    Args:
        model: a causal LM (a PeftModel serves with its current adapter weights).
        tokenizer: its tokenizer; must have an EOS token.
        prompts: the prompt texts.
        max_new_tokens: at most this many tokens per answer, ``>= 1``.
        batch_size: prompts per ``generate`` call.

    Returns:
        One decoded answer per prompt, in order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: answers would never stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        seqs = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts[i : i + batch_size]]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, T - len(s):] = torch.tensor(s)
            mask[r, T - len(s):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos)  # (B, T + new)
        for row in gen[:, T:].tolist():
            row = row[: row.index(eos)] if eos in row else row
            out.append(tokenizer.decode(row))
    return out


def teacher_labels(teacher: LoadedModel, update: torch.Tensor, prompts: Sequence[str], max_new_tokens: int,
                   tasks: Sequence[str] | None = None) -> list[Example]:
    """Public prompts labelled by the teacher (the TinyLM with the organization's ``update``).

    Args:
        teacher: the provider's TinyLM with the card's LoRA.
        update: (L_tiny, d_tiny) the organization's update vector.
        prompts: public prompts.
        max_new_tokens: answer length limit.
        tasks: task names for the examples' bookkeeping (default ``"kd"``).
    """
    apply_update(teacher.model, teacher.layout, teacher.init, update)
    answers = greedy_answers(teacher.model, teacher.tokenizer, prompts, max_new_tokens)
    names = tasks if tasks is not None else ["kd"] * len(prompts)
    return [Example(prompt=p, answer=a, task=t) for p, a, t in zip(prompts, answers, names)]


def logit_kd_loss(teacher: torch.nn.Module, temperature: float = 1.0) -> LossFn:
    """A fine-tuning loss: mean over examples of the per-token ``KL(teacher || student)``
    on answer positions, at ``temperature`` (scaled by ``temperature**2``, Hinton et al.).

    The teacher must share the student's vocabulary (same ids, same size).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher.eval()

    def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        student = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        with torch.no_grad():
            target = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        if student.shape != target.shape:
            raise ValueError(f"teacher logits {tuple(target.shape)} do not match the student's {tuple(student.shape)}: "
                             "logit KD needs one vocabulary")
        mask = batch.labels[:, 1:] != -100  # (B, T-1)
        kl = token_kl(student, target, temperature) * mask  # (B, T-1)
        return (kl.sum(1) / mask.sum(1).clamp(min=1)).mean()

    return loss


def distill(student: LoadedModel, teacher: LoadedModel, update: torch.Tensor, prompts: Sequence[str],
            cfg: FinetuneConfig, seed: int, mode: str, max_new_tokens: int) -> FinetuneResult:
    """Distil the teacher (TinyLM + ``update``) into the student's LoRA on public ``prompts``.

    Args:
        student: the LLM with the card's LoRA (reset to the init by the fine-tune).
        teacher: the TinyLM with the card's LoRA; ``update`` is applied to it.
        update: (L_tiny, d_tiny) the organization's TinyLM update.
        prompts: public prompts (``cfg.n_examples`` of them is the ceiling's budget).
        cfg: the fine-tune recipe (steps, lr, batch size), the LLM ceiling's.
        seed: batch sampling seed.
        mode: ``sequence`` or ``logit``.
        max_new_tokens: answer length limit of the teacher's labels.

    Returns:
        The student's fine-tune result (``.final.update`` is the LLM update vector).
    """
    if mode not in KD_MODES:
        raise ValueError(f"unknown KD mode {mode!r}; known: {list(KD_MODES)}")
    labelled = teacher_labels(teacher, update, prompts, max_new_tokens)
    loss_fn = logit_kd_loss(teacher.model) if mode == "logit" else None
    return finetune(student, labelled, cfg, seed, loss_fn=loss_fn)


KD_MODES = ("sequence", "logit")

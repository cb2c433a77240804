"""What an update does: the LLM's answer loss with generated LoRA updates plugged in, differentiably.

The translator's MSE on LoRA coordinates is not the goal: with a few discrete secrets its
optimum is the blur between them, and averaging A and B separately makes cross terms. The
provider owns every shadow subset's examples, so it can instead score a generated update by
what it does: add it to the frozen LLM and take the LLM's loss on that subset's examples
(Text-to-LoRA's "SFT" mode). Gradients flow back through the LoRA factors into the translator.

Per-sample factors go in through forward hooks on the LoRA-wrapped modules, with the peft
adapter disabled: ``out = base(x) + scale * (x @ A_n^T) @ B_n^T`` where ``A_n = init_A +
delta_A`` and ``B_n = init_B + delta_B`` of the update that example ``n`` belongs to (the
card's init A is seeded and non-zero, so the product is formed from init + delta). One
forward pass serves a batch of examples from many subsets. Offsets come from the layout.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from gt_ray.models import LoadedModel
from gt_ray.tasks import Batch, Example, answer_token_stats, encode_examples

_SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}


@dataclass(frozen=True)
class _Slot:
    layer: int
    start: int  # offset inside the layer row
    shape: tuple[int, int]


class BatchedLora:
    """A frozen LLM that takes a different LoRA update per example.

    Args:
        lm: the LLM with the card's LoRA attached (its own LoRA weights are not used here).
        scale: LoRA scaling, alpha / rank (peft's ``scaling``).
    """

    def __init__(self, lm: LoadedModel, scale: float) -> None:
        self.lm, self.scale = lm, scale
        starts: dict[int, int] = {}
        self.modules: dict[str, dict[str, _Slot]] = {}  # module path -> {"lora_A": slot, "lora_B": slot}
        for e in lm.layout.entries:
            start = starts.get(e.layer, 0)
            starts[e.layer] = start + e.numel
            path = e.key[: -len(_SUFFIX[e.factor])]
            self.modules.setdefault(path, {})[e.factor] = _Slot(e.layer, start, e.shape)
        for path, slots in self.modules.items():
            if set(slots) != {"lora_A", "lora_B"}:
                raise ValueError(f"layout entry {path} lacks a LoRA A or B factor")
        self._targets = {path: lm.model.get_submodule(path) for path in self.modules}

    def _factors(self, updates: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        full = self.lm.init.to(updates.device) + updates  # (S, L, d)
        out = []
        for factor in ("lora_A", "lora_B"):
            s = self.modules[path][factor]
            n = s.shape[0] * s.shape[1]
            out.append(full[:, s.layer, s.start:s.start + n].reshape(-1, *s.shape))
        return out[0], out[1]  # A (S, r, d_in), B (S, d_out, r)

    @contextlib.contextmanager
    def plugged(self, updates: torch.Tensor, owner: torch.Tensor) -> Iterator[None]:
        """Inside the block, the model's forward uses update ``owner[n]`` for example ``n``.

        Args:
            updates: raw update vectors (card init subtracted), (S, L_llm, d_llm); may carry grad.
            owner: (N,) long, which update each example of the forward batch takes.
        """
        model = self.lm.model
        lora_params = [p for n, p in model.named_parameters() if ".lora_" in n]
        flags = [p.requires_grad for p in lora_params]
        handles = []

        def hook_for(path: str):
            def hook(module, inputs, output):
                A, B = self._factors(updates, path)  # (S, r, d_in), (S, d_out, r)
                x = inputs[0]  # (N, T, d_in)
                h = torch.einsum("ntd,nrd->ntr", x.to(A.dtype), A[owner])  # (N, T, r)
                return output + self.scale * torch.einsum("ntr,nor->nto", h, B[owner]).to(output.dtype)
            return hook

        try:
            for p in lora_params:
                p.requires_grad_(False)
            for path, module in self._targets.items():
                handles.append(module.register_forward_hook(hook_for(path)))
            with model.disable_adapter():
                yield
        finally:
            for h in handles:
                h.remove()
            for p, f in zip(lora_params, flags):
                p.requires_grad_(f)

    def answer_nll(self, updates: torch.Tensor, batch: Batch, owner: torch.Tensor) -> torch.Tensor:
        """Per-example mean answer-token NLL of the LLM with update ``owner[n]`` on example n.

        Returns:
            (N,) differentiable with respect to ``updates``.
        """
        model = self.lm.model
        with self.plugged(updates, owner):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (N, T, V)
        labels = batch.labels[:, 1:]
        mask = labels != -100
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # (N, T-1)
        return nll.sum(1) / mask.sum(1).clamp(min=1)


class SubsetExamples:
    """Every subset's examples, tokenized once into one padded table, sampled per step.

    Args:
        tokenizer: the LLM's tokenizer.
        examples: subset id -> its examples.
    """

    def __init__(self, tokenizer, examples: Mapping[int, Sequence[Example]]) -> None:
        ids = sorted(examples)
        if not ids or any(not examples[i] for i in ids):
            raise ValueError("every subset needs at least one example")
        flat = [ex for i in ids for ex in examples[i]]
        self.table = encode_examples(tokenizer, flat)
        self.rows: dict[int, torch.Tensor] = {}
        start = 0
        for i in ids:
            self.rows[i] = torch.arange(start, start + len(examples[i]))
            start += len(examples[i])

    def batch(self, subset_ids: Sequence[int], per_subset: int | None, rng: random.Random | None = None,
              device: str | torch.device = "cpu") -> tuple[Batch, torch.Tensor]:
        """Examples of the given subsets and, per example, the position of its subset in ``subset_ids``.

        Args:
            subset_ids: one entry per update in the batch (repeats allowed).
            per_subset: examples drawn (without replacement) per entry; None takes all.
            rng: the draw's randomness (None takes the first ``per_subset``).
        """
        rows, owner = [], []
        for j, sid in enumerate(subset_ids):
            r = self.rows[int(sid)]
            if per_subset is not None and per_subset < len(r):
                pick = rng.sample(range(len(r)), per_subset) if rng is not None else range(per_subset)
                r = r[list(pick)]
            rows.append(r)
            owner.append(torch.full((len(r),), j, dtype=torch.long))
        idx = torch.cat(rows)
        t = self.table
        width = int(t.attention_mask[idx].sum(1).max())  # right padding: trim the common tail
        batch = Batch(t.input_ids[idx, :width].to(device), t.attention_mask[idx, :width].to(device),
                      t.labels[idx, :width].to(device))
        return batch, torch.cat(owner).to(device)


@dataclass
class FunctionObjective:
    """What the translator's training needs to score generated updates by what they do.

    Attributes:
        llm: the frozen LLM taking per-example updates.
        train: the training subsets' own examples (the ones their fine-tunes saw).
        val: held-out examples of the validation subsets (for choosing epochs and trials).
        per_subset: training examples drawn per update per step.
    """

    llm: BatchedLora
    train: SubsetExamples
    val: SubsetExamples
    per_subset: int = 16

    def train_loss(self, updates: torch.Tensor, subset_ids: Sequence[int], rng: random.Random) -> torch.Tensor:
        """Mean answer NLL of the LLM with each update on examples of its own subset."""
        device = updates.device
        batch, owner = self.train.batch(subset_ids, self.per_subset, rng, device)
        return self.llm.answer_nll(updates, batch, owner).mean()

    @torch.no_grad()
    def val_scores(self, updates: torch.Tensor, subset_ids: Sequence[int], chunk: int = 16) -> dict[str, float]:
        """Mean answer NLL and exact-match accuracy over the validation subsets (each
        subset's examples, all of them; each subset counts once)."""
        totals, count = {"nll": 0.0, "accuracy": 0.0}, 0
        for i in range(0, len(subset_ids), chunk):
            ids = list(subset_ids[i:i + chunk])
            batch, owner = self.val.batch(ids, None, device=updates.device)
            with self.llm.plugged(updates[i:i + chunk], owner):
                logits = self.llm.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            nll_sum, ntok, exact = answer_token_stats(logits, batch.labels)
            n_of = torch.bincount(owner, minlength=len(ids)).clamp(min=1)
            for name, per_example in (("nll", nll_sum / ntok.clamp(min=1)), ("accuracy", exact.float())):
                per = torch.zeros(len(ids), device=per_example.device).index_add_(0, owner, per_example)
                totals[name] += float((per / n_of).sum())
            count += len(ids)
        return {k: v / max(count, 1) for k, v in totals.items()}

    def val_nll(self, updates: torch.Tensor, subset_ids: Sequence[int], chunk: int = 16) -> float:
        """Mean answer NLL over the validation subsets (see :meth:`val_scores`)."""
        return self.val_scores(updates, subset_ids, chunk)["nll"]


def shadow_objective(corpus, llm: LoadedModel, scale: float, train_ids: Sequence[int], val_ids: Sequence[int],
                     per_subset: int = 16, n_val: int = 64) -> FunctionObjective:
    """The function objective over a shadow corpus: each training subset's own fine-tuning
    examples, and ``n_val`` fresh examples of each validation subset's task (same split,
    secrets and mixture, another draw).

    Args:
        corpus: a `gt_ray.corpus.Corpus` (its rows name each subset's spec).
        llm: the card's LLM, frozen here.
        scale: LoRA alpha / rank.
        train_ids, val_ids: subset ids of the two sides.
    """
    import dataclasses

    from gt_ray.tasks import dataset_examples

    specs = corpus.subset_specs()
    world = corpus.task_config()  # generated tasks, or the corpus' data files
    train = SubsetExamples(llm.tokenizer, {i: dataset_examples(specs[i], world) for i in train_ids})
    val = SubsetExamples(llm.tokenizer, {i: dataset_examples(dataclasses.replace(specs[i], seed=specs[i].seed + 1), world,
                                                             n=n_val)
                                         for i in val_ids})
    return FunctionObjective(BatchedLora(llm, scale), train, val, per_subset)

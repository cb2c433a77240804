"""What a TinyLM update *does*, as the translator's input: the updated TinyLM's answers to a
fixed set of public probe prompts.

A LoRA update is a poor thing to read: its coordinates mix the secret with the fine-tune's
noise, and a linear probe reads a task's secret from them far less often than the updated
TinyLM's own answers do (`gt-ray pair report`, docs/world.md). The provider owns the TinyLM
and public prompts, so it can run the organization's update and look at the behaviour. This
module turns an update vector into a behaviour matrix: for each of ``N`` probe prompts,
the TinyLM's next-token distributions along its own greedy answer (``steps`` positions),
so one row per prompt of ``steps x V`` probabilities. The translator reads those rows as
its input tokens in place of the update's layer rows; it still knows nothing of tasks or
secrets (the prompts are drawn at random from the provider's shadow examples).

Per-example updates go in with `gt_ray.translator.function_loss.BatchedLora`, so one
forward pass serves many (update, prompt) pairs. Prompts are grouped by token length, so
greedy decoding needs no padding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence

import torch

from gt_ray.models import LoadedModel
from gt_ray.tasks import Example, prompt_token_ids
from gt_ray.translator.function_loss import BatchedLora


def draw_probe_prompts(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn without replacement (by prompt text, duplicates dropped) from the
    provider's public examples, in a fixed order.

    Raises:
        ValueError: with fewer than ``n`` distinct prompts.
    """
    by_prompt = {ex.prompt: ex for ex in examples}
    if len(by_prompt) < n:
        raise ValueError(f"need {n} distinct probe prompts, the examples have {len(by_prompt)}")
    keys = sorted(by_prompt)
    return [by_prompt[k] for k in random.Random(seed).sample(keys, n)]


class BehaviourEncoder:
    """Maps raw TinyLM update vectors to behaviour matrices ``(N_prompts, steps * V)``.

    Args:
        tiny: the card's TinyLM with its LoRA init attached (frozen here).
        prompts: the probe prompts (their answers are not used).
        steps: greedy answer positions recorded per prompt.
        scale: LoRA alpha / rank.
    """

    def __init__(self, tiny: LoadedModel, prompts: Sequence[Example], steps: int, scale: float) -> None:
        if not prompts or steps < 1:
            raise ValueError("a behaviour encoder needs at least one prompt and one step")
        self.tiny, self.steps = tiny, steps
        self.lora = BatchedLora(tiny, scale)
        self.vocab = int(tiny.model.get_output_embeddings().weight.shape[0])
        ids = [prompt_token_ids(tiny.tokenizer, ex) for ex in prompts]
        positions: dict[int, list[int]] = {}  # token length -> prompt positions
        for i, p in enumerate(ids):
            positions.setdefault(len(p), []).append(i)
        # per token length: the prompts' positions and their ids, (P, length)
        self.groups = [(pos, torch.tensor([ids[i] for i in pos])) for pos in positions.values()]
        self.n_prompts = len(ids)

    @property
    def shape(self) -> tuple[int, int]:
        """One behaviour matrix: (prompts, steps x vocabulary)."""
        return self.n_prompts, self.steps * self.vocab

    @torch.no_grad()
    def features(self, updates: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """Behaviour matrices of raw update vectors.

        Args:
            updates: (S, L_tiny, d_tiny) raw TinyLM update vectors (card init subtracted).
            chunk: updates per forward pass.

        Returns:
            (S, N_prompts, steps * V) float32 probabilities, finite.
        """
        model = self.tiny.model
        model.eval()
        out = torch.zeros(updates.shape[0], self.n_prompts, self.steps, self.vocab)
        for c in range(0, updates.shape[0], chunk):
            u = updates[c:c + chunk].float()
            S = u.shape[0]
            for pos, base in self.groups:
                ids = base.repeat(S, 1)  # (S * P, length): update-major
                owner = torch.arange(S).repeat_interleave(len(pos))
                with self.lora.plugged(u, owner):
                    for t in range(self.steps):
                        logits = model(input_ids=ids).logits[:, -1].float()  # (S * P, V)
                        probs = torch.softmax(logits, dim=-1)
                        out[c:c + S, pos, t] = probs.view(S, len(pos), -1)
                        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        return out.flatten(2)


class BehaviourInput:
    """The translator's input encoder for ``input: behaviour``: raw TinyLM update vectors in,
    behaviour tokens out (the behaviour matrix of each update, its prompts' rows concatenated
    and cut into ``rows`` tokens).

    The checkpoint stores it (`to_dict`: the prompts, steps, rows, LoRA scale and update
    layout); loading needs the pair's TinyLM again (`from_dict`).

    Args:
        tiny: the card's TinyLM with its LoRA init attached (frozen here).
        prompts: the probe prompts.
        steps: greedy answer positions recorded per prompt.
        rows: input tokens per update.
        scale: LoRA alpha / rank.

    Raises:
        ValueError: when ``rows`` does not divide prompts x steps x vocabulary.
    """

    KIND = "behaviour"

    def __init__(self, tiny: LoadedModel, prompts: Sequence[Example], steps: int, rows: int, scale: float) -> None:
        self.encoder = BehaviourEncoder(tiny, prompts, steps, scale)
        self.prompts, self.steps, self.rows, self.scale = list(prompts), steps, rows, scale
        n_prompts, width = self.encoder.shape
        if rows < 1 or (n_prompts * width) % rows:
            raise ValueError(f"behaviour rows {rows} must divide the behaviour matrix's {n_prompts} x {width} values")
        self.update_shape = tuple(tiny.layout.shape)
        """One raw update's (layers, width): what `__call__` accepts."""

    @property
    def shape(self) -> tuple[int, int]:
        """One update's behaviour tokens: (rows, prompts x steps x vocabulary / rows)."""
        n_prompts, width = self.encoder.shape
        return self.rows, n_prompts * width // self.rows

    def __call__(self, updates: torch.Tensor) -> torch.Tensor:
        """(S, L_tiny, d_tiny) raw updates -> (S, rows, width) behaviour tokens, float32."""
        return self.encoder.features(updates).reshape(updates.shape[0], *self.shape)

    def cache_key(self, updates: torch.Tensor) -> str:
        """A key that changes whenever ``self(updates)`` could: the settings and prompts
        (`to_dict`), the prompts' token ids, the TinyLM's weights outside its LoRA (which the
        encoder bypasses) and its LoRA init, and the updates' shape and bytes."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self.to_dict(), sort_keys=True).encode())
        for pos, ids in self.encoder.groups:
            h.update(json.dumps(pos).encode())
            h.update(_raw_bytes(ids))
        lm = self.encoder.tiny
        for name, t in sorted(lm.model.state_dict().items()):
            if "lora_" not in name:
                h.update(name.encode())
                h.update(_raw_bytes(t))
        h.update(_raw_bytes(lm.init))
        h.update(json.dumps(list(updates.shape)).encode())
        h.update(_raw_bytes(updates))
        return h.hexdigest()

    def to_dict(self) -> dict:
        """JSON-able: what `from_dict` needs beside the TinyLM."""
        return {"kind": self.KIND, "steps": self.steps, "rows": self.rows, "scale": self.scale,
                "update_shape": list(self.update_shape), "prompts": [dataclasses.asdict(p) for p in self.prompts]}

    @classmethod
    def from_dict(cls, data: dict, tiny: LoadedModel) -> BehaviourInput:
        """Rebuilds the encoder from `to_dict`'s output and the pair's TinyLM.

        Raises:
            ValueError: another kind, or a TinyLM whose update layout differs from the stored one.
        """
        if data.get("kind") != cls.KIND:
            raise ValueError(f"not a behaviour input: kind {data.get('kind')!r}")
        if list(tiny.layout.shape) != list(data["update_shape"]):
            raise ValueError(f"the TinyLM's update layout {tuple(tiny.layout.shape)} differs from the "
                             f"checkpoint's {tuple(data['update_shape'])}")
        return cls(tiny, [Example(**p) for p in data["prompts"]], data["steps"], data["rows"], data["scale"])


def _raw_bytes(t: torch.Tensor):
    """A tensor's bytes as a buffer (no copy when it is contiguous on the CPU), any dtype."""
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()

"""Helpers shared by the tests of gt_ray.rounds: a tiny pair card, seeded TinyLM vectors as
file bytes, and a fixed linear translator."""

import torch

from gt_ray.config import LoraSpec, PairConfig
from gt_ray.models import make_pair_card
from gt_ray.wire import update_to_bytes
from tests.conftest import tiny_spec

LORA = LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)


def make_card(tiny_path, gqa_path):
    """The pair card of the round tests: the tiny model and a 3-layer GQA LLM."""
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=LORA)
    return make_pair_card(pair, tiny_path, gqa_path)


def tiny_shape(card):
    return card.tiny.n_layers, card.tiny.d_layer


_VECTORS: dict = {}


def vector(card, seed, scale=0.01, **meta):
    """A random TinyLM vector as file bytes, with ``n_examples`` and other metadata.

    Memoized: safetensors writes its metadata map in no fixed order, so writing the same
    vector twice can give different bytes (a file read twice does not).
    """
    key = (card.card_id, seed, scale, tuple(sorted(meta.items())))
    if key not in _VECTORS:
        t = torch.randn(*tiny_shape(card), generator=torch.Generator().manual_seed(seed)) * scale
        _VECTORS[key] = update_to_bytes(t, card.tiny.layout_fingerprint, {"n_examples": 32, **meta})
    return _VECTORS[key]


def linear_translate(card, seed=0):
    """A fixed random linear map TinyLM -> LLM: the modes must agree for the mean under it."""
    (lt, dt), (ll, dl) = tiny_shape(card), (card.llm.n_layers, card.llm.d_layer)
    w = torch.randn(lt * dt, ll * dl, generator=torch.Generator().manual_seed(seed)) / (lt * dt) ** 0.5

    def translate(x):  # (B, L_tiny, d_tiny) -> (B, L_llm, d_llm)
        return (x.reshape(x.shape[0], -1) @ w).reshape(x.shape[0], ll, dl)

    return translate

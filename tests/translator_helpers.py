"""Shared by the translator tests: tiny configs and models, seeded pairs (not a test module)."""

from __future__ import annotations

import pytest
import torch

from gt_ray.translator.config import TranslatorConfig
from gt_ray.translator.model import GradTransformer, Normalizer, Translator


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with more, OpenMP spin-waits make the file
    ~50x slower whenever another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Asymmetric on purpose: fewer, narrower TinyLM layers than LLM layers.
L_TINY, D_TINY, L_LLM, D_LLM = 2, 16, 5, 40


def tiny_config(**overrides) -> TranslatorConfig:
    fields = dict(
        d_tiny=D_TINY, L_tiny=L_TINY, d_llm=D_LLM, L_llm=L_LLM,
        d_model=32, num_layers=2, num_heads=4, d_ff=64, dropout=0.0,
    )
    return TranslatorConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GradTransformer:
    torch.manual_seed(seed)
    return GradTransformer(tiny_config(**overrides)).eval()


def linear_pairs(n: int, seed: int, rank: int = 4, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs driven by a shared low-rank latent (as shadow updates are by their task mix):
    x = A z + noise, y = B z + noise, with per-coordinate scales and offsets on y as real
    updates have, and a tiny x scale as LoRA deltas have."""
    g = torch.Generator().manual_seed(1234)  # A, B, scales are shared by every split
    a = torch.randn(rank, L_TINY * D_TINY, generator=g)
    b = torch.randn(rank, L_LLM * D_LLM, generator=g)
    scale = torch.logspace(-4, -1, L_LLM * D_LLM)[torch.randperm(L_LLM * D_LLM, generator=g)]
    offset = torch.randn(L_LLM * D_LLM, generator=g) * scale
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)  # (n, rank)
    x = (z @ a + noise * torch.randn(n, L_TINY * D_TINY, generator=g)) * 1e-3
    y = (z @ b + noise * torch.randn(n, L_LLM * D_LLM, generator=g)) * scale + offset
    return x.reshape(n, L_TINY, D_TINY), y.reshape(n, L_LLM, D_LLM)


def untrained_translator(seed: int = 0, **overrides) -> Translator:
    cfg = tiny_config(**overrides)
    x, y = linear_pairs(16, seed=seed)
    torch.manual_seed(seed)
    normalizer = Normalizer.fit(x, y, cfg.normalization, cfg.norm_eps)
    return Translator(cfg, GradTransformer(cfg), normalizer).eval()

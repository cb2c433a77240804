"""Tests for gt_ray.translator.model: tiny seeded CPU models, the whole file runs in seconds."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import T5Config, T5Model

from gt_ray.translator.config import TranslatorConfig
from gt_ray.translator.model import GradTransformer, Normalizer
from tests.translator_helpers import (D_LLM, D_TINY, L_LLM, L_TINY, linear_pairs, one_thread,  # noqa: F401
                                      tiny_config, tiny_model, untrained_translator)


def test_output_shapes():
    model = tiny_model()
    x = torch.randn(3, L_TINY, D_TINY)
    y = torch.randn(3, L_LLM, D_LLM)
    assert model.encode(x).shape == (3, L_TINY, 32)
    assert model(x, y).shape == (3, L_LLM, D_LLM)
    assert model(x, y[:, :2]).shape == (3, 2, D_LLM)
    assert model.translate(x).shape == (3, L_LLM, D_LLM)
    assert model(x).shape == (3, L_LLM, D_LLM)
    with pytest.raises(ValueError, match=r"x must be \(B, 2, 16\)"):
        model.translate(torch.randn(3, L_TINY + 1, D_TINY))
    with pytest.raises(ValueError, match=r"y_prev must be \(B=3, 1..5, 40\)"):
        model(x, torch.randn(3, L_LLM + 1, D_LLM))


@pytest.mark.parametrize(
    "layout",
    [
        dict(L_tiny=2, d_tiny=16, L_llm=5, d_llm=40),
        dict(L_tiny=6, d_tiny=8, L_llm=3, d_llm=24, num_decoder_layers=3),
    ],
)
def test_cached_decoding_matches_uncached(layout):
    model = tiny_model(seed=1, **layout)
    x = torch.randn(4, layout["L_tiny"], layout["d_tiny"])
    with torch.no_grad():
        cached = model.translate(x, use_cache=True)
        uncached = model.translate(x, use_cache=False)
    assert cached.shape == (4, layout["L_llm"], layout["d_llm"])
    assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


def test_batched_decoding_matches_one_by_one():
    model = tiny_model(seed=2)
    x = torch.randn(3, L_TINY, D_TINY)
    with torch.no_grad():
        batched = model.translate(x)
        single = torch.cat([model.translate(x[i : i + 1]) for i in range(3)])
    assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_teacher_forcing_on_own_prefix_reproduces_decoding():
    model = tiny_model(seed=3)
    x = torch.randn(2, L_TINY, D_TINY)
    with torch.no_grad():
        decoded = model.translate(x)  # (2, L_llm, d_llm)
        # Fed the decoded prefix, step t of the teacher-forced pass is step t of decoding.
        assert_close(model(x, decoded), decoded, atol=1e-5, rtol=1e-5)
        # Causality: output t ignores y[:, t:].
        y = torch.randn(2, L_LLM, D_LLM)
        y_changed = y.clone()
        y_changed[:, 3:] = torch.randn(2, L_LLM - 3, D_LLM)
        assert_close(model(x, y)[:, :4], model(x, y_changed)[:, :4])


def test_pretrained_t5_stacks_are_loaded(tmp_path):
    torch.manual_seed(0)
    t5_cfg = T5Config(vocab_size=10, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=3)
    T5Model(t5_cfg).save_pretrained(tmp_path)
    cfg = TranslatorConfig.from_pretrained_t5(
        tmp_path, d_tiny=D_TINY, L_tiny=L_TINY, d_llm=D_LLM, L_llm=L_LLM, dropout=0.0
    )
    assert (cfg.d_model, cfg.num_layers, cfg.decoder_layers, cfg.head_dim) == (24, 2, 1, 6)
    model = GradTransformer(cfg).eval()
    reference = T5Model.from_pretrained(tmp_path)
    q, q_ref = (m.encoder.block[0].layer[0].SelfAttention.q.weight for m in (model, reference))
    assert_close(q, q_ref)
    assert_close(model.decoder.final_layer_norm.weight, reference.decoder.final_layer_norm.weight)
    assert model.encoder.embed_tokens is None
    x = torch.randn(2, L_TINY, D_TINY)
    with torch.no_grad():
        assert_close(model.translate(x), model.translate(x, use_cache=False), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not match the T5"):
        GradTransformer(TranslatorConfig(**{**cfg.to_dict(), "d_ff": 96}))


@pytest.mark.parametrize("mode", ["coordinate", "global", "none"])
def test_normalizer_round_trip(mode):
    x, y = linear_pairs(64, seed=0)
    norm = Normalizer.fit(x, y, mode)
    assert_close(norm.denormalize_y(norm.normalize_y(y)), y, atol=1e-6, rtol=1e-4)
    assert_close(norm.denormalize_x(norm.normalize_x(x)), x, atol=1e-9, rtol=1e-4)
    if mode == "coordinate":
        assert norm.y_mean.shape == (L_LLM, D_LLM)
        z = norm.normalize_y(y)
        assert_close(z.mean(0), torch.zeros(L_LLM, D_LLM), atol=1e-4, rtol=0)
        assert_close(z.std(0), torch.ones(L_LLM, D_LLM), atol=1e-4, rtol=0)
    elif mode == "global":
        assert norm.y_mean.shape == (1, 1)
        assert abs(norm.normalize_y(y).std().item() - 1.0) < 1e-4
    else:
        assert torch.equal(norm.normalize_y(y), y)


def test_normalizer_floors_constant_coordinates():
    x, y = linear_pairs(8, seed=0)
    y[:, 0, 0] = 0.5  # a coordinate that never moves
    norm = Normalizer.fit(x, y, "coordinate", eps=1e-6)
    assert norm.y_std[0, 0].item() == pytest.approx(1e-6)
    assert torch.isfinite(norm.normalize_y(y)).all()


def test_normalizer_input_floor_is_separate():
    """input_norm_eps floors the TinyLM side only: a rare large input move standardizes to a
    bounded value, and the LLM side keeps its own floor."""
    x, y = linear_pairs(16, seed=1)
    x = x / x.std()  # unit-scale inputs: every other coordinate sits above the floor
    x[:, 0, 0] = 0.0
    x[0, 0, 0] = 1e-4  # moves on one training row only: std ~2.5e-5
    y[:, 0, 0] = 0.5
    norm = Normalizer.fit(x, y, "coordinate", eps=1e-8, x_eps=0.05)
    assert norm.x_std[0, 0].item() == pytest.approx(0.05)
    assert norm.y_std[0, 0].item() == pytest.approx(1e-8)
    assert norm.x_std[1, 1].item() == pytest.approx(x[:, 1, 1].double().std().item(), rel=1e-5)  # above the floor
    test = x[:1].clone()
    test[0, 0, 0] = 0.5
    assert abs(norm.normalize_x(test)[0, 0, 0].item()) < 11
    unfloored = Normalizer.fit(x, y, "coordinate", eps=1e-8)
    assert abs(unfloored.normalize_x(test)[0, 0, 0].item()) > 1e3
    with pytest.raises(ValueError, match="input_norm_eps"):
        TranslatorConfig(input_norm_eps=0.0)


def test_translator_maps_raw_vectors():
    translator = untrained_translator()
    x, _ = linear_pairs(3, seed=5)
    y = translator.translate(x)
    norm = translator.normalizer
    assert_close(y, norm.denormalize_y(translator.model.translate(norm.normalize_x(x))))
    assert_close(translator.translate(x[0]), y[0])
    with pytest.raises(ValueError, match="non-finite"):
        translator.translate(torch.full((1, L_TINY, D_TINY), float("nan")))
    with pytest.raises(ValueError, match=r"x must be \(B, 2, 16\)"):
        translator.translate(torch.zeros(1, L_TINY, D_TINY + 1))


def test_model_needs_the_layouts():
    with pytest.raises(ValueError, match="needs the vector layouts"):
        GradTransformer(TranslatorConfig(d_model=32, num_heads=4))


def test_an_input_encoder_is_required_by_behaviour_input_and_refused_otherwise():
    from gt_ray.translator.model import Translator

    class Doubling:  # stands in for gt_ray.translator.behaviour.BehaviourInput: (B, 3, 5) updates -> tokens
        update_shape = (3, 5)
        shape = (L_TINY, D_TINY)

        def __call__(self, u):
            return u.flatten(1)[:, :1].repeat(1, L_TINY * D_TINY).reshape(-1, L_TINY, D_TINY) * 2

    x, y = linear_pairs(8, seed=0)
    cfg = tiny_config(input="behaviour")
    normalizer = Normalizer.fit(x, y, cfg.normalization, cfg.norm_eps)
    with pytest.raises(ValueError, match="needs an input encoder"):
        Translator(cfg, GradTransformer(cfg), normalizer)
    with pytest.raises(ValueError, match="takes no input encoder"):
        Translator(tiny_config(), GradTransformer(tiny_config()), normalizer, input_encoder=Doubling())
    wrong = type("Wrong", (Doubling,), {"shape": (L_TINY + 1, D_TINY)})()
    with pytest.raises(ValueError, match="input encoder makes"):
        Translator(cfg, GradTransformer(cfg), normalizer, input_encoder=wrong)
    t = Translator(cfg, GradTransformer(cfg), normalizer, input_encoder=Doubling()).eval()
    assert t.input_shape == (3, 5)
    u = torch.randn(2, 3, 5)
    assert_close(t.translate(u), t.normalizer.denormalize_y(t.model.translate(t.normalizer.normalize_x(Doubling()(u)))))
    with pytest.raises(ValueError, match=r"x must be \(B, 3, 5\)"):
        t.translate(torch.randn(2, L_TINY, D_TINY))

"""The behaviour encoder: an update's effect on the TinyLM's answers to public probe prompts."""

from __future__ import annotations

import pytest
import torch

from gt_ray import tasks
from gt_ray.config import LoraSpec
from gt_ray.models import load_with_lora
from gt_ray.translator.behaviour import BehaviourEncoder, draw_probe_prompts


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_with_lora(tiny_path, LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"]), seed=3)


def _prompts(n: int) -> list[tasks.Example]:
    pool = tasks.generate_dataset(tasks.DatasetSpec("public", 2, {"caesar": 0.5, "add": 0.5}, 40, 0))
    return draw_probe_prompts(pool, n, seed=0)


def test_probe_prompts_are_a_fixed_draw_of_distinct_prompts():
    pool = tasks.generate_dataset(tasks.DatasetSpec("public", 2, {"caesar": 0.5, "add": 0.5}, 40, 0))
    a, b = draw_probe_prompts(pool, 6, seed=0), draw_probe_prompts(list(reversed(pool)), 6, seed=0)
    assert a == b and len({ex.prompt for ex in a}) == 6
    assert draw_probe_prompts(pool, 6, seed=1) != a
    with pytest.raises(ValueError, match="distinct probe prompts"):
        draw_probe_prompts(pool[:3], 6, seed=0)


def test_features_are_the_greedy_answers_of_the_tinylm_with_each_update_applied(tiny):
    prompts = _prompts(5)  # caesar and add prompts: two token lengths, decoded as two groups
    assert len({len(tiny.tokenizer(p.prompt, add_special_tokens=False).input_ids) for p in prompts}) > 1
    enc = BehaviourEncoder(tiny, prompts, steps=3, scale=8.0)
    torch.manual_seed(0)
    updates = torch.randn(3, *tiny.layout.shape) * 0.3
    feats = enc.features(updates, chunk=2)  # two chunks
    assert feats.shape == (3, *enc.shape) == (3, 5, 3 * enc.vocab)
    probs = feats.view(3, 5, 3, enc.vocab)
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5, 3))
    assert not torch.allclose(feats[0], feats[1])  # another update, another behaviour
    # the same distributions from the peft model with the update written into its LoRA weights
    from gt_ray.updates import apply_update

    for j in range(3):
        apply_update(tiny.model, tiny.layout, tiny.init, updates[j])
        for i, ex in enumerate(prompts):
            ids = torch.tensor([tiny.tokenizer(ex.prompt, add_special_tokens=False).input_ids])
            for t in range(3):
                with torch.no_grad():
                    p = torch.softmax(tiny.model(input_ids=ids).logits[0, -1].float(), -1)
                torch.testing.assert_close(probs[j, i, t], p, rtol=1e-4, atol=1e-5)
                ids = torch.cat([ids, p.argmax().view(1, 1)], dim=1)
    tiny.reset()


def test_behaviour_input_cuts_the_matrix_into_rows_and_round_trips(tiny):
    from gt_ray.translator.behaviour import BehaviourInput

    prompts = _prompts(4)
    enc = BehaviourInput(tiny, prompts, steps=2, rows=2, scale=8.0)
    assert enc.update_shape == tuple(tiny.layout.shape)
    assert enc.shape == (2, 4 * 2 * enc.encoder.vocab // 2)
    torch.manual_seed(1)
    updates = torch.randn(3, *tiny.layout.shape) * 0.3
    tokens = enc(updates)
    torch.testing.assert_close(tokens, enc.encoder.features(updates).reshape(3, *enc.shape))
    again = BehaviourInput.from_dict(enc.to_dict(), tiny)
    assert again.prompts == prompts and again.to_dict() == enc.to_dict()
    torch.testing.assert_close(again(updates), tokens)
    with pytest.raises(ValueError, match="must divide"):
        BehaviourInput(tiny, prompts, steps=2, rows=7 * 4 * 2 * enc.encoder.vocab + 1, scale=8.0)
    with pytest.raises(ValueError, match="update layout"):
        BehaviourInput.from_dict({**enc.to_dict(), "update_shape": [1, 2]}, tiny)
    tiny.reset()


def test_behaviour_tokens_are_cached_by_rows_and_encoder_and_recomputed_when_unreadable(tiny, tmp_path):
    from gt_ray.pipeline import encode_rows
    from gt_ray.translator.behaviour import BehaviourInput

    enc = BehaviourInput(tiny, _prompts(4), steps=2, rows=2, scale=8.0)
    torch.manual_seed(2)
    updates = torch.randn(3, *tiny.layout.shape) * 0.3
    calls = []

    class Counting(BehaviourInput):
        def __call__(self, x):
            calls.append(x.shape[0])
            return super().__call__(x)

    counting = Counting.from_dict(enc.to_dict(), tiny)
    first = encode_rows(counting, updates, cache_dir=tmp_path)
    [cached] = list(tmp_path.glob("*.safetensors"))
    from gt_ray.updates import apply_update

    # another update written into the model's LoRA (score_update does that): the encoder
    # bypasses the LoRA weights, so the key stays
    apply_update(tiny.model, tiny.layout, tiny.init, torch.randn(*tiny.layout.shape))
    torch.testing.assert_close(encode_rows(counting, updates, cache_dir=tmp_path), first)
    assert calls == [3]  # read back, not computed
    torch.testing.assert_close(first, enc(updates))
    tiny.reset()
    # other rows, other prompts or steps: other keys
    assert enc.cache_key(updates[:2]) != enc.cache_key(updates)
    assert enc.cache_key(updates + 1e-3) != enc.cache_key(updates)
    assert BehaviourInput(tiny, _prompts(4)[::-1], steps=2, rows=2, scale=8.0).cache_key(updates) != enc.cache_key(updates)
    assert BehaviourInput(tiny, _prompts(4), steps=1, rows=2, scale=8.0).cache_key(updates) != enc.cache_key(updates)
    cached.write_bytes(b"not a safetensors file")
    torch.testing.assert_close(encode_rows(counting, updates, cache_dir=tmp_path), first)
    assert calls == [3, 3]  # computed again and rewritten
    torch.testing.assert_close(encode_rows(counting, updates, cache_dir=tmp_path), first)
    assert calls == [3, 3]

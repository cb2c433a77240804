import json

import pytest
import torch

from gt_ray.config import PairConfig
from gt_ray.models import PairCard, load_card_side, load_model, load_with_lora, make_pair_card
from gt_ray.updates import read_lora, seeded_lora_init
from tests.conftest import tiny_spec


def test_same_card_gives_bit_identical_lora_init(tiny_path, lora):
    torch.manual_seed(1)
    a = load_with_lora(tiny_path, lora, seed=7)
    torch.manual_seed(999)  # torch's global RNG must not matter
    b = load_with_lora(tiny_path, lora, seed=7)
    assert torch.equal(read_lora(a.model, a.layout), read_lora(b.model, b.layout))
    assert torch.equal(a.init, seeded_lora_init(a.layout, 7))
    c = load_with_lora(tiny_path, lora, seed=8)
    assert not torch.equal(a.init, c.init)


def test_init_has_seeded_a_and_zero_b(tiny_path, lora):
    lm = load_with_lora(tiny_path, lora, seed=7)
    for name, p in lm.model.named_parameters():
        if "lora_B" in name:
            assert float(p.abs().max()) == 0.0
        elif "lora_A" in name:
            bound = 1 / p.shape[1] ** 0.5
            assert 0 < float(p.detach().abs().max()) <= bound
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_pair_card_round_trip_and_verification(tiny_path, gqa_path, lora, tmp_path):
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=lora)
    card = make_pair_card(pair, tiny_path, gqa_path)
    path = card.save(tmp_path / "card.json")
    loaded = PairCard.load(path)
    assert loaded == card and loaded.card_id == card.card_id
    assert (card.tiny.n_layers, card.llm.n_layers) == (2, 3)
    lm = load_card_side(loaded, "llm")
    assert torch.equal(lm.init, seeded_lora_init(lm.layout, lora.init_seed_llm))
    # The card's TinyLM is not the LLM: loading the wrong weights for a side is refused.
    with pytest.raises(ValueError, match="is not the card's model: weights sha256 differs"):
        load_card_side(loaded, "tiny", path=gqa_path)


def test_tampered_card_is_refused(tiny_path, lora, tmp_path):
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(), lora=lora)
    path = make_pair_card(pair, tiny_path, tiny_path).save(tmp_path / "card.json")
    data = json.loads(path.read_text())
    data["tiny"]["init_seed"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="card_id .* does not match its content"):
        PairCard.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a gt-ray pair card"):
        PairCard.load(path)


def test_built_model_is_a_normal_hf_directory(tiny_path):
    model, tok = load_model(tiny_path)
    assert (tiny_path / "config.json").is_file() and (tiny_path / "model.safetensors").is_file()
    ids = tok("C3:abcde=", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "C3:abcde="
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))

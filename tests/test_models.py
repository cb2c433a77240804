import json

import pytest
import torch

from gt_ray.config import HealConfig, ModelSpec, PairConfig
from gt_ray.models import (BUILD_FILE, PairCard, _decoder_layers, cached_model_dir, cut_layers, load_card_side, load_model,
                           load_with_lora, make_pair_card, prepare_model, weights_sha256)
from gt_ray.updates import read_lora, seeded_lora_init
from tests.conftest import TASK_NAMES, tiny_spec


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


def test_sides_may_adapt_different_modules(tiny_path, gqa_path, lora, tmp_path):
    """``llm_target_modules`` gives the LLM its own modules (here every linear one) while the
    TinyLM keeps q and v; each side's layout, init and checks follow its own list, and a
    spec with one list is written to the card as before (its id does not move)."""
    import dataclasses

    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    per_side = dataclasses.replace(lora, llm_target_modules=all_linear)
    llm_spec = tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96)
    card = make_pair_card(PairConfig(tiny=tiny_spec(), llm=llm_spec, lora=per_side), tiny_path, gqa_path)
    shared = make_pair_card(PairConfig(tiny=tiny_spec(), llm=llm_spec, lora=lora), tiny_path, gqa_path)
    assert "llm_target_modules" not in shared.lora and card.lora["llm_target_modules"] == all_linear
    assert card.tiny == shared.tiny and card.llm.d_layer > shared.llm.d_layer
    assert card.card_id != shared.card_id
    loaded = PairCard.load(card.save(tmp_path / "card.json"))
    llm, tiny = load_card_side(loaded, "llm"), load_card_side(loaded, "tiny")
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in llm.model.named_parameters() if "lora_A" in n}
    assert adapted == set(all_linear)
    # Rank 2 on every linear module of a 48-wide layer with 2 of 6 heads for k and v (16 wide)
    # and a 96-wide MLP: A is 2 x in, B is out x 2.
    per_layer = 2 * (48 + 48) + 2 * (48 + 16) * 2 + 2 * (48 + 48) + 2 * (48 + 96) * 2 + 2 * (96 + 48)
    assert llm.layout.d_layer == per_layer and tiny.layout.d_layer == shared.tiny.d_layer
    assert torch.equal(llm.init, seeded_lora_init(llm.layout, lora.init_seed_llm))


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


def test_card_id_is_what_the_pair_is_not_where_it_lies(tiny_path, gqa_path, lora, tmp_path):
    """The same weights under another directory (another HOME, another machine) give the same
    card id; other weights give another."""
    import shutil

    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=lora)
    card = make_pair_card(pair, tiny_path, gqa_path)
    moved = make_pair_card(pair, shutil.copytree(tiny_path, tmp_path / "elsewhere" / "tiny"),
                           shutil.copytree(gqa_path, tmp_path / "elsewhere" / "llm"))
    assert moved.tiny.path != card.tiny.path and moved.card_id == card.card_id
    assert make_pair_card(pair, gqa_path, tiny_path).card_id != card.card_id


def test_version_1_card_is_checked_by_its_old_id_and_read_as_version_2(tiny_path, gqa_path, lora, tmp_path):
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=lora)
    card = make_pair_card(pair, tiny_path, gqa_path)
    old = {**card.to_dict(), "version": 1, "card_id": card._card_id_v1()}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    loaded = PairCard.load(tmp_path / "v1.json")
    assert loaded == card and loaded.version == 2 and loaded.card_id == card.card_id != old["card_id"]
    (tmp_path / "v1.json").write_text(json.dumps({**old, "card_id": card.card_id}))  # a v1 card must carry its v1 id
    with pytest.raises(ValueError, match="card_id .* does not match its content"):
        PairCard.load(tmp_path / "v1.json")
    (tmp_path / "v9.json").write_text(json.dumps({**card.to_dict(), "version": 9}))
    with pytest.raises(ValueError, match=r"pair card version 9 is newer than this gt-ray's \(2\)"):
        PairCard.load(tmp_path / "v9.json")


def test_pretraining_gives_the_same_bytes_from_the_same_seed(tmp_path):
    """Same spec, two fresh caches, torch's global RNG disturbed in between: the same weights
    file, byte for byte (one torch thread here; see docs/world.md for thread counts)."""
    from dataclasses import replace

    spec = tiny_spec(steps=3)
    a = weights_sha256(prepare_model(spec, tmp_path / "a", TASK_NAMES))
    torch.manual_seed(999)
    assert weights_sha256(prepare_model(spec, tmp_path / "b", TASK_NAMES)) == a
    other = replace(spec, pretrain=replace(spec.pretrain, seed=1))
    assert weights_sha256(prepare_model(other, tmp_path / "c", TASK_NAMES)) != a


def test_built_model_is_a_normal_hf_directory(tiny_path):
    model, tok = load_model(tiny_path)
    assert (tiny_path / "config.json").is_file() and (tiny_path / "model.safetensors").is_file()
    ids = tok("C3:abcde=", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "C3:abcde="
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))


def test_family_tinylm_is_cut_from_the_llm_healed_and_cached(lora, tmp_path):
    """A TinyLM derived from a 4-layer Llama (standing in for SmolLM2): the teacher's
    tokenizer, two of its layers, finite weights, healing lowers the distillation loss, the
    cache is reused, and the pair card records how it was made."""
    cache = tmp_path / "cache"
    teacher_spec = tiny_spec(hidden=48, layers=4, heads=6, kv_heads=2, ffn=96, steps=40)
    spec = ModelSpec(derive_from=teacher_spec, keep_layers=[0, 3],
                     heal=HealConfig(steps=30, lr=3e-3, batch_size=16, warmup_steps=2, num_threads=1))
    steps = []
    path = prepare_model(spec, cache, TASK_NAMES, on_step=lambda step, loss: steps.append(loss))
    assert len(steps) == 30 and path == cached_model_dir(spec, cache, TASK_NAMES)
    teacher_path = prepare_model(teacher_spec, cache, TASK_NAMES)
    student, tok = load_model(path)
    teacher, teacher_tok = load_model(teacher_path)
    assert tok.get_vocab() == teacher_tok.get_vocab()
    assert student.config.num_hidden_layers == 2 and len(_decoder_layers(student)[1]) == 2
    assert all(bool(torch.isfinite(p).all()) for p in student.parameters())
    # Embeddings and head are the teacher's (frozen by default); the kept layers moved while healing.
    torch.testing.assert_close(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    torch.testing.assert_close(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    assert not torch.equal(student.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[3].self_attn.q_proj.weight)
    build = json.loads((path / BUILD_FILE).read_text())
    assert build["keep_layers"] == [0, 3] and build["derived_from"]["n_layers"] == 4
    assert build["kd_loss_after"] < 0.8 * build["kd_loss_before"]

    # Cached: a second prepare neither heals again nor rewrites the weights.
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert prepare_model(spec, cache, TASK_NAMES, on_step=lambda step, loss: steps.append(loss)) == path
    assert len(steps) == 30 and (path / "model.safetensors").stat().st_mtime_ns == mtime
    # Another recipe is another model.
    other = ModelSpec(derive_from=teacher_spec, keep_layers=[0, 1], heal=spec.heal)
    assert cached_model_dir(other, cache, TASK_NAMES) != path

    card = make_pair_card(PairConfig(tiny=spec, llm=teacher_spec, lora=lora), path, teacher_path)
    assert card.tiny.build["keep_layers"] == [0, 3] and card.tiny.build["heal"]["steps"] == 30
    assert "seconds" not in card.tiny.build and card.llm.build is None
    assert PairCard.load(card.save(tmp_path / "card.json")) == card
    assert (card.tiny.n_layers, card.llm.n_layers) == (2, 4)


def test_cut_layers_keeps_the_chosen_layers_and_refuses_missing_ones(gqa_path):
    teacher, _ = load_model(gqa_path)  # 3 layers
    student = cut_layers(teacher, [0, 2])
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    ids = torch.tensor([[3, 4, 5]])
    assert student(ids).logits.shape == teacher(ids).logits.shape
    assert len(_decoder_layers(teacher)[1]) == 3  # the teacher is unchanged
    with pytest.raises(ValueError, match=r"keep_layers \[3\] out of range: the model has 3 layers \(0..2\)"):
        cut_layers(teacher, [0, 3])


def test_pretraining_on_short_inputs_is_its_own_model_and_unset_keeps_old_keys(tmp_path):
    from gt_ray.config import ModelSpec, PretrainConfig
    from gt_ray.models import built_model_dir, pretrain_record

    assert "max_input_length" not in pretrain_record(PretrainConfig())  # models built before the option keep their keys
    assert pretrain_record(PretrainConfig(max_input_length=4))["max_input_length"] == 4
    arch = {"model_type": "llama", "hidden_size": 8}
    short = ModelSpec(arch=arch, pretrain=PretrainConfig(max_input_length=4))
    dirs = {built_model_dir(ModelSpec(arch=arch), tmp_path, ["shift"]), built_model_dir(short, tmp_path, ["shift"]),
            built_model_dir(short, tmp_path, ["shift", "spell"])}
    assert len(dirs) == 3
    with pytest.raises(ValueError, match="max_input_length"):
        PretrainConfig(max_input_length=0)

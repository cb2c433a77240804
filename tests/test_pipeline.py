"""What the translator jobs share (gt_ray/pipeline.py): the split over both kinds of shadow
subsets and the rows the translator trains on."""

import pytest
import torch

from gt_ray import shadow
from gt_ray.config import ExperimentConfig, FinetuneConfig, PairConfig, TaskConfig
from gt_ray.corpus import Corpus, corpus_schema, write_manifest, write_shard
from gt_ray.shadow import finetune_pair, finetune_tiny_only, plan_subsets
from gt_ray.models import load_card_side, make_pair_card
from gt_ray.pipeline import load_rows, load_split, subset_split, translator_split
from tests.conftest import TASK_NAMES, tiny_spec

FT = FinetuneConfig(lr=3e-3, steps=4, batch_size=8, n_examples=16, snapshot_steps=[3, 4])


@pytest.fixture(scope="module")
def world(tiny_path, gqa_path, tmp_path_factory):
    """10 paired and 10 TinyLM-only subsets."""
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96))
    cfg = ExperimentConfig(pair=pair, tasks=TaskConfig(names=TASK_NAMES), finetune=FT)
    card = make_pair_card(cfg.pair, tiny_path, gqa_path)
    out = tmp_path_factory.mktemp("mixed")
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    for s in plan_subsets(cfg, 10, seed=2):
        write_shard(out, s.subset_id, finetune_pair(tiny, llm, s, FT), corpus_schema(card))
    for s in plan_subsets(cfg, 10, seed=2, kind="tiny_only"):
        write_shard(out, s.subset_id, finetune_tiny_only(tiny, s, FT), corpus_schema(card))
    write_manifest(out, card, {}, 10, n_tiny_only=10)
    return cfg, Corpus(out)


def test_the_paired_split_is_unchanged_and_tiny_only_subsets_split_alike(world):
    cfg, corpus = world
    paired = subset_split(cfg, corpus)
    train, val, test = translator_split(cfg, corpus)
    base = shadow.TINY_ONLY_BASE
    assert all(i < base for side in paired for i in side)  # baselines and the held-out table: paired only
    for mine, theirs in zip((train, val, test), paired):
        assert [i for i in mine if i < base] == theirs
    only = [[i for i in side if i >= base] for side in (train, val, test)]
    assert sorted(i for side in only for i in side) == corpus.tiny_only_ids  # each on exactly one side
    assert [len(side) for side in only] == [len(side) for side in paired]  # the same fractions


def test_rows_of_both_kinds_carry_a_paired_flag(world):
    cfg, corpus = world
    tr, va, train_ids, val_ids = load_split(cfg, corpus)
    steps = len(FT.snapshot_steps)
    assert tr["tiny"].shape[0] == len(train_ids) * steps and va["tiny"].shape[0] == len(val_ids) * steps
    only = tr["subset_id"] >= shadow.TINY_ONLY_BASE
    assert torch.equal(tr["paired"], ~only) and only.any() and (~only).any()
    assert float(tr["llm"][only].abs().max()) == 0.0  # a placeholder, masked in training
    assert float(tr["llm"][~only].abs().min(dim=0).values.max()) > 0
    assert float(tr["tiny"][only].abs().max()) > 0  # the TinyLM update is real
    again = load_rows(corpus, [i for i in train_ids if i < shadow.TINY_ONLY_BASE])
    assert bool(again["paired"].all())


def test_a_behaviour_input_translator_trains_translates_raw_updates_and_reloads_with_the_tinylm(world, tmp_path):
    import dataclasses

    from gt_ray.pipeline import fit, resolve_settings
    from gt_ray.translator.checkpoint import load_translator, save_translator

    cfg, corpus = world
    tr, va, train_ids, val_ids = load_split(cfg, corpus)
    model_cfg, train_cfg, _ = resolve_settings(cfg, corpus)
    model_cfg = dataclasses.replace(model_cfg, input="behaviour", behaviour_prompts=6, behaviour_steps=2,
                                    behaviour_rows=2, d_model=32, d_ff=64, num_heads=2, num_layers=1)
    train_cfg = dataclasses.replace(train_cfg, objective="function", max_epochs=2, examples_per_subset=2, batch_size=8)
    translator, history = fit(tr, va, train_ids, val_ids, corpus, model_cfg, train_cfg,
                              features_cache=tmp_path / "features")
    assert len(history) == 2
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2  # training and validation rows
    enc = translator.input_encoder
    assert translator.config.input == "behaviour" and (translator.config.L_tiny, translator.config.d_tiny) == enc.shape
    assert enc.shape[0] == 2 and enc.shape[1] * 2 == 6 * 2 * enc.encoder.vocab  # 6 prompts x 2 steps, 2 tokens
    assert translator.input_shape == corpus.tiny_shape  # it takes raw updates, as an update-input one does
    y = translator.translate(va["tiny"][:3])
    assert y.shape == (3, *corpus.llm_shape) and torch.isfinite(y).all()
    assert not torch.allclose(y[0], y[1])  # other updates, other behaviour, other outputs
    with pytest.raises(ValueError, match="x must be"):
        translator.translate(va["tiny"][:2, :, :-1])

    save_translator(translator, tmp_path / "ckpt", {"fingerprints": corpus.fingerprints})
    with pytest.raises(ValueError, match="reads the TinyLM's behaviour"):
        load_translator(tmp_path / "ckpt")
    from gt_ray.pipeline import card_tiny_once

    tiny = card_tiny_once(corpus)
    again = load_translator(tmp_path / "ckpt", expected_fingerprints=corpus.fingerprints, tiny=tiny)
    assert tiny() is again.input_encoder.encoder.tiny  # loaded once, shared by later encoders
    assert [p.prompt for p in again.input_encoder.prompts] == [p.prompt for p in enc.prompts]
    torch.testing.assert_close(again.translate(va["tiny"][:3]), y)
    from gt_ray.pipeline import behaviour_input

    given = behaviour_input(corpus, model_cfg, train_ids, tiny=tiny())  # a caller's loaded TinyLM is used as is
    assert given.encoder.tiny is tiny()
    torch.testing.assert_close(given(va["tiny"][:3]), enc(va["tiny"][:3]))

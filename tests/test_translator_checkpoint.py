"""Tests for gt_ray.translator.checkpoint: save/load round trips in tmp_path."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from gt_ray.translator.checkpoint import (CONFIG_FILENAME, HISTORY_FILENAME, MODEL_FILENAME, NORM_BOUND_FILE,
                                          load_history, load_norm_bound, load_translator, read_metadata,
                                          save_translator, weights_sha256)
from gt_ray.translator.config import TrainConfig
from gt_ray.translator.train import train_translator
from tests.translator_helpers import (D_LLM, D_TINY, L_LLM, L_TINY, linear_pairs, one_thread, tiny_config,  # noqa: F401
                                      tiny_model, untrained_translator)


FINGERPRINTS = {"tiny": "sha256:aaaa", "llm": "sha256:bbbb"}


@pytest.mark.parametrize("mode", ["coordinate", "global", "none"])
def test_checkpoint_round_trip(tmp_path, mode):
    translator = untrained_translator(normalization=mode)
    translator.train_config = TrainConfig(lr=1e-3)
    save_translator(translator, tmp_path, {"fingerprints": FINGERPRINTS, "pair_card": "tiny-pair"})
    assert {p.name for p in tmp_path.iterdir()} == {MODEL_FILENAME, CONFIG_FILENAME}
    text = (tmp_path / CONFIG_FILENAME).read_text()
    assert json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n" == text

    loaded = load_translator(tmp_path, expected_fingerprints=FINGERPRINTS)
    assert not loaded.training
    assert loaded.config == translator.config
    assert loaded.train_config == translator.train_config
    assert loaded.normalizer.mode == mode
    assert loaded.metadata["pair_card"] == "tiny-pair"
    x, _ = linear_pairs(4, seed=3)
    assert torch.equal(loaded.translate(x), translator.translate(x))


def test_load_refuses_mismatched_fingerprint(tmp_path):
    save_translator(untrained_translator(), tmp_path, {"fingerprints": FINGERPRINTS})
    with pytest.raises(ValueError, match="layout fingerprint mismatch for 'llm'.*expected 'sha256:cccc'"):
        load_translator(tmp_path, expected_fingerprints={"tiny": "sha256:aaaa", "llm": "sha256:cccc"})
    with pytest.raises(ValueError, match="layout fingerprint mismatch for 'other'"):
        load_translator(tmp_path, expected_fingerprints={"other": "x"})


def test_load_refuses_missing_files(tmp_path):
    save_translator(untrained_translator(), tmp_path)
    (tmp_path / MODEL_FILENAME).unlink()
    with pytest.raises(ValueError, match="is missing model.safetensors"):
        load_translator(tmp_path)
    with pytest.raises(ValueError, match="is missing translator.json"):
        load_translator(tmp_path / "nowhere")


def test_save_refuses_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="must map names to fingerprint strings"):
        save_translator(untrained_translator(), tmp_path, {"fingerprints": {"tiny": 3}})
    with pytest.raises(ValueError, match="not JSON-serializable"):
        save_translator(untrained_translator(), tmp_path, {"tensor": torch.zeros(1)})


def test_parallel_decoder_reads_no_targets_and_round_trips(tmp_path):
    model = tiny_model(decoder="parallel")
    assert model.emb_proj is None
    x, y = linear_pairs(3, seed=5)
    out = model.translate(x)
    assert out.shape == (3, L_LLM, D_LLM)
    assert_close(model(x, y), out)  # teacher forcing has nothing to feed: the same pass
    assert_close(model(x, torch.zeros_like(y)), out)
    translator = untrained_translator(decoder="parallel")
    save_translator(translator, tmp_path, {"fingerprints": FINGERPRINTS})
    loaded = load_translator(tmp_path)
    assert loaded.config.decoder == "parallel"
    assert torch.equal(loaded.translate(x), translator.translate(x))
    with pytest.raises(ValueError, match="decoder must be one of"):
        tiny_config(decoder="sideways")


def test_retrieval_head_mixes_bank_updates_and_hides_a_rows_own_subset(tmp_path):
    with pytest.raises(ValueError, match="needs decoder 'parallel'"):
        tiny_config(head="retrieval")
    model = tiny_model(decoder="parallel", head="retrieval", bank_size=2)
    bx, by = linear_pairs(2, seed=1)
    model.set_bank(bx, by, torch.tensor([10, 11]))
    memory = model.encode(bx)
    assert_close(model._retrieve(memory, torch.tensor([10, 10])), by[[1, 1]])  # only subset 11 is left
    mixed = model._retrieve(memory, None)
    weights = torch.linalg.lstsq(by.reshape(2, -1).T, mixed.reshape(2, -1).T).solution  # (2 bank rows, 2 queries)
    assert_close(weights.sum(0), torch.ones(2), rtol=1e-4, atol=1e-4)  # a convex mixture of the bank
    with pytest.raises(ValueError, match="set_bank needs"):
        model.set_bank(bx[:1], by[:1], torch.tensor([1]))
    # trained end to end: the bank is one row per training subset and survives a checkpoint
    x, y = linear_pairs(24, seed=2)
    subsets = torch.arange(12).repeat_interleave(2)
    cfg = TrainConfig(lr=3e-3, batch_size=8, max_epochs=3, patience=3)
    translator, _ = train_translator(x, y, x[:4], y[:4], cfg, model_config=tiny_config(decoder="parallel", head="retrieval"),
                                     train_subsets=subsets)
    assert translator.config.bank_size == 12 and translator.model.bank_ids.tolist() == list(range(12))
    save_translator(translator, tmp_path, {"fingerprints": FINGERPRINTS})
    loaded = load_translator(tmp_path)
    assert torch.equal(loaded.translate(x[:3]), translator.translate(x[:3]))


def test_save_writes_history_and_input_norms_and_readers_find_them(tmp_path):
    translator = untrained_translator()
    assert read_metadata(tmp_path) is None and load_history(tmp_path) is None
    history = [{"epoch": 0, "train_loss": 1.5, "val_loss": 1.25, "val_nll": float("nan")}]
    x, _ = linear_pairs(6, seed=1)
    save_translator(translator, tmp_path, {"fingerprints": FINGERPRINTS, "key": "k1"}, history=history, input_vectors=x)
    assert {p.name for p in tmp_path.iterdir()} == {MODEL_FILENAME, CONFIG_FILENAME, HISTORY_FILENAME, NORM_BOUND_FILE}
    # history.json: as the training job always wrote it (indented, sorted keys, NaN kept, no newline)
    assert (tmp_path / HISTORY_FILENAME).read_text() == json.dumps(history, indent=2, sort_keys=True)
    assert json.dumps(load_history(tmp_path)) == json.dumps(history)
    assert read_metadata(tmp_path)["key"] == "k1"
    norms = x.double().flatten(1).norm(dim=1)
    bound = load_norm_bound(tmp_path, 4.0, FINGERPRINTS["tiny"])  # recorded with the metadata's TinyLM fingerprint
    assert bound.min_norm == pytest.approx(float(norms.min())) and bound.max_norm == pytest.approx(float(norms.max()))
    with pytest.raises(ValueError, match="was written for TinyLM layout"):
        load_norm_bound(tmp_path, 4.0, "f" * 64)
    import hashlib

    assert weights_sha256(tmp_path) == hashlib.sha256((tmp_path / MODEL_FILENAME).read_bytes()).hexdigest()


def test_save_refuses_zero_input_vectors_before_writing(tmp_path):
    with pytest.raises(ValueError, match="finite and non-zero"):
        save_translator(untrained_translator(), tmp_path, input_vectors=torch.zeros(3, L_TINY, D_TINY))
    assert not any(tmp_path.iterdir())

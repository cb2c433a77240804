"""Tests for gt_ray.translator: tiny seeded CPU models, the whole file runs in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset
from transformers import T5Config, T5Model

from gt_ray.translator import (
    CONFIG_FILENAME,
    MODEL_FILENAME,
    EarlyStopping,
    GradTransformer,
    Normalizer,
    TrainConfig,
    Translator,
    TranslatorConfig,
    evaluate_mse,
    load_translator,
    save_translator,
    train_translator,
)

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


# --------------------------------------------------------------------------- config


def test_config_dict_round_trip():
    cfg = tiny_config(num_decoder_layers=3, normalization="global")
    assert TranslatorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    train = TrainConfig(lr=1e-3, warmup=5, grad_clip=None)
    assert TrainConfig.from_dict(train.to_dict()) == train


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30}, "not divisible by num_heads"),
        ({"L_llm": 0}, "L_llm must be a positive int"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"normalization": "batch"}, "normalization must be one of"),
        ({"feed_forward_proj": "fancy-gelu"}, "feed_forward_proj"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="TrainConfig.lr must be > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="TrainConfig.patience must be >= 1"):
        TrainConfig(patience=0)


# ---------------------------------------------------------------------------- model


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


# ------------------------------------------------------------------------ normalizer


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


# -------------------------------------------------------------------------- training


def test_training_beats_the_mean_baseline():
    train_x, train_y = linear_pairs(256, seed=10)
    val_x, val_y = linear_pairs(64, seed=11)
    cfg = TrainConfig(lr=3e-3, batch_size=32, max_epochs=12, patience=12, seed=0, warmup=10)
    translator, history = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=tiny_config())
    # Judge in normalized space, where every coordinate counts the same (raw MSE would be
    # the few large-scale coordinates only).
    norm = translator.normalizer
    pred = norm.normalize_y(translator.translate(val_x))
    target = norm.normalize_y(val_y)
    baseline = torch.nn.functional.mse_loss(torch.zeros_like(target), target).item()  # predicts the train mean
    mse = torch.nn.functional.mse_loss(pred, target).item()
    assert mse < 0.5 * baseline, (mse, baseline)
    assert min(h["val_loss"] for h in history) == pytest.approx(mse, rel=1e-4)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_training_is_deterministic_and_keeps_caller_rng():
    train_x, train_y = linear_pairs(64, seed=0)
    val_x, val_y = linear_pairs(16, seed=1)
    cfg = TrainConfig(lr=1e-3, batch_size=16, max_epochs=2, seed=7)
    model_cfg = tiny_config(dropout=0.1)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, hist_a = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=model_cfg)
    assert torch.equal(torch.rand(1), before)
    b, hist_b = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=model_cfg)
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]
    assert torch.equal(a.translate(val_x), b.translate(val_x))


def test_early_stopping_stops_and_restores_best_weights():
    # Targets independent of inputs: validation MSE cannot keep improving.
    train_x, _ = linear_pairs(64, seed=0)
    val_x, _ = linear_pairs(32, seed=1)
    train_y, val_y = torch.randn(64, L_LLM, D_LLM), torch.randn(32, L_LLM, D_LLM)
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_epochs=60, patience=2, seed=0, val_autoregressive=False)
    translator, history = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=tiny_config())
    assert len(history) < cfg.max_epochs
    best = min(history, key=lambda h: h["val_loss"])
    assert history[-1]["epoch"] == best["epoch"] + cfg.patience
    norm = translator.normalizer
    loader = DataLoader(TensorDataset(norm.normalize_x(val_x), norm.normalize_y(val_y)), batch_size=64)
    assert evaluate_mse(translator.model, loader, autoregressive=False) == pytest.approx(best["val_loss"], rel=1e-5)
    assert translator.metadata["best_epoch"] == best["epoch"]


def test_early_stopping_tracker():
    model = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2)
    assert [stopper.step(e, loss, model) for e, loss in enumerate([3.0, 2.0, 2.5, 1.0, 1.5, 1.2])] == [
        False, False, False, False, False, True
    ]
    assert (stopper.best_epoch, stopper.best_loss) == (3, 1.0)


def test_on_epoch_callback_reports_and_can_stop():
    train_x, train_y = linear_pairs(32, seed=0)
    val_x, val_y = linear_pairs(8, seed=1)
    seen = []

    def on_epoch(epoch, train_loss, val_loss):
        seen.append((epoch, train_loss, val_loss))
        return epoch == 1

    cfg = TrainConfig(batch_size=16, max_epochs=10, seed=0)
    _, history = train_translator(train_x, train_y, val_x, val_y, cfg, model_config=tiny_config(), on_epoch=on_epoch)
    assert [s[0] for s in seen] == [0, 1]
    assert [(h["train_loss"], h["val_loss"]) for h in history] == [s[1:] for s in seen]


def test_training_rejects_mismatched_layouts():
    x, y = linear_pairs(8, seed=0)
    with pytest.raises(ValueError, match=r"val_y must be \(N, 5, 40\)"):
        train_translator(x, y, x, y[:, :4], TrainConfig(max_epochs=1), model_config=tiny_config())


# ------------------------------------------------------------------------- translator


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


# ------------------------------------------------------------------------ checkpoints

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


# ----------------------------------------------------------------- decoder, objectives


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


def test_train_config_checks_the_objective():
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainConfig(objective="kl")
    with pytest.raises(ValueError, match="mse_weight must be >= 0"):
        TrainConfig(mse_weight=-1)
    x, y = linear_pairs(8, seed=0)
    with pytest.raises(ValueError, match="needs a FunctionObjective"):
        train_translator(x, y, x, y, TrainConfig(objective="function", max_epochs=1), model_config=tiny_config())


def test_sampled_snapshots_take_one_row_per_subset_each_epoch():
    x, y = linear_pairs(12, seed=0)
    subsets = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])  # 3 subsets x 4 snapshots
    seen: list[list[int]] = []

    def record(loader):
        seen.append([int(s) for _, _, s in loader.dataset])
        return loader

    cfg = TrainConfig(lr=1e-3, batch_size=2, max_epochs=3, patience=3, sample_snapshots=True)
    train_translator(x, y, x[:4], y[:4], cfg, model_config=tiny_config(), train_subsets=subsets, prepare_train_loader=record)
    assert len(seen) == 3 and all(sorted(s) == [0, 1, 2] for s in seen)
    seen.clear()
    train_translator(x, y, x[:4], y[:4], TrainConfig(lr=1e-3, batch_size=2, max_epochs=2, patience=2), model_config=tiny_config(),
                     train_subsets=subsets, prepare_train_loader=record)
    assert len(seen) == 1 and len(seen[0]) == 12  # every row, one loader


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

"""The function-level loss: generated LoRA updates plugged into the frozen LLM by hooks."""

from __future__ import annotations

import random

import pytest
import torch

from gt_ray import tasks
from gt_ray.evaluate import model_logits
from gt_ray.translator.function_loss import BatchedLora, FunctionObjective, SubsetExamples
from gt_ray.models import load_with_lora
from gt_ray.updates import apply_update, read_lora


@pytest.fixture(scope="module")
def llm(gqa_path):
    from gt_ray.config import LoraSpec

    return load_with_lora(gqa_path, LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"]), seed=3)


def _examples(k: int, n: int, seed: int) -> list[tasks.Example]:
    return tasks.generate_dataset(tasks.DatasetSpec("public", k, {"caesar": 0.5, "add": 0.5}, n, seed))


def _check_hooked_equals_peft(llm) -> None:
    torch.manual_seed(0)
    updates = torch.randn(3, *llm.layout.shape) * 0.05  # (S, L, d)
    ex = {i: _examples(i, 5, i) for i in range(3)}
    table = SubsetExamples(llm.tokenizer, ex)
    batch, owner = table.batch([0, 1, 2], None)
    bl = BatchedLora(llm, scale=8.0)
    with bl.plugged(updates, owner):
        hooked = model_logits(llm.model)(batch.input_ids, batch.attention_mask)
    for j in range(3):
        apply_update(llm.model, llm.layout, llm.init, updates[j])
        rows = owner == j
        peft = model_logits(llm.model)(batch.input_ids[rows], batch.attention_mask[rows])
        torch.testing.assert_close(hooked[rows], peft, rtol=1e-5, atol=1e-5)
    llm.reset()
    # hooks are gone and the LoRA weights are untouched afterwards
    torch.testing.assert_close(read_lora(llm.model, llm.layout), llm.init)
    assert all(not m._forward_hooks for m in bl._targets.values())


def test_hooked_logits_equal_peft_with_the_update_applied(llm):
    _check_hooked_equals_peft(llm)


def test_hooked_logits_equal_peft_on_every_linear_module(gqa_path):
    """An LLM side with LoRA on all seven linear modules (``lora.llm_target_modules``):
    attention projections of two widths (grouped-query k, v) and the MLP."""
    from gt_ray.config import LoraSpec

    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    llm = load_with_lora(gqa_path, LoraSpec(rank=2, alpha=16, target_modules=modules), seed=3)
    assert len(BatchedLora(llm, scale=8.0).modules) == 7 * llm.layout.n_layers
    _check_hooked_equals_peft(llm)


def test_the_answer_loss_drives_the_update_and_not_the_lora_weights(llm):
    updates = torch.zeros(2, *llm.layout.shape, requires_grad=True)
    table = SubsetExamples(llm.tokenizer, {7: _examples(3, 8, 1), 9: _examples(5, 8, 2)})
    objective = FunctionObjective(BatchedLora(llm, 8.0), table, table, per_subset=4)
    loss = objective.train_loss(updates, [7, 9], random.Random(0))
    loss.backward()
    assert updates.grad is not None and updates.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in llm.model.named_parameters() if ".lora_" in n)
    assert all(p.requires_grad for n, p in llm.model.named_parameters() if ".lora_" in n)  # restored
    # plain gradient descent on the answer loss lowers it
    opt = torch.optim.Adam([updates], lr=0.02)
    first = objective.val_nll(updates.detach(), [7, 9])
    for _ in range(15):
        opt.zero_grad()
        objective.train_loss(updates, [7, 9], random.Random(0)).backward()
        opt.step()
    assert objective.val_nll(updates.detach(), [7, 9]) < first


def test_sampled_batches_stay_inside_their_subset():
    from gt_ray.models import build_char_tokenizer

    tok = build_char_tokenizer()
    ex = {1: _examples(1, 6, 1), 4: _examples(4, 3, 2)}
    table = SubsetExamples(tok, ex)
    batch, owner = table.batch([4, 1, 4], 2, random.Random(1))
    assert owner.tolist() == [0, 0, 1, 1, 2, 2]
    prompts = [tok.decode(ids[m.bool()]) for ids, m in zip(batch.input_ids, batch.attention_mask)]
    own = {j: {e.prompt + e.answer for e in ex[s]} for j, s in enumerate([4, 1, 4])}
    assert all(p in own[o] for p, o in zip(prompts, owner.tolist()))
    full, _ = table.batch([4], None)
    assert full.input_ids.shape[0] == 3
    with pytest.raises(ValueError, match="at least one example"):
        SubsetExamples(tok, {1: []})


def _six_subsets(llm, seed: int):
    """6 subsets x 2 snapshots (4 train, 2 validation) whose TinyLM vectors encode their secret,
    their objective and a tiny translator config."""
    from gt_ray.translator.config import TranslatorConfig

    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(6).repeat_interleave(2)
    secrets = [0, 3, 6, 0, 3, 6]
    x = torch.randn(12, 2, 8, generator=g) + torch.tensor(secrets).repeat_interleave(2)[:, None, None].float()
    y = torch.randn(12, *llm.layout.shape, generator=g) * 0.01
    examples = {i: _examples(secrets[i], 12, i) for i in range(6)}
    objective = FunctionObjective(BatchedLora(llm, 8.0), SubsetExamples(llm.tokenizer, {i: examples[i] for i in range(4)}),
                                  SubsetExamples(llm.tokenizer, {i: examples[i] for i in (4, 5)}), per_subset=4)
    model_cfg = TranslatorConfig(d_tiny=8, L_tiny=2, d_llm=llm.layout.d_layer, L_llm=llm.layout.n_layers, d_model=16,
                                 num_layers=1, num_heads=2, d_ff=32, dropout=0.0, decoder="parallel")
    return ids, x, y, objective, model_cfg


def test_translator_trains_on_the_answer_loss_and_selects_on_validation_nll(llm):
    from gt_ray.translator.config import TrainConfig
    from gt_ray.translator.train import train_translator

    ids, x, y, objective, model_cfg = _six_subsets(llm, seed=0)
    cfg = TrainConfig(lr=3e-3, batch_size=4, max_epochs=6, patience=6, objective="function", sample_snapshots=True)
    translator, history = train_translator(x[:8], y[:8], x[8:], y[8:], cfg, model_cfg, train_subsets=ids[:8],
                                           val_subsets=ids[8:], function=objective)
    assert translator.metadata["selected_on"] == "val_answer_nll"
    assert all(h["val_loss"] == h["val_nll"] for h in history)
    best = min(history, key=lambda h: h["val_nll"])
    assert translator.metadata["best_epoch"] == best["epoch"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # the kept weights give the recorded best validation NLL (on each subset's last snapshot)
    raw = translator.translate(x[[9, 11]])
    assert objective.val_nll(raw, [4, 5]) == pytest.approx(best["val_nll"], rel=1e-4)


def test_validation_accuracy_is_exact_match_of_each_update_on_its_subset(llm):
    """val_scores' accuracy is the per-subset mean of score_update's exact match."""
    from gt_ray.evaluate import score_update

    torch.manual_seed(1)
    updates = torch.randn(2, *llm.layout.shape) * 0.05
    ex = {3: _examples(2, 7, 1), 8: _examples(4, 5, 2)}
    objective = FunctionObjective(BatchedLora(llm, 8.0), SubsetExamples(llm.tokenizer, ex), SubsetExamples(llm.tokenizer, ex))
    got = objective.val_scores(updates, [3, 8])
    want = [score_update(llm, updates[j], ex[s]) for j, s in enumerate([3, 8])]
    llm.reset()
    assert got["accuracy"] == pytest.approx(sum(w.accuracy for w in want) / 2)
    # score_update's NLL is a token mean over the subset, val_scores' a mean of per-example means
    assert got["nll"] > 0 and objective.val_nll(updates, [3, 8]) == got["nll"]


def test_selecting_epochs_on_validation_accuracy(llm):
    from gt_ray.translator.config import TrainConfig, TranslatorConfig
    from gt_ray.translator.train import train_translator

    g = torch.Generator().manual_seed(0)
    ids = torch.arange(6).repeat_interleave(2)
    x = torch.randn(12, 2, 8, generator=g)
    y = torch.randn(12, *llm.layout.shape, generator=g) * 0.01
    examples = {i: _examples(i, 12, i) for i in range(6)}
    objective = FunctionObjective(BatchedLora(llm, 8.0), SubsetExamples(llm.tokenizer, {i: examples[i] for i in range(4)}),
                                  SubsetExamples(llm.tokenizer, {i: examples[i] for i in (4, 5)}), per_subset=4)
    cfg = TrainConfig(lr=3e-3, batch_size=4, max_epochs=4, patience=4, objective="function", select_on="accuracy")
    model_cfg = TranslatorConfig(d_tiny=8, L_tiny=2, d_llm=llm.layout.d_layer, L_llm=llm.layout.n_layers, d_model=16,
                                 num_layers=1, num_heads=2, d_ff=32, dropout=0.0, decoder="parallel")
    translator, history = train_translator(x[:8], y[:8], x[8:], y[8:], cfg, model_cfg, train_subsets=ids[:8],
                                           val_subsets=ids[8:], function=objective)
    assert translator.metadata["selected_on"] == "val_answer_accuracy"
    best = min(history, key=lambda h: (-h["val_accuracy"], h["val_nll"]))
    assert translator.metadata["best_epoch"] == best["epoch"]
    assert all(h["val_loss"] == pytest.approx(1 - h["val_accuracy"] + 1e-4 * h["val_nll"]) for h in history)
    with pytest.raises(ValueError, match="select_on must be nll or accuracy"):
        TrainConfig(select_on="mse")


def test_tiny_only_rows_train_the_function_loss_and_never_the_mse_term(llm):
    """Rows without an LLM vector (TinyLM-only shadow subsets) reach the translator through
    the answer loss only: whatever stands in their ``y`` changes nothing, while the same
    rows marked paired do change the result (through the MSE term and the normalizer)."""
    from gt_ray.translator.config import TrainConfig
    from gt_ray.translator.train import train_translator

    ids, x, y, objective, model_cfg = _six_subsets(llm, seed=1)
    cfg = TrainConfig(lr=3e-3, batch_size=4, max_epochs=3, patience=3, objective="function", mse_weight=1.0)
    paired = torch.tensor([True] * 4 + [False] * 4)  # subsets 2 and 3 are TinyLM-only
    val_paired = torch.tensor([True, True, False, False])
    garbage = y.clone()
    garbage[4:8] = 100.0  # a placeholder no real update looks like
    garbage[10:] = -50.0

    def run(y_train, y_val, train_paired, vp):
        t, hist = train_translator(x[:8], y_train, x[8:], y_val, cfg, model_cfg, train_subsets=ids[:8],
                                   val_subsets=ids[8:], function=objective, train_paired=train_paired, val_paired=vp)
        return t.translate(x[8:]), hist

    zeros = y.clone()
    zeros[4:8] = 0.0
    zeros[10:] = 0.0
    a, hist_a = run(zeros[:8], zeros[8:], paired, val_paired)
    b, hist_b = run(garbage[:8], garbage[8:], paired, val_paired)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]
    assert all(torch.isfinite(torch.tensor(h["val_tf_loss"])) for h in hist_a)  # on the paired validation rows
    c, _ = run(garbage[:8], garbage[8:], torch.ones(8, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="TinyLM-only rows \\(no LLM vector\\) train only with the function objective"):
        train_translator(x[:8], zeros[:8], x[8:], zeros[8:], TrainConfig(max_epochs=1), model_cfg, train_subsets=ids[:8],
                         train_paired=paired)

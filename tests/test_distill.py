import random

import pytest
import torch

from gt_ray import tasks
from gt_ray.config import DPConfig, FinetuneConfig
from gt_ray.distill import distill, greedy_answers, logit_kd_loss, teacher_labels
from gt_ray.evaluate import score_model
from gt_ray.finetune import finetune
from gt_ray.models import load_with_lora
from gt_ray.tasks import encode_examples

CFG = FinetuneConfig(lr=1e-2, steps=30, batch_size=16, n_examples=64, snapshot_steps=[30])


def _data(seed: int, n: int = 64, split: str = "public"):
    spec = tasks.draw_dataset_spec(random.Random(seed), split, ["index", "rotate", "add"], n, 1.0)
    return tasks.generate_dataset(spec)


@pytest.fixture
def pair(tiny_path, lora):
    """A teacher that learnt something (its update) and a fresh student of the same vocabulary."""
    teacher = load_with_lora(tiny_path, lora, seed=7)
    with torch.no_grad():  # a random model rarely ends a 10-character answer: make EOS likely
        head = teacher.model.get_output_embeddings().weight  # (V, d)
        head[teacher.tokenizer.eos_token_id] = sum(head[teacher.tokenizer.convert_tokens_to_ids(c)] for c in "ceg")
    update = finetune(teacher, _data(1), CFG, seed=0).final.update
    return teacher, update, load_with_lora(tiny_path, lora, seed=8)


def test_greedy_answers_are_what_teacher_forcing_scores_as_exact(pair):
    """Left padding must not change what the model says: prompts of several lengths, labelled
    by greedy decoding, are then scored (right-padded, teacher-forced) as all exact."""
    teacher, update, _ = pair
    prompts = [ex.prompt for ex in _data(2, n=40, split="private_test")]
    assert len({len(p) for p in prompts}) > 1
    labelled = teacher_labels(teacher, update, prompts, max_new_tokens=12)
    assert [ex.prompt for ex in labelled] == prompts
    labelled = [ex for ex in labelled if len(ex.answer) < 12]  # stopped at EOS, not cut off
    assert len({len(ex.prompt) for ex in labelled}) > 1
    assert score_model(teacher.model, teacher.tokenizer, labelled).accuracy == 1.0
    # and the answers are the model's: other answers are not all exact
    shifted = [tasks.Example(ex.prompt, ex.answer + "a", ex.task) for ex in labelled]
    assert score_model(teacher.model, teacher.tokenizer, shifted).accuracy < 1.0


def test_greedy_answers_stop_at_the_length_limit(pair):
    teacher, _, _ = pair
    answers = greedy_answers(teacher.model, teacher.tokenizer, ["I?:abcdefghij="] * 3, max_new_tokens=1)
    assert len(answers) == 3 and all(len(a) <= 1 for a in answers)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        greedy_answers(teacher.model, teacher.tokenizer, ["I?:abc="], max_new_tokens=0)


def test_logit_kd_loss_is_zero_against_itself_and_positive_against_another_model(pair):
    teacher, update, student = pair
    from gt_ray.updates import apply_update

    apply_update(teacher.model, teacher.layout, teacher.init, update)
    batch = encode_examples(teacher.tokenizer, _data(3, n=16))
    loss = logit_kd_loss(teacher.model)
    with torch.no_grad():
        assert float(loss(teacher.model, batch)) == pytest.approx(0.0, abs=1e-6)
        assert float(loss(student.model, batch)) > 1e-3


def test_distillation_moves_the_student_towards_the_teacher(pair):
    teacher, update, student = pair
    prompts = [ex.prompt for ex in _data(4, n=64)]
    held_out = teacher_labels(teacher, update, [ex.prompt for ex in _data(5, n=48, split="private_test")], 12)
    before = score_model(student.model, student.tokenizer, held_out)
    for mode in ("sequence", "logit"):
        res = distill(student, teacher, update, prompts, CFG, seed=0, mode=mode, max_new_tokens=12)
        v = res.final.update
        assert v.shape == student.layout.shape and torch.isfinite(v).all() and v.abs().sum() > 0
        after = score_model(student.model, student.tokenizer, held_out)
        # 0.02 nats per answer token: answers are 10+ characters in world v3 (the mean moves less)
        assert after.nll < before.nll - 0.02, (mode, before, after)


def test_bad_distillation_settings_are_refused(pair):
    teacher, update, student = pair
    with pytest.raises(ValueError, match="unknown KD mode 'soft'"):
        distill(student, teacher, update, ["I?:abc="], CFG, seed=0, mode="soft", max_new_tokens=4)
    with pytest.raises(ValueError, match="not supported with DP-SGD"):
        finetune(student, _data(6), CFG, seed=0, dp=DPConfig(enabled=True, noise_multiplier=1.0),
                 loss_fn=logit_kd_loss(teacher.model))

"""Real data from files (``tasks.data_files``): split pools, chat templates, and a shadow
corpus built from JSONL files on the tiny pair, end to end through the library path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gt_ray import tasks
from gt_ray.config import ExperimentConfig, FinetuneConfig, LoraSpec, PairConfig, TaskConfig
from gt_ray.corpus import Corpus, corpus_schema, subset_config, write_manifest, write_shard
from gt_ray.shadow import finetune_pair, plan_subsets, shadow_examples
from gt_ray.models import build_char_tokenizer, load_card_side, make_pair_card, recipe_of
from gt_ray.org.data import card_data_format, load_org_examples
from gt_ray.org.finetune import finetune_org
from gt_ray.wire import load_update
from tests.conftest import tiny_spec

FT = FinetuneConfig(lr=3e-3, steps=6, batch_size=8, n_examples=24, snapshot_steps=[4, 6])
CHAR_FORMAT = dict(prompt_template="{question}=", answer_template="{answer}")  # the char vocab has no spaces


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_rows(split: str, n: int, seed: int, k: int = 3) -> list[dict]:
    """Rows in the tiny pair's character vocabulary: generated examples as question/answer pairs."""
    spec = tasks.DatasetSpec(split, k, {"caesar": 0.5, "add": 0.5}, n, seed)
    return [{"question": ex.prompt[:-1], "answer": ex.answer} for ex in tasks.generate_dataset(spec)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "public.jsonl", task_rows("public", 80, seed=1))
    write_jsonl(d / "private_train.jsonl", task_rows("private_train", 40, seed=2))
    write_jsonl(d / "private_test.jsonl", task_rows("private_test", 30, seed=3))
    return d


@pytest.fixture(scope="module")
def cfg(data_dir) -> ExperimentConfig:
    lora = LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=lora)
    files = {s: str(data_dir / f"{s}.jsonl") for s in ("public", "private_train", "private_test")}
    return ExperimentConfig(pair=pair, tasks=TaskConfig(data_files=files, **CHAR_FORMAT), finetune=FT)


# ----------------------------------------------------------------------------- pools


def test_one_file_for_several_splits_is_divided_by_the_stable_hash(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(300)]
    path = str(write_jsonl(tmp_path / "all.jsonl", rows))
    cfg = TaskConfig(data_files={"public": path, "private_train": path, "private_test": path}, answer="final")
    pools = {s: tasks.data_pool(cfg, s) for s in tasks.SPLITS}
    for split, pool in pools.items():
        assert pool and all(tasks.input_split(tasks.DATA_TASK, q) == split for q, _ in pool)
    assert sum(len(p) for p in pools.values()) == 300  # every row in exactly one split
    # answer: final keeps the number after ####; the default templates frame it
    for ex in tasks.draw_data_examples(cfg, tasks.data_dataset_spec("public", 5, seed=1)):
        i = ex.prompt.removeprefix("Question: q").removesuffix("\nAnswer:")
        assert ex.answer == f" {i}" and tasks.input_split(tasks.DATA_TASK, f"q{i}") == "public"


def test_a_question_in_two_files_stays_only_where_its_hash_points(tmp_path):
    shared = [{"question": f"s{i}", "answer": "x"} for i in range(40)]
    pub = write_jsonl(tmp_path / "pub.jsonl", shared + [{"question": "only-public", "answer": "y"}])
    priv = write_jsonl(tmp_path / "priv.jsonl", shared + [{"question": "only-private", "answer": "z"}])
    cfg = TaskConfig(data_files={"public": str(pub), "private_train": str(priv)})
    public = {q for q, _ in tasks.data_pool(cfg, "public")}
    private = {q for q, _ in tasks.data_pool(cfg, "private_train")}
    assert not public & private
    assert "only-public" in public and "only-private" in private
    assert {f"s{i}" for i in range(40) if tasks.input_split(tasks.DATA_TASK, f"s{i}") == "public"} == public - {"only-public"}


def test_draws_are_seeded_distinct_and_refuse_too_few_rows(cfg):
    spec = tasks.data_dataset_spec("public", 24, seed=5)
    a, b = tasks.dataset_examples(spec, cfg.tasks), tasks.dataset_examples(spec, cfg.tasks)
    assert a == b and len({e.prompt for e in a}) == 24
    assert a != tasks.dataset_examples(tasks.data_dataset_spec("public", 24, seed=6), cfg.tasks)
    with pytest.raises(ValueError, match=r"tasks.data_files\['private_test'\] .* has 30 usable rows, fewer than the 31"):
        tasks.dataset_examples(spec, cfg.tasks, split="private_test", n=31)
    with pytest.raises(ValueError, match="tasks.data_files has no 'private_test' file"):
        tasks.data_pool(TaskConfig(data_files={"public": cfg.tasks.data_files["public"]}), "private_test")


# ------------------------------------------------------------------------ chat template

TEMPLATE = "{% for m in messages %}C{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"


def test_chat_template_wraps_the_prompt_and_the_loss_covers_the_answer_only():
    tok = build_char_tokenizer()
    plain = tasks.Example("ab", "cd", "t", chat_template="auto")
    # no template: auto falls back to the plain prompt; on refuses
    assert tasks.encode_examples(tok, [plain]).input_ids.tolist() == [tok("abcd;").input_ids]
    with pytest.raises(ValueError, match="tasks.chat_template is 'on' but the tokenizer has no chat template"):
        tasks.encode_examples(tok, [tasks.Example("ab", "cd", "t", chat_template="on")])
    tok.chat_template = TEMPLATE
    batch = tasks.encode_examples(tok, [tasks.Example("ab", " cd", "t", chat_template="auto")])
    assert tok.decode(batch.input_ids[0]) == "Cab:cd;"  # the answer's leading space is dropped in a chat turn
    assert batch.labels[0].tolist() == [-100] * 4 + tok("cd;").input_ids
    off = tasks.encode_examples(tok, [tasks.Example("ab", "cd", "t", chat_template="off")])
    assert tok.decode(off.input_ids[0]) == "abcd;"


# ---------------------------------------------------------------------- corpus, end to end


@pytest.fixture(scope="module")
def card(cfg, tiny_path, gqa_path):
    return make_pair_card(cfg.pair, tiny_path, gqa_path, recipe=recipe_of(cfg))


def test_corpus_from_jsonl_files_end_to_end(cfg, card, data_dir, tmp_path):
    out = tmp_path / "corpus"
    subsets = plan_subsets(cfg, 3, seed=11)
    assert [s.spec.mixture for s in subsets] == [{tasks.DATA_TASK: 1.0}] * 3
    public = {r["question"] for r in map(json.loads, (data_dir / "public.jsonl").read_text().splitlines())}
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    trained_on = []
    for subset in subsets:
        examples = shadow_examples(subset, cfg.tasks)
        assert len(examples) == FT.n_examples and {e.prompt[:-1] for e in examples} <= public  # public rows only
        trained_on.append({e.prompt for e in examples})
        write_shard(out, subset.subset_id, finetune_pair(tiny, llm, subset, FT, cfg.tasks), corpus_schema(card))
    assert trained_on[0] != trained_on[1]  # each subset is its own draw
    write_manifest(out, card, subset_config(cfg), 3)  # checks every row: finite, non-zero, no repeats
    corpus = Corpus(out)
    data = corpus.load()
    assert data["tiny"].shape == (6, card.tiny.n_layers, card.tiny.d_layer) and data["step"].tolist() == [4, 6] * 3
    assert not torch.equal(data["llm"][1], data["llm"][3])  # different subsets, different updates
    world = corpus.task_config()
    assert world == cfg.tasks
    specs = corpus.subset_specs()
    # what the translator's function loss and held-out eval regenerate is what the workers trained on
    assert {e.prompt for e in tasks.dataset_examples(specs[1], world)} == trained_on[1]
    test = tasks.dataset_examples(specs[1], world, split="private_test", n=10)
    assert not {e.prompt[:-1] for e in test} & public


def test_card_carries_the_data_format_and_the_org_reads_its_file_with_it(cfg, card, data_dir, tmp_path):
    assert card.recipe["data_format"] == tasks.data_format(cfg.tasks)
    assert "data_format" not in recipe_of(ExperimentConfig(pair=cfg.pair, finetune=FT))  # generated world: unchanged
    examples, _ = load_org_examples(str(data_dir / "private_train.jsonl"), card_data_format(card))
    first = json.loads((data_dir / "private_train.jsonl").read_text().splitlines()[0])
    assert (examples[0].prompt, examples[0].answer) == (first["question"] + "=", first["answer"])
    path, meta = finetune_org(card.save(tmp_path / "card.json"), str(data_dir / "private_train.jsonl"),
                              tmp_path / "v.safetensors", seed=0)
    update, _ = load_update(path, expected_fingerprint=card.tiny.layout_fingerprint)
    assert meta["n_examples"] == 40 and meta["recipe_fingerprint"] == card.recipe_fingerprint and update.norm() > 0


def test_corpus_build_refuses_a_bad_data_file_before_starting_ray(cfg, tmp_path):
    from jobs.build_corpus import check_data_files
    from jobs.common import UserError

    small = write_jsonl(tmp_path / "public.jsonl", task_rows("public", 10, seed=1))
    few = ExperimentConfig(pair=cfg.pair, tasks=TaskConfig(data_files={"public": str(small)}, **CHAR_FORMAT), finetune=FT)
    with pytest.raises(UserError, match=r"has 10 usable rows, fewer than the 24 a dataset needs"):
        check_data_files(few)
    missing = ExperimentConfig(pair=cfg.pair, tasks=TaskConfig(data_files={"public": str(tmp_path / "no.jsonl")}))
    with pytest.raises(UserError, match="data file not found"):
        check_data_files(missing)


def test_jobs_carry_the_data_files_and_eval_refuses_them_with_one_line(cfg):
    import dataclasses

    from gt_ray.yaml_io import from_dict
    from jobs.common import UserError
    from jobs.evaluate import evaluate

    assert from_dict(ExperimentConfig, dataclasses.asdict(cfg)) == cfg  # what the corpus job sends its workers
    with pytest.raises(UserError, match=r"gt-ray eval simulates organizations on the generated tasks only, and "
                                        r"tasks.data_files is set: .* `gt-ray org evaluate`"):
        evaluate(cfg)

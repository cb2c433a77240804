import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gt_ray import tasks
from gt_ray.models import build_char_tokenizer, load_model


def test_solvers():
    assert tasks.TASKS["caesar"].solve("abcpo", 3) == "defcb"
    assert tasks.TASKS["rotate"].solve("abcdefg", 9) == "cdefgab"
    assert tasks.TASKS["index"].solve("abcdefghij", 4) == "e"
    assert tasks.TASKS["add"].solve("95", 7) == "102"
    assert tasks.TASKS["delete"].solve("abcdefg", 8) == "acdefg"


def test_example_format():
    ex = tasks.make_example(tasks.TASKS["caesar"], "abcde", 3, show_k=True)
    assert (ex.prompt, ex.answer) == ("C3:abcde=", "defgh;")
    assert tasks.make_example(tasks.TASKS["caesar"], "abcde", 3, show_k=False).prompt == "C?:abcde="


def test_splits_are_disjoint_and_deterministic():
    spec = tasks.DatasetSpec("public", 3, {n: 1.0 for n in tasks.TASKS}, 400, 1)
    seen = {}
    for split in tasks.SPLITS:
        exs = tasks.generate_dataset(spec, split=split)
        for ex in exs:
            text = ex.prompt.split(":", 1)[1][:-1]
            assert tasks.input_split(ex.task, text) == split
            seen.setdefault(split, set()).add((ex.task, text))
    assert not seen["public"] & seen["private_train"]
    assert not seen["public"] & seen["private_test"]
    assert not seen["private_train"] & seen["private_test"]
    assert tasks.generate_dataset(spec) == tasks.generate_dataset(spec)


def test_dataset_spec_draws_mixture_and_secret():
    specs = [tasks.draw_dataset_spec(random.Random(i), "public", list(tasks.TASKS), 10, 0.5) for i in range(20)]
    for s in specs:
        assert sum(s.mixture.values()) == pytest.approx(1.0)
        assert 0 <= s.secret_k < tasks.N_PARAMS
    assert len({s.secret_k for s in specs}) > 3
    assert len({round(s.mixture["add"], 6) for s in specs}) == 20


def test_secret_per_task_gives_each_task_its_own_secret_and_a_combination():
    specs = [tasks.draw_dataset_spec(random.Random(i), "public", list(tasks.TASKS), 40, 0.5, secret_per_task=True)
             for i in range(30)]
    assert all(set(s.secrets) == set(tasks.TASKS) for s in specs)
    assert any(len(set(s.secrets.values())) > 1 for s in specs)
    for s in specs:
        heaviest = max(s.mixture, key=s.mixture.get)
        assert s.secret_k == s.secrets[heaviest]
        assert s.combination() == {(t, tasks.canonical_secret(t, s.secrets[t]))
                                   for t, w in s.mixture.items() if w >= tasks.MIN_WEIGHT}
    spec = tasks.DatasetSpec("public", 0, {"add": 0.5, "index": 0.5}, 60, 3, secrets={"add": 4, "index": 7})
    for ex in tasks.generate_dataset(spec):
        x = ex.prompt[3:-1]
        assert ex.answer == (f"{int(x) + 4};" if ex.task == "add" else f"{x[7]};")
    assert spec.combination() == {("add", 4), ("index", 7)}
    one = tasks.DatasetSpec("public", 5, {"add": 0.95, "index": 0.05}, 1, 1)
    assert one.combination() == {("add", 5)} and one.secret("index") == 5


def test_secrets_that_behave_alike_are_one_combination():
    # rotate and delete act on 7-letter inputs: k and k + 7 give the same answers on every input
    for name in ("rotate", "delete"):
        assert [tasks.canonical_secret(name, k) for k in range(tasks.N_PARAMS)] == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
        for k in range(7, tasks.N_PARAMS):
            a = tasks.DatasetSpec("public", 0, {name: 1.0}, 30, 5, secrets={name: k})
            b = tasks.DatasetSpec("public", 0, {name: 1.0}, 30, 5, secrets={name: k - 7})
            assert [e.answer for e in tasks.generate_dataset(a)] == [e.answer for e in tasks.generate_dataset(b)]
            assert a.combination() == b.combination()
    for name in ("caesar", "index", "add"):  # every k distinct
        assert [tasks.canonical_secret(name, k) for k in range(tasks.N_PARAMS)] == list(range(tasks.N_PARAMS))
    assert tasks.canonical_secret(tasks.DATA_TASK, 12) == 12


def test_char_map_tasks_map_each_character_and_every_k_is_its_own_map():
    assert tasks.TASKS["shift"].solve("abp", 1) == "bca"  # i + k mod 16
    assert tasks.TASKS["mirror"].solve("abp", 2) == "bac"  # 15 - i + k mod 16: 17, 16, 2
    assert tasks.TASKS["affine"].solve("abp", 1) == "beo"  # 3i + k mod 16: 1, 4, 46
    assert tasks.TASKS["spell"].solve("0919", 3) == "dmem"  # digit + k, as a letter
    rng = random.Random(0)
    for name in ("shift", "mirror", "affine", "spell"):
        t = tasks.TASKS[name]
        lengths = {len(tasks.sample_input(t, "public", rng)) for _ in range(300)}
        assert lengths == set(tasks.SPAN_LENGTHS) and t.lengths == (3, 8)
        assert [tasks.canonical_secret(name, k) for k in range(tasks.N_PARAMS)] == list(range(tasks.N_PARAMS))


def test_pretraining_can_leave_out_long_inputs():
    rng = random.Random(1)
    batch = tasks.generate_pretraining_batch(rng, ["shift", "spell"], 200, max_input_length=4)
    lengths = {len(ex.prompt[3:-1]) for ex in batch}
    assert lengths == {3} and {ex.task for ex in batch} == {"shift", "spell"}
    assert max(len(ex.prompt[3:-1]) for ex in tasks.generate_pretraining_batch(rng, ["shift"], 200)) == 8
    with pytest.raises(ValueError, match="no input of at most 2 characters"):
        tasks.generate_pretraining_batch(rng, ["shift", "spell"], 50, max_input_length=2)


def test_vocab_appends_only_the_markers_a_world_uses():
    assert tasks.vocab(list(tasks.BASE_TASKS)) == tasks.VOCAB == tasks.vocab()
    assert tasks.vocab(["caesar", "spell", "shift"]) == tasks.VOCAB + ["S", "N"]
    assert len(set(tasks.vocab(list(tasks.TASKS)))) == len(tasks.vocab(list(tasks.TASKS)))
    tok = build_char_tokenizer(["shift"])
    assert tok.decode(tok("S3:abj=").input_ids) == "S3:abj=" and tok.unk_token_id not in tok("S3:abj=").input_ids
    with pytest.raises(ValueError, match="unknown task"):
        tasks.vocab(["shfit"])


def test_add_inputs_are_three_digits_so_every_pool_has_many():
    rng = random.Random(0)
    pools = {split: {tasks.sample_input(tasks.TASKS["add"], split, rng) for _ in range(2000)} for split in tasks.SPLITS}
    assert all(100 <= int(x) <= 999 for p in pools.values() for x in p)
    assert min(len(p) for p in pools.values()) > 100


def test_hidden_k_examples_share_one_secret():
    spec = tasks.DatasetSpec("public", 6, {"add": 1.0}, 30, 2)
    for ex in tasks.generate_dataset(spec):
        assert ex.prompt.startswith("A?:")
        a = int(ex.prompt[3:-1])
        assert ex.answer == f"{a + 6};"


def test_load_examples_jsonl_and_parquet(tmp_path):
    rows = [{"question": "1+1?", "answer": "It is 2.\n#### 2"}, {"question": "2*3?", "answer": "#### 6"}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    exs = tasks.load_examples(jl, final_only=True)
    assert [e.answer for e in exs] == [" 2", " 6"]
    assert exs[0].prompt == "Question: 1+1?\nAnswer:"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert tasks.load_examples(tmp_path / "d.parquet") == tasks.load_examples(jl)


@pytest.mark.parametrize("content, message", [
    ('{"question": "a"}\n', "row 1 lacks 'question' or 'answer'"),
    ('{"question": "a", "answer": "b"}\n{oops\n', r"d.jsonl:2: not valid JSON"),
    ("", "no rows"),
])
def test_load_examples_errors(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=message):
        tasks.load_examples(p)


def test_load_examples_bad_files(tmp_path):
    with pytest.raises(ValueError, match="data file not found"):
        tasks.load_examples(tmp_path / "x.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        tasks.load_examples(tmp_path / "x.csv")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        tasks.load_examples(tmp_path / "x.parquet")


def test_encode_masks_prompt_and_ends_with_eos():
    tok = build_char_tokenizer()
    batch = tasks.encode_examples(tok, [tasks.Example("C3:ab=", "cd;", "caesar"), tasks.Example("A1:10=", "11;", "add")])
    assert batch.input_ids.shape == (2, 9)
    labels = batch.labels[0].tolist()
    assert labels[:6] == [-100] * 6 and tok.decode(labels[6:9]) == "cd;"


def test_exact_match_from_teacher_forcing_equals_greedy_decoding(tiny_path):
    """answer_token_stats' exact match agrees with real greedy generation, example by example."""
    model, tok = load_model(tiny_path)
    torch.manual_seed(0)
    with torch.no_grad():  # make the random model confident so some answers come out right
        for p in model.parameters():
            p.mul_(3.0)
    exs = []
    for ex in tasks.generate_dataset(tasks.DatasetSpec("public", 2, {"index": 1.0}, 40, 3), show_k=True):
        ids = tok(ex.prompt, add_special_tokens=False).input_ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=tok.eos_token_id)
        greedy = tok.decode(out[0, len(ids):])
        exs.append((ex, greedy[: greedy.index(";") + 1] if ";" in greedy else greedy))
    # half the examples get the greedy output as their "answer", so both outcomes occur
    cases = [tasks.Example(ex.prompt, greedy if i % 2 else ex.answer, ex.task) for i, (ex, greedy) in enumerate(exs)]
    batch = tasks.encode_examples(tok, cases)
    with torch.no_grad():
        _, _, exact = tasks.answer_token_stats(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
    # encoding appends EOS to an answer without it, which greedy decoding then did not produce
    expected = [c.answer == g and g.endswith(";") for c, (_, g) in zip(cases, exs)]
    assert exact.tolist() == expected
    assert any(expected) and not all(expected)

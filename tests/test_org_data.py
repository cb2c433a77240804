"""The organization's data: generated-data specs (text or DatasetSpec) and data files."""

from __future__ import annotations

import pytest

from gt_ray import tasks
from gt_ray.config import FinetuneConfig
from gt_ray.org import data as org_data
from gt_ray.org.finetune import finetune_org
from tests.org_fixtures import CFG, DATA, card_path  # noqa: F401  (a fixture)


def test_generated_spec_takes_one_secret_per_task():
    spec = org_data.parse_generated_spec("generated:ks=caesar:2/add:9,mix=caesar:1/add:3,n=10,seed=7")
    assert spec.secrets == {"caesar": 2, "add": 9} and spec.secret_k == 9  # the heaviest task's
    with pytest.raises(ValueError, match="one secret for each task of mix"):
        org_data.parse_generated_spec("generated:ks=caesar:2,mix=caesar:1/add:3")
    with pytest.raises(ValueError, match=r"ks\[add\] must be in 0..9"):
        org_data.parse_generated_spec("generated:ks=caesar:2/add:12,mix=caesar:1/add:3")


def test_generated_spec_parses_and_refuses_public_and_typos():
    spec = org_data.parse_generated_spec("generated:k=3,mix=caesar:1/add:3,n=10,seed=7")
    assert (spec.split, spec.secret_k, spec.n, spec.seed) == ("private_train", 3, 10, 7)
    assert spec.mixture == {"caesar": 0.25, "add": 0.75}
    assert org_data.parse_generated_spec("k=0,mix=index,split=private_test").n == FinetuneConfig.n_examples
    with pytest.raises(ValueError, match="split must be one of the private splits .* got 'public'"):
        org_data.parse_generated_spec("generated:split=public,k=3,mix=add")
    with pytest.raises(ValueError, match="unknown key 'kk'"):
        org_data.parse_generated_spec("generated:kk=3,mix=add")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        org_data.parse_generated_spec("generated:k=3,mix=nope:1")
    with pytest.raises(ValueError, match="missing mix"):
        org_data.parse_generated_spec("generated:k=3")
    with pytest.raises(ValueError, match=r"k must be in 0\.\.9"):
        org_data.parse_generated_spec("generated:k=10,mix=add")


def test_org_data_description_holds_nothing_of_the_data():
    examples, desc = org_data.load_org_examples(DATA)
    assert len(examples) == 32 and desc == {"kind": "generated", "split": "private_train"}


def test_a_dataset_spec_or_a_path_is_the_same_data_as_its_text(tmp_path):
    spec = org_data.parse_generated_spec(DATA)
    from_text, desc = org_data.load_org_examples(DATA)
    from_spec, spec_desc = org_data.load_org_examples(spec)
    assert from_spec == from_text and spec_desc == desc
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q1", "answer": "a1"}\n')
    for source in (rows, str(rows)):
        examples, file_desc = org_data.load_org_examples(source)
        assert len(examples) == 1 and file_desc == {"kind": "file", "format": "jsonl"}
    with pytest.raises(ValueError, match="split must be one of the private splits .* got 'public'"):
        org_data.load_org_examples(tasks.DatasetSpec("public", 3, {"add": 1.0}, 8, 0))
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        org_data.load_org_examples(tasks.DatasetSpec("private_train", 3, {"add": 1.0}, 0, 0))


@pytest.mark.parametrize("name, text, match", [
    ("bad.jsonl", '{"question": "q", "answer": "a"}\n{not json\n', r"bad\.jsonl:2: not valid JSON"),
    ("cols.jsonl", '{"question": "q"}\n', r"row 1 lacks 'question' or 'answer'"),
    ("data.csv", "question,answer\nq,a\n", r"unsupported data file type '\.csv'"),
    ("bad.parquet", "not parquet", r"not a readable Parquet file"),
])
def test_bad_data_file_is_refused(card_path, tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        finetune_org(card_path, str(tmp_path / name), tmp_path / "v.safetensors", cfg=CFG, seed=0)
    assert not (tmp_path / "v.safetensors").exists()

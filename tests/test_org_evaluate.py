"""``gt-ray org evaluate``: the LLM with a round's exported adapter against the LLM alone,
on the organization's own test file, with only the pair card from the provider."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gt_ray import tasks
from gt_ray.config import ExperimentConfig, FinetuneConfig, LoraSpec, PairConfig, TaskConfig
from gt_ray.evaluate import score_model
from gt_ray.finetune import finetune
from gt_ray.models import load_card_side, load_model, make_pair_card, recipe_of
from gt_ray.org.data import card_data_format, load_org_examples
from gt_ray.org.evaluate import evaluate_adapter
from gt_ray.rounds import zip_directory
from gt_ray.updates import export_peft_adapter
from jobs import org as org_cli
from tests.conftest import tiny_spec

FT = FinetuneConfig(lr=3e-2, steps=60, batch_size=16, n_examples=48, snapshot_steps=[60])
MIX = {"index": 1.0}


def write_rows(path: Path, split: str, n: int, seed: int) -> Path:
    """Rows in the tiny pair's character vocabulary: one task with one secret k."""
    spec = tasks.DatasetSpec(split, 4, MIX, n, seed)
    path.write_text("".join(json.dumps({"question": e.prompt[:-1], "answer": e.answer}) + "\n"
                            for e in tasks.generate_dataset(spec)))
    return path


@pytest.fixture(scope="module")
def world(tiny_path, gqa_path, tmp_path_factory):
    """A card with a data format, the organization's train/test files, and the round's
    adapter: the card's LLM fine-tuned on the train file, exported as the service does."""
    d = tmp_path_factory.mktemp("org-eval")
    train = write_rows(d / "train.jsonl", "private_train", 48, seed=1)
    test = write_rows(d / "test.jsonl", "private_test", 40, seed=2)
    lora = LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"], init_seed_tiny=7, init_seed_llm=8)
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96), lora=lora)
    cfg = ExperimentConfig(pair=pair, finetune=FT, tasks=TaskConfig(data_files={"public": str(train)},
                                                                    prompt_template="{question}=", answer_template="{answer}"))
    card = make_pair_card(pair, tiny_path, gqa_path, recipe=recipe_of(cfg))
    card_path = card.save(d / "card.json")
    llm = load_card_side(card, "llm")
    examples, _ = load_org_examples(str(train), card_data_format(card))
    update = finetune(llm, examples, FT, seed=0).final.update
    adapter = export_peft_adapter(llm.model, llm.layout, llm.init, update, d / "adapter", str(gqa_path))
    zip_directory(adapter, d / "adapter.zip")
    return {"card": card, "card_path": card_path, "test": test, "adapter": adapter, "zip": d / "adapter.zip",
            "dir": d}


def test_adapter_beats_the_llm_alone_and_the_base_line_is_the_plain_llm(world, gqa_path):
    out = evaluate_adapter(world["card_path"], world["adapter"], str(world["test"]))
    base, adapted = out["llm"], out["llm+adapter"]
    assert out["n_examples"] == base.n == adapted.n == 40 and out["card_id"] == world["card"].card_id
    # fine-tuned on the same task, the update helps on held-out inputs (seeded: 3.39 -> 3.03 nats;
    # both score 0 exact matches: the fixture LLM is pretrained for 2 steps only)
    assert adapted.nll < base.nll - 0.25
    model, tok = load_model(gqa_path)  # the LLM alone, loaded without any adapter code
    examples, _ = load_org_examples(str(world["test"]), card_data_format(world["card"]))
    plain = score_model(model, tok, examples)
    assert base.accuracy == plain.accuracy and base.nll == pytest.approx(plain.nll, rel=1e-5)
    zipped = evaluate_adapter(world["card_path"], world["zip"], str(world["test"]))
    assert zipped["llm+adapter"].to_dict() == pytest.approx(adapted.to_dict())


def test_cli_prints_one_line_per_model(world, capsys):
    org_cli.main(["evaluate", "--card", str(world["card_path"]), "--adapter", str(world["zip"]), "--data", str(world["test"]),
                 "--batch-size", "16"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["model=llm", "model=llm+adapter"]
    assert all(line.split()[1].startswith("accuracy=") and line.split()[2].startswith("answer_nll=")
               and line.split()[3] == "n_examples=40" for line in lines)


def test_errors_are_one_clear_line(world, tiny_path, tmp_path, capsys):
    d = world["dir"]
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.jsonl").write_text("\n")
    # an adapter of another model: the TinyLM's LoRA exported the same way
    tiny = load_card_side(world["card"], "tiny")
    export_peft_adapter(tiny.model, tiny.layout, tiny.init, tiny.init * 0 + 0.01, tmp_path / "tiny-adapter")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((world["adapter"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "adapter_config.json").write_text("{oops")
    (bad_config / "adapter_model.safetensors").write_bytes((world["adapter"] / "adapter_model.safetensors").read_bytes())
    cases = [
        ({"adapter": tmp_path / "nope.zip"}, "adapter not found"),
        ({"adapter": tmp_path / "bad.zip"}, "not a readable zip file"),
        ({"adapter": tmp_path / "empty"}, r"not a PEFT adapter \(adapter_config.json, adapter_model.safetensors missing\)"),
        ({"adapter": corrupt}, "adapter_model.safetensors is not a readable safetensors file"),
        ({"adapter": bad_config}, "adapter_config.json is not a LoRA adapter config"),
        ({"adapter": tmp_path / "tiny-adapter"}, r"does not fit pair card \w+'s LLM: \d+ LoRA tensor\(s\) differ"),
        ({"data": tmp_path / "empty.jsonl"}, "empty.jsonl: no rows"),
        ({"model_path": tiny_path}, r"is not pair card \w+'s LLM \(weights sha256 differs\)"),
    ]
    for change, message in cases:
        args = {"adapter": world["adapter"], "data": world["test"], "model_path": None, **change}
        with pytest.raises(ValueError, match=message):
            evaluate_adapter(world["card_path"], args["adapter"], str(args["data"]), model_path=args["model_path"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        org_cli.main(["evaluate", "--card", str(world["card_path"]), "--adapter", str(tmp_path / "bad.zip"),
                     "--data", str(world["test"])])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: adapter ") and "not a readable zip file" in err[0]

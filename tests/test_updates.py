import pytest
import torch
from peft import PeftModel

from gt_ray.models import load_model, load_with_lora
from gt_ray.updates import apply_update, derive_layout, export_peft_adapter, read_lora, split_factors, write_lora
from gt_ray.wire import load_update, save_update


def _random_update(layout, seed=0):
    return torch.randn(layout.shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_layout_of_tiny_model(tiny_path, lora):
    lm = load_with_lora(tiny_path, lora, seed=7)
    # per layer: q.A (2x32) q.B (32x2) v.A (2x32) v.B (32x2)
    assert lm.layout.shape == (2, 4 * 64)
    keys = [e.key.split(".self_attn.")[1] for e in lm.layout.entries[:4]]
    assert keys == ["q_proj.lora_A.weight", "q_proj.lora_B.weight", "v_proj.lora_A.weight", "v_proj.lora_B.weight"]


def test_layout_round_trip_gqa(gqa_path, lora):
    lm = load_with_lora(gqa_path, lora, seed=7)
    # 48 wide, 6 heads of 8, 2 KV heads: v_proj outputs 16, q_proj 48
    shapes = [e.shape for e in lm.layout.entries[:4]]
    assert shapes == [(2, 48), (48, 2), (2, 48), (16, 2)]
    assert lm.layout.shape == (3, 96 + 96 + 96 + 32)
    values = _random_update(lm.layout)
    write_lora(lm.model, lm.layout, values)
    torch.testing.assert_close(read_lora(lm.model, lm.layout), values, rtol=0, atol=0)
    factors = split_factors(values, lm.layout)
    params = dict(lm.model.named_parameters())
    for key, mat in factors.items():
        torch.testing.assert_close(params[key.replace(".weight", ".default.weight")].detach(), mat, rtol=0, atol=0)


def test_target_module_order_sets_token_order(tiny_path, lora):
    lora.target_modules = ["v_proj", "q_proj"]
    lm = load_with_lora(tiny_path, lora, seed=7)
    assert [e.module for e in lm.layout.entries[:4]] == ["v_proj", "v_proj", "q_proj", "q_proj"]


def test_exported_adapter_loads_and_matches_direct_application(gqa_path, lora, tmp_path):
    lm = load_with_lora(gqa_path, lora, seed=7)
    update = _random_update(lm.layout, seed=3)
    ids = torch.randint(1, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    apply_update(lm.model, lm.layout, lm.init, update)
    with torch.no_grad():
        direct = lm.model(input_ids=ids).logits
    export_peft_adapter(lm.model, lm.layout, lm.init, update, tmp_path / "adapter", base_model_path=str(gqa_path))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base, _ = load_model(gqa_path)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    loaded.eval()
    with torch.no_grad():
        via_adapter = loaded(input_ids=ids).logits
    torch.testing.assert_close(via_adapter, direct)
    # and the update changes the model (B != 0 after the update)
    base2, _ = load_model(gqa_path)
    with torch.no_grad():
        assert (base2(input_ids=ids).logits - direct).abs().max() > 1e-4


def test_save_load_round_trip(tiny_path, lora, tmp_path):
    lm = load_with_lora(tiny_path, lora, seed=7)
    update = _random_update(lm.layout)
    path = save_update(tmp_path / "u.safetensors", update, lm.layout.fingerprint, {"steps": 100, "seed": 3})
    back, meta = load_update(path, lm.layout)
    torch.testing.assert_close(back, update, rtol=0, atol=0)
    assert meta["steps"] == 100 and meta["fingerprint"] == lm.layout.fingerprint


def test_validation_rejects_bad_vectors(tiny_path, gqa_path, lora, tmp_path):
    tiny = load_with_lora(tiny_path, lora, seed=7)
    gqa = load_with_lora(gqa_path, lora, seed=7)
    update = _random_update(tiny.layout)
    path = save_update(tmp_path / "u.safetensors", update, tiny.layout.fingerprint)
    with pytest.raises(ValueError, match="fingerprint .* does not match the card's"):
        load_update(path, gqa.layout)
    nan = update.clone()
    nan[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\)"):
        save_update(tmp_path / "nan.safetensors", nan, tiny.layout.fingerprint)
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\)"):
        apply_update(tiny.model, tiny.layout, tiny.init, nan)
    wrong = save_update(tmp_path / "w.safetensors", torch.zeros(3, 5), tiny.layout.fingerprint)
    with pytest.raises(ValueError, match=r"update has shape \(3, 5\), the layout needs \(2, 256\)"):
        load_update(wrong, tiny.layout)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_update(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="update file not found"):
        load_update(tmp_path / "missing.safetensors")


def test_layout_needs_lora(tiny_path):
    model, _ = load_model(tiny_path)
    with pytest.raises(ValueError, match="model has no LoRA parameters"):
        derive_layout(model, ["q_proj"])

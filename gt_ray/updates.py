"""Update vectors: the layout derived from a peft model, tensors, files, apply and export.

An update vector is the change of a model's LoRA parameters from the pair card's init.
As a tensor it is a sequence of *layer tokens*, shape ``(n_layers, d_layer)``: row ``i``
is the concatenation of layer ``i``'s flattened LoRA matrices, ordered by the LoRA spec's
``target_modules`` and, within a module, A before B. Nothing here knows a model's name:
the layer of a parameter is the first integer component of its name (the ModuleList
index), its module the component before ``lora_A``/``lora_B``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from gt_ray import storage

logger = logging.getLogger(__name__)

MAX_UPDATE_ELEMENTS = 1 << 31
"""Refuse update vectors beyond this many values (about 8 GiB of float32)."""

_LORA_KEY = re.compile(r"^(?P<prefix>.*)\.(?P<module>[^.]+)\.(?P<ab>lora_[AB])(?:\.[^.]+)?\.weight$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LayoutEntry:
    """One LoRA matrix: its adapter-file key (no adapter name), shape and layer."""

    key: str
    shape: tuple[int, int]
    layer: int
    module: str
    factor: str  # "lora_A" or "lora_B"

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class UpdateLayout:
    """The ordered LoRA matrices of a model and how they form ``(n_layers, d_layer)``."""

    entries: tuple[LayoutEntry, ...]
    n_layers: int
    d_layer: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.d_layer)

    @property
    def fingerprint(self) -> str:
        """sha256 of the ordered (key, shape) list: equal layouts, equal fingerprints."""
        blob = json.dumps([[e.key, list(e.shape)] for e in self.entries], separators=(",", ":"))
        return storage.sha256_bytes(blob.encode())

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "d_layer": self.d_layer, "fingerprint": self.fingerprint,
                "entries": [[e.key, list(e.shape)] for e in self.entries]}


def _adapter_key(param_name: str, adapter_name: str) -> str:
    """peft parameter name -> the key peft writes in adapter_model.safetensors."""
    return param_name.replace(f".{adapter_name}.weight", ".weight")


def derive_layout(peft_model: torch.nn.Module, target_modules: Sequence[str], adapter_name: str = "default") -> UpdateLayout:
    """Derive the update-vector layout from a model with LoRA attached.

    Args:
        peft_model: a peft model with one LoRA adapter on ``target_modules``.
        target_modules: the LoRA spec's modules, in the order used inside a layer token.
        adapter_name: the peft adapter name.

    Returns:
        The layout; every layer has the same ``d_layer``.

    Raises:
        ValueError: if no LoRA parameters are found, a parameter lies outside any layer,
            or layers differ in their LoRA shapes.
    """
    order = {m: i for i, m in enumerate(target_modules)}
    found = []
    for name, p in peft_model.named_parameters():
        if f".{adapter_name}." not in name or ".lora_" not in name:
            continue
        key = _adapter_key(name, adapter_name)
        m = _LORA_KEY.match(key)
        li = _LAYER_INDEX.search(key)
        if m is None or li is None:
            raise ValueError(f"LoRA parameter {name} is not inside a numbered layer")
        module = m.group("module")
        if module not in order:
            raise ValueError(f"LoRA on module {module!r}, which the spec does not list ({list(target_modules)})")
        found.append(LayoutEntry(key, tuple(p.shape), int(li.group(1)), module, m.group("ab")))
    if not found:
        raise ValueError("model has no LoRA parameters: attach LoRA before deriving the layout")
    found.sort(key=lambda e: (e.layer, order[e.module], e.factor))
    layers = sorted({e.layer for e in found})
    per_layer = {l: [e for e in found if e.layer == l] for l in layers}
    signatures = {l: [(e.module, e.factor, e.shape) for e in es] for l, es in per_layer.items()}
    first = signatures[layers[0]]
    for l in layers[1:]:
        if signatures[l] != first:
            raise ValueError(f"layer {l} has LoRA shapes {signatures[l]}, layer {layers[0]} has {first}: "
                             "layer tokens need identical layers")
    d_layer = sum(e.numel for e in per_layer[layers[0]])
    return UpdateLayout(tuple(found), len(layers), d_layer)


def _lora_params(peft_model: torch.nn.Module, layout: UpdateLayout, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    params = dict(peft_model.named_parameters())
    out = []
    for e in layout.entries:
        name = e.key[: -len(".weight")] + f".{adapter_name}.weight"
        if name not in params:
            raise ValueError(f"model lacks LoRA parameter {name}: its layout differs from the card's")
        out.append(params[name])
    return out


def read_lora(peft_model: torch.nn.Module, layout: UpdateLayout) -> torch.Tensor:
    """The model's current LoRA parameters as a ``(n_layers, d_layer)`` float32 tensor."""
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in _lora_params(peft_model, layout)])
    return flat.reshape(layout.n_layers, layout.d_layer)


@torch.no_grad()
def write_lora(peft_model: torch.nn.Module, layout: UpdateLayout, values: torch.Tensor) -> None:
    """Set the model's LoRA parameters from a ``(n_layers, d_layer)`` tensor."""
    check_shape(values, layout)
    flat = values.reshape(-1)
    offset = 0
    for p in _lora_params(peft_model, layout):
        n = p.numel()
        p.copy_(flat[offset : offset + n].reshape(p.shape).to(p.dtype))
        offset += n


def apply_update(peft_model: torch.nn.Module, layout: UpdateLayout, init: torch.Tensor, update: torch.Tensor) -> None:
    """Set LoRA = card init + update (both ``(n_layers, d_layer)``)."""
    validate_update(update, layout)
    write_lora(peft_model, layout, init + update)


def split_factors(tensor: torch.Tensor, layout: UpdateLayout) -> dict[str, torch.Tensor]:
    """A ``(n_layers, d_layer)`` tensor as {adapter key: matrix} (no copy where possible)."""
    check_shape(tensor, layout)
    flat = tensor.reshape(-1)
    out, offset = {}, 0
    for e in layout.entries:
        out[e.key] = flat[offset : offset + e.numel].reshape(e.shape)
        offset += e.numel
    return out


def check_shape(tensor: torch.Tensor, layout: UpdateLayout) -> None:
    if tuple(tensor.shape) != layout.shape:
        raise ValueError(f"update has shape {tuple(tensor.shape)}, the layout needs {layout.shape}")


def validate_update(tensor: torch.Tensor, layout: UpdateLayout | None = None, fingerprint: str | None = None,
                    expected_fingerprint: str | None = None) -> None:
    """Check an update vector before use.

    Raises:
        ValueError: on a fingerprint mismatch, wrong shape, non-float dtype, non-finite
            values, or more than ``MAX_UPDATE_ELEMENTS`` values.
    """
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise ValueError(f"update layout fingerprint {str(fingerprint)[:12]}... does not match the card's "
                         f"{expected_fingerprint[:12]}...: it was made for another model or LoRA spec")
    if tensor.numel() > MAX_UPDATE_ELEMENTS:
        raise ValueError(f"update has {tensor.numel()} values, more than the limit {MAX_UPDATE_ELEMENTS}")
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"update dtype must be floating point, got {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"update must be 2-d (n_layers, d_layer), got shape {tuple(tensor.shape)}")
    if layout is not None:
        check_shape(tensor, layout)
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"update has {bad} non-finite value(s) (NaN or inf)")


def export_peft_adapter(peft_model: torch.nn.Module, layout: UpdateLayout, init: torch.Tensor,
                        update: torch.Tensor, directory: str | Path, base_model_path: str | None = None) -> Path:
    """Write ``init + update`` as a standard PEFT adapter directory.

    ``PeftModel.from_pretrained(base, directory)`` loads it unchanged (adapter_config.json
    and adapter_model.safetensors). The model's LoRA parameters are set to init + update.
    """
    apply_update(peft_model, layout, init, update)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if base_model_path is not None:
        for cfg in peft_model.peft_config.values():
            cfg.base_model_name_or_path = str(base_model_path)
    peft_model.save_pretrained(str(directory))
    return directory


def seeded_lora_init(layout: UpdateLayout, seed: int) -> torch.Tensor:
    """The card's LoRA init as a ``(n_layers, d_layer)`` tensor: A seeded, B zero.

    Each A matrix is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (what peft's
    kaiming_uniform(a=sqrt(5)) gives) by its own generator seeded from (seed, key), so the
    init is bit-identical for a card whatever the module order or torch's global RNG.
    """
    parts = []
    for e in layout.entries:
        if e.factor == "lora_B":
            parts.append(torch.zeros(e.numel))
            continue
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}|{e.key}".encode()).digest()[:8], "big") >> 1)
        bound = 1.0 / math.sqrt(e.shape[1])
        parts.append((torch.rand(e.numel, generator=g, dtype=torch.float64) * 2 - 1).mul(bound).float())
    return torch.cat(parts).reshape(layout.shape)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's float32 bytes (for init checks and provenance)."""
    return storage.sha256_bytes(t.detach().float().contiguous().cpu().numpy().tobytes())

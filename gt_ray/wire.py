"""The wire format of an update vector: the one home of its file and bytes, ids, and entry checks.

An update vector crosses a boundary as a safetensors file (never pickle) holding exactly one
float tensor named :data:`UPDATE_TENSOR` of shape ``(n_layers, d_layer)``, with string
metadata ``format`` (:data:`UPDATE_FORMAT`), ``fingerprint`` (the layout fingerprint of the
model side it belongs to, :attr:`gt_ray.updates.UpdateLayout.fingerprint`) and ``metadata``
(JSON provenance). :func:`save_update` / :func:`load_update` write and read it as a file,
:func:`update_to_bytes` / :func:`parse_update_bytes` as bytes (the service's request body);
both sides produce and accept the same bytes.

Also here: organization and round ids (:func:`check_id`, they go into URLs and file names),
HTTP header values (:data:`HEADER_VALUE`), and what a submitted vector may hold
(:class:`NormBound`, :func:`check_update_content`). The norm bound's file in the translator
checkpoint is read and written by :mod:`gt_ray.translator.checkpoint`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes  # only through safetensors_bytes

from gt_ray import storage
from gt_ray.updates import UpdateLayout, validate_update

UPDATE_TENSOR = "update"
"""Name of the tensor inside an update-vector safetensors file."""
UPDATE_FORMAT = "gt-ray-update-v1"
MAX_HEADER_BYTES = 1 << 20
"""Refuse a safetensors header larger than this (1 MiB) before parsing it."""
SAFETENSORS_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Allowed organization and round ids (they go into URLs and ledger keys)."""
HEADER_VALUE = re.compile(r"[\x21-\x7e]{1,4096}")
"""Tokens and idempotency keys: printable ASCII, no whitespace (no header injection)."""
DEFAULT_OUTLIER_FACTOR = 10.0
"""A submitted vector's norm may lie this far outside the shadow corpus' range."""
ROBUST_RULES = ("median", "trimmed_mean")
"""Aggregation rules that one outlier cannot move far (they may take outliers)."""


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with the header in one order: the same tensors and metadata
    give the same bytes (safetensors writes its metadata map in an order that changes from
    call to call, so a file's sha256 would not identify its content). gt-ray's files with
    more than one metadata key are written through here."""
    blob = save_safetensors_bytes(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {**({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}), **dict(sorted(header.items()))}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text = text.ljust(-(-len(text) // 8) * 8, b" ")  # data offsets count from the header's end
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------- ids


def check_id(name: str, value: str) -> str:
    """Check an organization or round id: ``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 128 chars.

    Raises:
        ValueError: if it does not match.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"{name} must be 1-128 characters of letters, digits, '.', '_' or '-' "
                         f"(starting with a letter or digit), got {value!r}")
    return value


# ----------------------------------------------------------------------------- bytes and files


def parse_update_bytes(blob: bytes, expected_fingerprint: str,
                       shape: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Parse and validate an update-vector file received as bytes (never pickle).

    The header is read and checked before any tensor is built: the 8-byte length, a JSON
    header of at most :data:`MAX_HEADER_BYTES`, the gt-ray update format, exactly one
    float tensor named ``update``; then ``safetensors.torch.load`` builds it and
    :func:`gt_ray.updates.validate_update` checks fingerprint, dtype and finite values.

    Args:
        blob: the file's bytes.
        expected_fingerprint: the layout fingerprint of the card's model side.
        shape: the layout's ``(n_layers, d_layer)``.

    Returns:
        ``(tensor, metadata)``: the vector as float32 ``(n_layers, d_layer)``; its metadata
        dict with a ``fingerprint`` key.

    Raises:
        ValueError: with a message saying what is wrong.
    """
    if len(blob) < 8:
        raise ValueError(f"not a safetensors file: {len(blob)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(len(blob) - 8, MAX_HEADER_BYTES):
        raise ValueError(f"not a safetensors file: header length {n} exceeds the "
                         f"{min(len(blob) - 8, MAX_HEADER_BYTES)} bytes available")
    try:
        header = json.loads(blob[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or meta.get("format") != UPDATE_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"not a gt-ray update vector (format {fmt!r}, expected {UPDATE_FORMAT!r})")
    if set(header) != {UPDATE_TENSOR}:
        raise ValueError(f"an update vector holds exactly one tensor named {UPDATE_TENSOR!r}, "
                         f"found {sorted(header)[:8]}")
    info = header[UPDATE_TENSOR]
    dtype = info.get("dtype") if isinstance(info, dict) else None
    if dtype not in SAFETENSORS_FLOAT_DTYPES:
        raise ValueError(f"update dtype must be one of {', '.join(SAFETENSORS_FLOAT_DTYPES)}, got {dtype!r}")
    try:
        tensor = load_safetensors_bytes(blob)[UPDATE_TENSOR]
    except Exception as e:  # safetensors raises its own error type for bad offsets or lengths
        raise ValueError(f"not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    validate_update(tensor, None, meta.get("fingerprint"), expected_fingerprint)
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"update has shape {list(tensor.shape)}, the card's layout needs {list(shape)}")
    try:
        extra = json.loads(meta.get("metadata", "{}"))
    except json.JSONDecodeError:
        raise ValueError("the update's metadata is not JSON") from None
    if not isinstance(extra, dict):
        raise ValueError("the update's metadata is not a JSON object")
    return tensor.float(), {**extra, "fingerprint": meta["fingerprint"]}


def update_to_bytes(update: torch.Tensor, fingerprint: str, metadata: dict[str, Any] | None = None) -> bytes:
    """An update vector as safetensors bytes, the same format :func:`gt_ray.updates.save_update` writes.

    Args:
        update: ``(n_layers, d_layer)``, finite.
        fingerprint: the layout fingerprint it belongs to.
        metadata: JSON-able provenance.

    Raises:
        ValueError: if the update is invalid.
    """
    validate_update(update)
    meta = {"format": UPDATE_FORMAT, "fingerprint": fingerprint,
            "metadata": json.dumps(metadata or {}, sort_keys=True, default=str)}
    return safetensors_bytes({UPDATE_TENSOR: update.detach().float().contiguous().cpu()}, metadata=meta)


def save_update(path: str | Path, update: torch.Tensor, fingerprint: str, metadata: dict[str, Any] | None = None) -> Path:
    """Write an update vector as safetensors with JSON metadata (fingerprint, provenance).

    The file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    storage.write_bytes(path, update_to_bytes(update, fingerprint, metadata))
    return path


def load_update(path: str | Path, layout: UpdateLayout | None = None,
                expected_fingerprint: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read and validate an update vector file.

    Returns:
        (tensor (n_layers, d_layer) float32, metadata dict with a ``fingerprint`` key)

    Raises:
        ValueError: if the file is missing or not a gt-ray update, or validation fails.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"update file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if UPDATE_TENSOR not in f.keys():
                raise ValueError(f"{path}: no '{UPDATE_TENSOR}' tensor; not a gt-ray update file")
            tensor = f.get_tensor(UPDATE_TENSOR)
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if header.get("format") != UPDATE_FORMAT:
        raise ValueError(f"{path}: not a gt-ray update file (format {header.get('format')!r})")
    meta = json.loads(header.get("metadata", "{}"))
    meta["fingerprint"] = header.get("fingerprint")
    fp = expected_fingerprint or (layout.fingerprint if layout is not None else None)
    try:
        validate_update(tensor, layout, meta["fingerprint"], fp)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return tensor.float(), meta


# ----------------------------------------------------------------------------- what a vector may hold


@dataclass(frozen=True)
class NormBound:
    """The L2 norms a submitted TinyLM vector may have: the corpus' range widened by ``factor``."""

    min_norm: float
    """Smallest norm of the shadow corpus' TinyLM updates."""
    max_norm: float
    """Largest norm of the shadow corpus' TinyLM updates."""
    factor: float = DEFAULT_OUTLIER_FACTOR
    """Accepted: ``[min_norm / factor, max_norm * factor]``."""

    def __post_init__(self) -> None:
        if not (_is_number(self.min_norm) and _is_number(self.max_norm) and 0 < self.min_norm <= self.max_norm):
            raise ValueError(f"norm bound needs 0 < min_norm <= max_norm, got {self.min_norm!r}, {self.max_norm!r}")
        if not (_is_number(self.factor) and self.factor >= 1):
            raise ValueError(f"outlier factor must be a finite number >= 1, got {self.factor!r}")

    @property
    def low(self) -> float:
        return self.min_norm / self.factor

    @property
    def high(self) -> float:
        return self.max_norm * self.factor


def check_update_content(update: torch.Tensor, bound: NormBound | None = None) -> None:
    """Refuse an all-zero update, and one whose L2 norm is outside ``bound`` (when given).

    Args:
        update: a TinyLM vector ``(L_tiny, d_tiny)``, already finite (:func:`parse_update_bytes`).
        bound: the accepted norms; ``None`` checks zeros only.

    Raises:
        ValueError: with a message that says what is wrong and what the range is.
    """
    if not bool(update.any()):
        raise ValueError("the update vector is all zeros: a fine-tune that learned nothing, which would only "
                         "dilute the round's aggregate; check that the fine-tune moved the LoRA weights")
    if bound is None:
        return
    norm = float(update.norm())
    if not bound.low <= norm <= bound.high:
        raise ValueError(f"the update's L2 norm {norm:.4g} is outside [{bound.low:.4g}, {bound.high:.4g}], the "
                         f"shadow corpus' range [{bound.min_norm:.4g}, {bound.max_norm:.4g}] widened {bound.factor:g}x; "
                         f"only a round with rule {' or '.join(ROBUST_RULES)} and accept_outliers takes it")

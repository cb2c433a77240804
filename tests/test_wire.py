"""gt_ray.wire: the update-vector bytes refuse bad input and read what they wrote; the input
norm bound round-trips beside the checkpoint."""

import json
import struct

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from gt_ray.wire import UPDATE_FORMAT, parse_update_bytes, safetensors_bytes, update_to_bytes
from gt_ray.translator.checkpoint import NORM_BOUND_FILE, load_norm_bound, write_norm_bound
from tests.rounds_helpers import make_card, tiny_shape


@pytest.fixture(scope="module")
def card(tiny_path, gqa_path):
    return make_card(tiny_path, gqa_path)


def _header_blob(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("make, match", [
    (lambda c: b"abc", "shorter than the 8-byte header length"),
    (lambda c: struct.pack("<Q", 1 << 40) + b"{}", "header length .* exceeds"),
    (lambda c: struct.pack("<Q", 4) + b"\xff\xfe{}", "its header is not JSON"),
    (lambda c: _header_blob([1, 2]), "not a JSON object"),
    (lambda c: save_safetensors_bytes({"update": torch.zeros(2, 256)}), "not a gt-ray update vector"),
    (lambda c: save_safetensors_bytes({"update": torch.zeros(2, 256), "x": torch.zeros(1)},
                                      metadata={"format": UPDATE_FORMAT}), "exactly one tensor named 'update'"),
    (lambda c: save_safetensors_bytes({"update": torch.zeros(2, 256, dtype=torch.int32)},
                                      metadata={"format": UPDATE_FORMAT}), "update dtype must be one of"),
    (lambda c: _header_blob({"__metadata__": {"format": UPDATE_FORMAT},
                             "update": {"dtype": "F32", "shape": [2, 256], "data_offsets": [0, 2048]}}, b"\0" * 16),
     "not a readable safetensors file"),
    (lambda c: update_to_bytes(torch.ones(*tiny_shape(c)), "f" * 64), "does not match the card's"),
    (lambda c: save_safetensors_bytes({"update": torch.full(tiny_shape(c), float("nan"))},
                                      metadata={"format": UPDATE_FORMAT, "fingerprint": c.tiny.layout_fingerprint}),
     r"non-finite value"),
    (lambda c: update_to_bytes(torch.ones(3, 7), c.tiny.layout_fingerprint), r"shape \[3, 7\], the card's layout needs"),
], ids=["too short", "huge header length", "header not utf-8", "header not an object", "no gt-ray format",
        "two tensors", "int dtype", "truncated data", "wrong fingerprint", "NaN", "wrong shape"])
def test_parse_update_bytes_refuses_bad_input(card, make, match):
    with pytest.raises(ValueError, match=match):
        parse_update_bytes(make(card), card.tiny.layout_fingerprint, tiny_shape(card))


def test_parse_update_bytes_reads_what_update_to_bytes_wrote(card):
    t = torch.randn(*tiny_shape(card))
    got, meta = parse_update_bytes(update_to_bytes(t, card.tiny.layout_fingerprint, {"n_examples": 5}),
                                   card.tiny.layout_fingerprint, tiny_shape(card))
    torch.testing.assert_close(got, t, rtol=0, atol=0)
    assert meta == {"n_examples": 5, "fingerprint": card.tiny.layout_fingerprint}


def test_norm_bound_round_trips_beside_the_checkpoint(card, tmp_path):
    assert load_norm_bound(tmp_path) is None  # no file: the bound is off, the service still starts
    vectors = torch.randn(20, *tiny_shape(card), generator=torch.Generator().manual_seed(0)) * 0.01
    path = write_norm_bound(tmp_path, vectors, card.tiny.layout_fingerprint)
    assert path == tmp_path / NORM_BOUND_FILE
    norms = vectors.flatten(1).norm(dim=1)
    bound = load_norm_bound(tmp_path, 4.0, card.tiny.layout_fingerprint)
    assert bound.factor == 4.0
    assert bound.low == pytest.approx(float(norms.min()) / 4) and bound.high == pytest.approx(float(norms.max()) * 4)
    with pytest.raises(ValueError, match="was written for TinyLM layout"):
        load_norm_bound(tmp_path, 4.0, "f" * 64)
    with pytest.raises(ValueError, match="must be finite and non-zero"):
        write_norm_bound(tmp_path, torch.zeros(3, *tiny_shape(card)))
    (tmp_path / NORM_BOUND_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a gt-ray input norm file"):
        load_norm_bound(tmp_path)


def test_the_same_tensors_and_metadata_give_the_same_bytes():
    """safetensors writes its metadata map in a changing order (six orders of three keys in
    30 calls here); a checkpoint's or update's sha256 must identify its content."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.float16)}
    meta = {"format": "pt", "normalization": "coordinate", "é": "x\n\"y\""}
    raw = {save_safetensors_bytes(tensors, metadata=meta) for _ in range(30)}
    ours = {safetensors_bytes(tensors, meta) for _ in range(30)}
    assert len(raw) > 1 and len(ours) == 1
    blob = ours.pop()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0 and json.loads(blob[8:8 + n])["__metadata__"] == meta
    back = load_safetensors_bytes(blob)
    assert set(back) == {"a", "b"} and torch.equal(back["b"], tensors["b"]) and torch.equal(back["a"], tensors["a"])
    assert back["a"].dtype == torch.float16
    assert safetensors_bytes(tensors) != safetensors_bytes({**tensors, "b": tensors["b"] + 1})

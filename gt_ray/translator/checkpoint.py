"""The translator checkpoint directory: its one writer (`save_translator`) and its readers.

A checkpoint is a directory (a path or a URI, see `gt_ray.storage`) holding

- `model.safetensors` (MODEL_FILENAME): the weights and the normalizer statistics;
- `translator.json` (CONFIG_FILENAME): format version, translator / T5 / train configs,
  metadata (pair-card fingerprints, provenance) and, with ``input: behaviour``, the probe
  prompts and settings (`input`; loading then needs the pair's TinyLM), sorted keys;
- `history.json` (HISTORY_FILENAME): one dict per training epoch, when training wrote it;
- `input_norms.json` (NORM_BOUND_FILE): the norms of the corpus' TinyLM updates, from which
  the service bounds what it accepts (`gt_ray.wire.NormBound`).

Each file appears whole or not at all (`gt_ray.storage`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from transformers import T5Config

from gt_ray import storage
from gt_ray.translator.config import TrainConfig, TranslatorConfig
from gt_ray.translator.model import GradTransformer, Normalizer, Translator
from gt_ray.wire import DEFAULT_OUTLIER_FACTOR, NormBound, safetensors_bytes

if TYPE_CHECKING:
    from gt_ray.models import LoadedModel

logger = logging.getLogger(__name__)

MODEL_FILENAME = "model.safetensors"
CONFIG_FILENAME = "translator.json"
HISTORY_FILENAME = "history.json"
NORM_BOUND_FILE = "input_norms.json"
"""The corpus' TinyLM update norms, written by :func:`save_translator` / :func:`write_norm_bound`."""
NORM_BOUND_FORMAT = "gt-ray-input-norms-v1"
FORMAT_VERSION = 1
FINGERPRINTS_KEY = "fingerprints"
"""Key of `extra_metadata` holding `{name: layout fingerprint}` (e.g. `{"tiny": ..., "llm": ...}`)."""


def save_translator(
    translator: Translator,
    directory: str | Path,
    extra_metadata: Mapping[str, Any] | None = None,
    *,
    history: Sequence[Mapping[str, float]] | None = None,
    input_vectors: torch.Tensor | None = None,
) -> str | Path:
    """Writes the checkpoint: `model.safetensors` (weights + normalizer stats), the training
    history and the input norms when given, and `translator.json`.

    Each file appears whole or not at all (`gt_ray.storage`); `translator.json` comes last,
    so a `translator.json` always has the rest of its checkpoint beside it.

    Args:
        translator: the translator.
        directory: a path (created if missing) or a URI (`s3://`, `gs://`, `file://`);
            existing files of the same names are replaced.
        extra_metadata: JSON-able provenance merged over `translator.metadata`. Put the pair
            card's layout fingerprints under "fingerprints" as {name: fingerprint} so
            `load_translator(expected_fingerprints=...)` can check them.
        history: `train_translator`'s per-epoch dicts, written to `history.json`.
        input_vectors: the corpus' raw TinyLM updates `(N, L_tiny, d_tiny)` whose norms go to
            `input_norms.json` (see `write_norm_bound`), recorded with the "tiny" fingerprint
            of the metadata when it has one.

    Returns:
        The directory: a `Path` when given a path, else the URI.

    Raises:
        ValueError: if the metadata is not JSON-serializable, fingerprints are not str -> str,
            or input_vectors cannot bound the norms (empty, non-finite or a zero vector).
    """
    directory = directory if storage.is_uri(directory) else Path(directory)
    metadata = {**translator.metadata, **(extra_metadata or {})}
    fingerprints = metadata.get(FINGERPRINTS_KEY, {})
    if not isinstance(fingerprints, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fingerprints.items()
    ):
        raise ValueError(f"extra_metadata[{FINGERPRINTS_KEY!r}] must map names to fingerprint strings")
    document = {
        "format_version": FORMAT_VERSION,
        "translator_config": translator.config.to_dict(),
        "t5_config": json.loads(translator.model.t5_config.to_json_string(use_diff=False)),
        "train_config": None if translator.train_config is None else translator.train_config.to_dict(),
        "normalization": translator.normalizer.mode,
        "metadata": metadata,
        # with input: behaviour, the probe prompts and settings (loading needs the TinyLM again)
        "input": None if translator.input_encoder is None else translator.input_encoder.to_dict(),
    }
    try:
        text = json.dumps(document, sort_keys=True, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"translator metadata is not JSON-serializable: {err}") from err

    norms = None if input_vectors is None else _norm_document(input_vectors, fingerprints.get("tiny"))

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in translator.state_dict().items()}
    file_metadata = {"format": "pt", "normalization": translator.normalizer.mode}
    storage.write_bytes(storage.join(directory, MODEL_FILENAME), safetensors_bytes(tensors, metadata=file_metadata))
    if history is not None:
        # not storage.write_json: epochs hold NaN for figures a run does not compute (kept as written before)
        storage.write_text(storage.join(directory, HISTORY_FILENAME),
                           json.dumps(list(history), indent=2, sort_keys=True, default=str))
    if norms is not None:
        storage.write_json(storage.join(directory, NORM_BOUND_FILE), norms)
    storage.write_text(storage.join(directory, CONFIG_FILENAME), text + "\n")
    logger.info("saved translator (%d tensors) to %s", len(tensors), directory)
    return directory


def write_norm_bound(checkpoint_dir: str | Path, vectors: torch.Tensor, fingerprint: str | None = None) -> str | Path:
    """Write the norms of the corpus' TinyLM updates into a translator checkpoint directory
    (`save_translator(input_vectors=...)` does this for a trained translator).

    Args:
        checkpoint_dir: the translator checkpoint directory (a path or a URI, see
            :mod:`gt_ray.storage`); gets :data:`NORM_BOUND_FILE`.
        vectors: the corpus' raw TinyLM updates ``(N, L_tiny, d_tiny)`` (before normalizing).
        fingerprint: their TinyLM layout fingerprint, recorded and checked by :func:`load_norm_bound`.

    Returns:
        The file's location (a ``Path`` for a path, else the URI).

    Raises:
        ValueError: no vectors, non-finite values, or a zero vector among them.
    """
    data = _norm_document(vectors, fingerprint)
    path = storage.join(checkpoint_dir, NORM_BOUND_FILE)
    storage.write_json(path, data)
    return path if storage.is_uri(path) else Path(path)


def _norm_document(vectors: torch.Tensor, fingerprint: str | None) -> dict[str, Any]:
    # vectors: (N, L_tiny, d_tiny) raw TinyLM updates -> the JSON of NORM_BOUND_FILE
    if vectors.dim() != 3 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be (N >= 1, L_tiny, d_tiny), got {tuple(vectors.shape)}")
    norms = vectors.detach().double().flatten(1).norm(dim=1)  # (N,)
    if not bool(torch.isfinite(norms).all()) or float(norms.min()) <= 0:
        raise ValueError("the corpus' TinyLM vectors must be finite and non-zero to bound the input norms")
    q = torch.quantile(norms, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
    return {"format": NORM_BOUND_FORMAT, "fingerprint": fingerprint, "n_vectors": int(norms.numel()),
            "min_norm": float(norms.min()), "max_norm": float(norms.max()), "p01_norm": q[0], "median_norm": q[1],
            "p99_norm": q[2]}


def load_translator(
    directory: str | Path,
    expected_fingerprints: Mapping[str, str] | None = None,
    device: str | torch.device = "cpu",
    tiny: Callable[[], LoadedModel] | None = None,
) -> Translator:
    """Restores a translator written by `save_translator`, in eval mode.

    Args:
        directory: the checkpoint directory, a path or a URI.
        expected_fingerprints: {name: fingerprint} that must equal the stored
            `metadata["fingerprints"]` for every given name.
        device: where to put the weights.
        tiny: returns the pair's TinyLM (with its LoRA init); called only for a checkpoint
            with ``input: behaviour``, whose input encoder runs it.

    Returns:
        The translator; `translator.metadata` holds the stored metadata.

    Raises:
        ValueError: if a file is missing, the format is unknown, a fingerprint differs
            or the weights do not fit the config, or a behaviour-input checkpoint without ``tiny``.
    """
    for name in (CONFIG_FILENAME, MODEL_FILENAME):
        if not storage.is_file(storage.join(directory, name)):
            raise ValueError(f"translator checkpoint {directory} is missing {name}")
    try:
        document = json.loads(storage.read_text(storage.join(directory, CONFIG_FILENAME)))
    except json.JSONDecodeError as err:
        raise ValueError(f"translator checkpoint {directory}: {CONFIG_FILENAME} is not JSON ({err})") from None
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"translator checkpoint {directory} has format_version {document.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
    metadata = document["metadata"]
    stored = metadata.get(FINGERPRINTS_KEY, {})
    for name, fingerprint in (expected_fingerprints or {}).items():
        if stored.get(name) != fingerprint:
            raise ValueError(
                f"layout fingerprint mismatch for {name!r}: checkpoint {directory} has {stored.get(name)!r}, "
                f"expected {fingerprint!r}"
            )

    config = TranslatorConfig.from_dict(document["translator_config"])  # stored with its layouts
    train_config = None if document["train_config"] is None else TrainConfig.from_dict(document["train_config"])
    weights_at = storage.join(directory, MODEL_FILENAME)
    try:  # a local file is memory-mapped; an object is read into memory once
        tensors = (load_safetensors_file(str(storage.local_path(weights_at))) if storage.is_local(weights_at)
                   else load_safetensors_bytes(storage.read_bytes(weights_at)))
    except Exception as err:  # safetensors raises its own error types for a bad file
        raise ValueError(f"translator checkpoint {directory}: {MODEL_FILENAME} is not readable ({err})") from None
    stats = {k.removeprefix("normalizer."): tensors.pop(k) for k in list(tensors) if k.startswith("normalizer.")}
    if set(stats) != {"x_mean", "x_std", "y_mean", "y_std"}:
        raise ValueError(f"translator checkpoint {directory} lacks normalizer stats, found {sorted(stats)}")
    normalizer = Normalizer(document["normalization"], **stats)
    # Random init, then overwrite: the pretrained T5 directory need not exist at load time.
    model = GradTransformer(config, t5_config=T5Config.from_dict(document["t5_config"]))
    weights = {k.removeprefix("model."): v for k, v in tensors.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f"translator checkpoint {directory} does not fit its config: {err}") from err
    encoder = None
    if document.get("input") is not None:  # input: behaviour
        if tiny is None:
            raise ValueError(f"translator checkpoint {directory} reads the TinyLM's behaviour: "
                             "load it with the pair's TinyLM (load_translator(..., tiny=...))")
        from gt_ray.translator.behaviour import BehaviourInput  # loads the TinyLM's model code only when needed

        encoder = BehaviourInput.from_dict(document["input"], tiny())
    translator = Translator(config, model, normalizer, train_config=train_config, metadata=metadata,
                            input_encoder=encoder)
    logger.info("loaded translator from %s", directory)
    return translator.to(device).eval()


def load_norm_bound(checkpoint_dir: str | Path, factor: float = DEFAULT_OUTLIER_FACTOR,
                    fingerprint: str | None = None) -> NormBound | None:
    """The bound stored beside a translator checkpoint, or ``None`` when it has none (logged).

    Args:
        checkpoint_dir: the translator checkpoint directory, a path or a URI.
        factor: how far outside the corpus' range a norm may be.
        fingerprint: the card's TinyLM layout fingerprint; a file for another layout is refused.

    Raises:
        ValueError: a file that is not a norm bound, or one for another layout.
    """
    path = storage.join(checkpoint_dir, NORM_BOUND_FILE)
    if not storage.is_file(path):
        logger.warning("no %s beside the translator checkpoint: the input norm bound is off", path)
        return None
    try:
        data = json.loads(storage.read_text(path))
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not JSON") from None
    if not isinstance(data, dict) or data.get("format") != NORM_BOUND_FORMAT:
        raise ValueError(f"{path} is not a gt-ray input norm file (format {NORM_BOUND_FORMAT!r})")
    if fingerprint is not None and data.get("fingerprint") not in (None, fingerprint):
        raise ValueError(f"{path} was written for TinyLM layout {data['fingerprint']!r}, not the card's {fingerprint!r}")
    bound = NormBound(data["min_norm"], data["max_norm"], factor)
    logger.info("input norm bound [%.4g, %.4g] (corpus [%.4g, %.4g] x%g)", bound.low, bound.high, bound.min_norm,
                bound.max_norm, factor)
    return bound


def read_metadata(directory: str | Path) -> dict[str, Any] | None:
    """The metadata of `translator.json` (without loading weights), or None when there is none.

    Args:
        directory: the checkpoint directory, a path or a URI.

    Raises:
        ValueError: if `translator.json` is not JSON.
    """
    path = storage.join(directory, CONFIG_FILENAME)
    if not storage.is_file(path):
        return None
    try:
        return json.loads(storage.read_text(path)).get("metadata", {})
    except json.JSONDecodeError as err:
        raise ValueError(f"translator checkpoint {directory}: {CONFIG_FILENAME} is not JSON ({err})") from None


def load_history(directory: str | Path) -> list[dict[str, float]] | None:
    """The per-epoch training history stored by `save_translator`, or None when there is none."""
    path = storage.join(directory, HISTORY_FILENAME)
    return json.loads(storage.read_text(path)) if storage.is_file(path) else None


def weights_sha256(directory: str | Path) -> str:
    """Hex sha256 of the checkpoint's weights file (`model.safetensors`)."""
    return storage.sha256(storage.join(directory, MODEL_FILENAME))

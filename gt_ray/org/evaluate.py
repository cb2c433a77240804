"""Does a round's adapter help? The card's LLM with the round's PEFT adapter against the
LLM alone, on the organization's own test data (exact-match accuracy and mean answer-token
NLL): how an organization decides whether to use the round's update. It needs the pair
card (which LLM, which data format) and nothing else of the provider's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gt_ray import tasks
from gt_ray.org.data import card_data_format, load_org_examples

if TYPE_CHECKING:
    from gt_ray.models import PairCard

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What a PEFT adapter directory (and the service's adapter zip) holds."""


def unpack_adapter(adapter: str | Path, into: str | Path) -> Path:
    """The directory of a PEFT adapter given as a directory or as the service's zip
    (extracted into ``into``; only its flat, known file names are read).

    Raises:
        ValueError: missing, not a directory or zip, or without the adapter's files.
    """
    src = Path(adapter).expanduser()
    if src.is_dir():
        directory = src
    elif src.is_file():
        import zipfile

        directory = Path(into)
        try:
            with zipfile.ZipFile(src) as z:
                for name in ADAPTER_FILES:
                    if name in z.namelist():
                        (directory / name).write_bytes(z.read(name))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise ValueError(f"adapter {src}: not a readable zip file ({e}); give the zip from "
                             "/v1/rounds/R/adapter or its unpacked directory") from None
    else:
        raise ValueError(f"adapter not found: {src}")
    missing = [n for n in ADAPTER_FILES if not (directory / n).is_file()]
    if missing:
        raise ValueError(f"adapter {src}: not a PEFT adapter ({', '.join(missing)} missing)")
    return directory


def _adapter_tensors(directory: Path, src: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(directory / ADAPTER_FILES[1]))
    except Exception as e:  # safetensors raises its own error types for a bad file
        raise ValueError(f"adapter {src}: {ADAPTER_FILES[1]} is not a readable safetensors file ({e})") from None
    bad = [k for k, t in tensors.items() if not torch.isfinite(t.float()).all()]
    if bad:
        raise ValueError(f"adapter {src}: non-finite values in {bad[:3]}")
    return tensors


def evaluate_adapter(card: PairCard | str | Path, adapter: str | Path,
                     data: str | Path | tasks.DatasetSpec, *, model_path: str | Path | None = None,
                     dtype: str = "float32", batch_size: int = 8, device: str | None = None) -> dict[str, Any]:
    """Score the card's LLM with a round's adapter against the LLM alone on the
    organization's own test data (exact match and answer NLL, teacher-forced: see
    :func:`gt_ray.tasks.answer_token_stats`).

    Only the card is needed from the provider: it names the LLM (its weights' sha256, so a
    local copy at ``model_path`` is checked) and the data format of its corpus (the test
    file's rows become prompts as the corpus' did).

    Args:
        card: the pair card, or the path of its JSON file.
        adapter: the round's adapter, a directory or the service's zip.
        data: a test ``.jsonl``/``.parquet`` file, a generated dataset's
            :class:`gt_ray.tasks.DatasetSpec`, or ``generated:SPEC``
            (see :func:`gt_ray.org.data.load_org_examples`).
        model_path: local directory of the card's LLM (default: the card's path).
        dtype: weights dtype (float32, bfloat16, float16).
        batch_size: examples per forward pass.
        device: torch device (default: CUDA when available, else the CPU).

    Returns:
        ``{"llm": Scores, "llm+adapter": Scores, "n_examples": int, "card_id": str}``.

    Raises:
        ValueError: bad or empty data, a missing model, weights that are not the card's
            LLM, a missing or corrupt adapter, or an adapter that does not fit the LLM.
    """
    import tempfile

    from gt_ray.models import DTYPES, PairCard, load_model, weights_sha256

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    examples, _ = load_org_examples(data, card_data_format(card))  # cheap checks first
    if not isinstance(card, PairCard):
        card = PairCard.load(card)
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    with tempfile.TemporaryDirectory(prefix="gt-ray-adapter-") as tmp:  # the adapter first: cheap to check
        directory = unpack_adapter(adapter, tmp)
        tensors = _adapter_tensors(directory, adapter)
        try:
            config = json.loads((directory / ADAPTER_FILES[0]).read_text())
            lora = LoraConfig.from_pretrained(str(directory))
        except Exception as e:  # json and peft raise several types for a foreign config
            raise ValueError(f"adapter {adapter}: {ADAPTER_FILES[0]} is not a LoRA adapter config ({e})") from None
    path = Path(model_path if model_path is not None else card.llm.path).expanduser()
    if not (path / "config.json").is_file():
        hint = "" if model_path is not None else " (the path in the card; pass --model-path for a local copy)"
        raise ValueError(f"no Hugging Face model directory at {path}{hint}")
    if weights_sha256(path) != card.llm.weights_sha256:
        raise ValueError(f"the model at {path} is not pair card {card.card_id}'s LLM (weights sha256 differs)")
    model, tokenizer = load_model(path, dtype)
    lora.base_model_name_or_path = str(path)  # the organization's copy of the card's LLM (checked above)
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        raise ValueError(f"adapter {adapter} does not fit pair card {card.card_id}'s LLM ({e})") from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise ValueError(f"adapter {adapter} does not fit pair card {card.card_id}'s LLM: "
                         f"{len(diff)} LoRA tensor(s) differ in name or shape, e.g. {diff[0]} "
                         f"(adapter r={config.get('r')}, target_modules={config.get('target_modules')})")
    set_peft_model_state_dict(peft_model, tensors)
    from gt_ray.evaluate import score

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peft_model.to(dev).eval()

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return peft_model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()

    with peft_model.disable_adapter():
        base = score(logits, tokenizer, examples, batch_size)
    adapted = score(logits, tokenizer, examples, batch_size)
    return {"llm": base, "llm+adapter": adapted, "n_examples": len(examples), "card_id": card.card_id}

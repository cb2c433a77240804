"""The shadow corpus: (TinyLM, LLM) update vectors from public-data shadow subsets.

Two kinds of subsets (:mod:`gt_ray.shadow`) share one corpus: *paired* ones hold both
models' updates, *TinyLM-only* ones the TinyLM update and the subset's spec, their ``llm``
column null.

Storage: one Parquet shard per shadow subset (``shard-00042.parquet``) with one row per
snapshot step, and ``manifest.json`` with the pair card, the config, counts of each kind
and a sha256 per shard. The directory is a local path or a URI (``s3://``, ``gs://``, ``file://``; see
:mod:`gt_ray.storage`). A shard appears only complete (a temporary name then a rename
locally; an object store shows an object only once its upload completes), so a rerun skips
the subsets whose shards exist and a killed worker leaves nothing half done.

Vectors are ``fixed_size_list<float32>`` columns; their ``(n_layers, d_layer)`` shapes and
the layout fingerprints are in the schema metadata. No row ever becomes a Python list: a
shard's vector columns are built from the rows' numpy buffers without a copy (one Arrow
chunk per row), row groups hold about :data:`ROW_GROUP_BYTES`, and readers view Arrow's
buffers as tensors (``table_to_tensors``) or copy batch by batch into one preallocated
tensor (``Corpus.load``). ``benchmarks/bench_corpus_memory.py`` measures the peak memory.
"""

from __future__ import annotations

import json
import logging
import posixpath
import random
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from gt_ray import storage, tasks
from gt_ray.config import ExperimentConfig, TaskConfig
from gt_ray.yaml_io import from_dict
from gt_ray.models import PairCard
from gt_ray.shadow import SHADOW_SPLIT, TINY_ONLY_BASE, flat_float32, is_tiny_only

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CORPUS_FORMAT = "gt-ray-corpus-v1"
ROW_GROUP_BYTES = 16 << 20
"""Target size of a Parquet row group: what a reader holds undecoded at once."""
VECTOR_COLUMNS = ("tiny", "llm")
_SHARD_RE = re.compile(r"shard-(\d{5,})\.parquet")


def shard_name(subset_id: int) -> str:
    return f"shard-{subset_id:05d}.parquet"


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


def vector_column(vectors: Iterable[Any], width: int) -> pa.ChunkedArray:
    """A ``fixed_size_list<float32, width>`` column with one chunk per row, each chunk a
    zero-copy view of that row's buffer (no Python floats, no concatenation).

    Raises:
        ValueError: if a vector does not have ``width`` values.
    """
    vectors = list(vectors)
    if vectors and all(v is None for v in vectors):  # a TinyLM-only shard's llm column
        return pa.chunked_array([pa.nulls(len(vectors), pa.list_(pa.float32(), width))])
    chunks = []
    for i, v in enumerate(vectors):
        if v is None:
            raise ValueError(f"row {i}: missing update vector in a column that has others")
        flat = flat_float32(v)
        if flat.size != width:
            raise ValueError(f"row {i}: update vector has {flat.size} values, the card's layout has {width}")
        chunks.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), width))
    return pa.chunked_array(chunks, type=pa.list_(pa.float32(), width))


def rows_to_table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts with numpy/tensor vectors) as a shard table; vector columns share the rows' memory."""
    columns = []
    for f in schema:
        if pa.types.is_fixed_size_list(f.type):
            try:
                columns.append(vector_column((r[f.name] for r in rows), f.type.list_size))
            except ValueError as e:
                raise ValueError(f"column {f.name}: {e}") from None
        else:
            columns.append(pa.array([r[f.name] for r in rows], type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _rows_per_group(schema: pa.Schema, row_group_bytes: int = ROW_GROUP_BYTES) -> int:
    row_bytes = sum(4 * f.type.list_size for f in schema if pa.types.is_fixed_size_list(f.type))
    return max(1, row_group_bytes // max(1, row_bytes))


def write_shard(directory: str | Path, subset_id: int, rows: list[dict[str, Any]], schema: pa.Schema,
                row_group_bytes: int = ROW_GROUP_BYTES) -> str | Path:
    """Write one subset's rows atomically; ``directory`` is a path or a URI.

    Rows hold their vectors as numpy arrays or tensors (lists work too, slowly); row groups
    hold about ``row_group_bytes`` of vectors (at least one row).

    Returns:
        The shard's location: a ``Path`` for a local ``directory`` given as a path, else the URI.
    """
    table = rows_to_table(rows, schema)
    scalars = [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)]
    final = storage.join(directory, shard_name(subset_id))
    with storage.open_output(final) as f:
        # Dictionary encoding and min/max statistics are useless on update vectors and cost memory.
        pq.write_table(table, f, row_group_size=_rows_per_group(schema, row_group_bytes), use_dictionary=scalars,
                       write_statistics=scalars)
    return final if storage.is_uri(final) else Path(final)


def completed_subsets(directory: str | Path) -> set[int]:
    """Ids of subsets whose shard exists (only complete shards ever have the final name)."""
    return {int(m.group(1)) for n in storage.list_names(directory) if (m := _SHARD_RE.fullmatch(n))}


def corpus_ids(n_subsets: int, n_tiny_only: int = 0) -> list[int]:
    """The subset ids of a corpus with ``n_subsets`` paired and ``n_tiny_only`` TinyLM-only subsets."""
    return list(range(n_subsets)) + [TINY_ONLY_BASE + i for i in range(n_tiny_only)]


def write_manifest(directory: str | Path, card: PairCard, cfg: dict[str, Any], n_subsets: int,
                   n_tiny_only: int = 0) -> dict[str, Any]:
    """Check every shard and write ``manifest.json`` with counts of each kind and checksums.

    Shards are checked one row group at a time, so memory stays at a row group. A paired
    shard must have both vectors in every row, a TinyLM-only shard a null ``llm`` column.

    Raises:
        ValueError: if a shard is missing, corrupt, mismatched or holds bad vectors.
    """
    ids = corpus_ids(n_subsets, n_tiny_only)
    missing = sorted(set(ids) - completed_subsets(directory))
    if missing:
        raise ValueError(f"corpus at {directory} is incomplete: {len(missing)} subset(s) missing, e.g. {missing[:5]}")
    shards = {}
    rows = {"paired": 0, "tiny_only": 0}
    for i in ids:
        name = shard_name(i)
        location = storage.join(directory, name)
        kind = "tiny_only" if is_tiny_only(i) else "paired"
        n = _check_vectors(_shard_row_groups(location, card), name, tiny_only=kind == "tiny_only")
        rows[kind] += n
        shards[name] = {"rows": n, "sha256": storage.sha256(location)}
    manifest = {"format": CORPUS_FORMAT, "card": card.to_dict(), "config": cfg, "n_subsets": n_subsets,
                "n_rows": rows["paired"], "n_tiny_only_subsets": n_tiny_only, "n_tiny_only_rows": rows["tiny_only"],
                "shards": shards}
    storage.write_text(storage.join(directory, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return manifest


def _open_shard(location: str | Path, card: PairCard) -> pq.ParquetFile:
    fs, path = storage.resolve(location)
    name = posixpath.basename(path)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
        schema = pf.schema_arrow
    except Exception as e:  # pyarrow raises several error types for a corrupt file
        raise ValueError(f"{name}: corrupt or unreadable Parquet shard ({e})") from None
    _check_card(schema, card, name)
    return pf


def _shard_row_groups(location: str | Path, card: PairCard) -> Iterator[pa.Table]:
    pf = _open_shard(location, card)
    name = posixpath.basename(storage.resolve(location)[1])
    for i in range(pf.num_row_groups):
        try:
            yield pf.read_row_group(i, columns=list(VECTOR_COLUMNS))
        except Exception as e:
            raise ValueError(f"{name}: corrupt or unreadable Parquet shard ({e})") from None


def read_shard(path: str | Path, card: PairCard) -> pa.Table:
    """Read one shard (a path or a URI) and check it belongs to ``card``.

    Raises:
        ValueError: if the file is unreadable or made for another card/layout.
    """
    pf = _open_shard(path, card)
    try:
        return pf.read()
    except Exception as e:
        raise ValueError(f"{posixpath.basename(str(path))}: corrupt or unreadable Parquet shard ({e})") from None


def _check_card(schema: pa.Schema, card: PairCard, name: str) -> None:
    meta = _schema_meta(schema, name)
    expected = json.loads(corpus_schema(card).metadata[b"gt_ray"])
    for key in ("card_id", "tiny_fingerprint", "llm_fingerprint", "tiny_shape", "llm_shape"):
        if meta.get(key) != expected[key]:
            raise ValueError(f"{name}: {key} {meta.get(key)!r} does not match the pair card's {expected[key]!r}")


def _schema_meta(schema: pa.Schema, name: str) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"gt_ray")
    if raw is None:
        raise ValueError(f"{name}: not a gt-ray corpus shard (no gt_ray schema metadata)")
    return json.loads(raw)


def vector_views(column: pa.ChunkedArray | pa.Array) -> Iterator[np.ndarray]:
    """Each chunk of a ``fixed_size_list<float32>`` column as a read-only ``(rows, width)``
    numpy view of Arrow's buffer (no copy)."""
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        yield chunk.flatten().to_numpy(zero_copy_only=True).reshape(len(chunk), chunk.type.list_size)


def check_rows(table: pa.Table, name: str, tiny_only: bool = False) -> None:
    """Every vector finite and non-zero; no two rows with identical vectors; the ``llm``
    column null exactly when the shard is TinyLM-only."""
    _check_vectors([table], name, tiny_only)


def _check_vectors(parts: Iterable[pa.Table], name: str, tiny_only: bool = False) -> int:
    """:func:`check_rows` over a shard given in parts (row groups); returns the row count."""
    cols = ("tiny",) if tiny_only else VECTOR_COLUMNS
    bad: dict[str, dict[str, Any]] = {c: {"finite": True, "zero": [], "digests": set()} for c in cols}
    n = 0
    for part in parts:
        nulls = part.column("llm").null_count
        if nulls != (part.num_rows if tiny_only else 0):
            raise ValueError(f"{name}: {nulls} of {part.num_rows} llm vectors are null; a "
                             f"{'TinyLM-only' if tiny_only else 'paired'} shard needs "
                             f"{'all' if tiny_only else 'none'}")
        for col in cols:
            b, row = bad[col], n
            for values in vector_views(part.column(col)):  # (rows, width), Arrow's memory
                b["finite"] &= bool(np.isfinite(values).all())
                b["zero"] += [row + int(i) for i in np.flatnonzero(~values.any(axis=1))]
                b["digests"].update(storage.sha256_bytes(v.tobytes()) for v in values)
                row += len(values)
        n += part.num_rows
    for col, b in bad.items():
        if not b["finite"]:
            raise ValueError(f"{name}: non-finite values in column {col}")
        if b["zero"]:
            raise ValueError(f"{name}: zero {col} update vector in row(s) {b['zero']}")
        if len(b["digests"]) != n:
            raise ValueError(f"{name}: repeated {col} update vectors")
    return n


class Corpus:
    """Read access to a finished corpus directory (validated against its manifest).

    Args:
        directory: the corpus directory (with manifest.json): a path or a URI.
        verify: recompute every shard's sha256 against the manifest.

    Attributes:
        directory: a ``Path`` for a local corpus, else the URI as given.

    Raises:
        ValueError: if the manifest is missing or a shard is missing or corrupt.
    """

    def __init__(self, directory: str | Path, verify: bool = True):
        self.uri = str(directory)
        self.directory: str | Path = storage.local_path(directory) if storage.is_local(directory) else self.uri
        mpath = storage.join(self.uri, MANIFEST)
        try:
            self.manifest = json.loads(storage.read_text(mpath))
        except FileNotFoundError:
            raise ValueError(f"no corpus at {self.directory}: {MANIFEST} missing (run `gt-ray corpus build`)") from None
        except json.JSONDecodeError:
            raise ValueError(f"{mpath}: not a gt-ray corpus manifest") from None
        if self.manifest.get("format") != CORPUS_FORMAT:
            raise ValueError(f"{mpath}: not a gt-ray corpus manifest")
        present = set(storage.list_names(self.uri))
        for name, info in self.manifest["shards"].items():
            if name not in present:
                raise ValueError(f"corpus shard {name} is missing")
            if verify and storage.sha256(storage.join(self.uri, name)) != info["sha256"]:
                raise ValueError(f"corpus shard {name} is corrupt: sha256 differs from the manifest")
        fs, root = storage.resolve(self.uri)
        self.dataset = pads.dataset([posixpath.join(root, n) for n in sorted(self.manifest["shards"])],
                                    format="parquet", filesystem=fs)
        meta = _schema_meta(self.dataset.schema, MANIFEST)
        self.tiny_shape = tuple(meta["tiny_shape"])
        self.llm_shape = tuple(meta["llm_shape"])
        self.card_id = meta["card_id"]
        self.fingerprints = {"tiny": meta["tiny_fingerprint"], "llm": meta["llm_fingerprint"]}

    @property
    def all_subset_ids(self) -> list[int]:
        """Every subset, paired and TinyLM-only."""
        return sorted(int(m.group(1)) for n in self.manifest["shards"] if (m := _SHARD_RE.fullmatch(n)))

    @property
    def subset_ids(self) -> list[int]:
        """The paired subsets (both updates): what baselines, the MSE term and the held-out
        table use."""
        return [i for i in self.all_subset_ids if not is_tiny_only(i)]

    @property
    def tiny_only_ids(self) -> list[int]:
        """The TinyLM-only subsets (the ``llm`` column null)."""
        return [i for i in self.all_subset_ids if is_tiny_only(i)]

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

    def task_config(self) -> TaskConfig:
        """The task world the corpus was built in (from the manifest's config): where a
        subset's examples come from (:func:`gt_ray.tasks.dataset_examples`)."""
        return from_dict(TaskConfig, dict(self.manifest.get("config", {}).get("tasks") or {}), "manifest config.tasks")

    def card(self) -> PairCard:
        """The pair card the corpus was built for (stored in the manifest; works for any URI)."""
        return PairCard.from_dict(dict(self.manifest["card"]), source=storage.join(self.uri, MANIFEST))

    def load(self, subset_ids: Sequence[int] | None = None, steps: Sequence[int] | None = None,
             sides: Sequence[str] = VECTOR_COLUMNS) -> dict[str, torch.Tensor]:
        """Load rows into memory (use :class:`CorpusDataset` to stream).

        The vectors are copied once, row group by row group, into tensors allocated up
        front: peak memory is the result plus about one row group, never a second full copy.

        Args:
            subset_ids: the subsets to load; ``None`` is every paired subset.
            steps: the snapshot steps to load; ``None`` is all.
            sides: which vectors to load; TinyLM-only subsets have ``("tiny",)`` only.

        Returns:
            dict with ``tiny`` (N, L_tiny, d_tiny), ``llm`` (N, L_llm, d_llm) (as asked by
            ``sides``), ``subset_id`` (N,), ``step`` (N,) and ``secret_k`` (N,), in shard
            order then row order.

        Raises:
            ValueError: if ``llm`` is asked for a TinyLM-only subset.
        """
        if subset_ids is None:
            subset_ids = self.subset_ids
        if "llm" in sides and (bad := [i for i in subset_ids if is_tiny_only(i)]):
            raise ValueError(f"{len(bad)} TinyLM-only subset(s) (e.g. {bad[0]}) have no LLM update; "
                             f"load them with sides=('tiny',)")
        shapes = {"tiny": self.tiny_shape, "llm": self.llm_shape}
        n = sum(int(mask.sum()) for _, _, mask in self._row_groups(subset_ids, steps))
        out = {**{s: torch.empty((n, *shapes[s])) for s in sides},
               **{k: torch.empty(n, dtype=torch.long) for k in _ID_COLUMNS}}
        i = 0
        for batch, mask in self._batches(subset_ids, steps, batch_rows=None, sides=sides):
            rows = np.flatnonzero(mask)
            k = len(rows)
            for col in sides:
                (values,) = vector_views(batch.column(col))  # (batch rows, width), Arrow's memory
                np.copyto(out[col][i : i + k].view(k, -1).numpy(), values[rows] if k < len(mask) else values)
            for col in _ID_COLUMNS:
                out[col][i : i + k] = torch.from_numpy(batch.column(col).to_numpy()[rows].astype(np.int64))
            i += k
        assert i == n, (i, n)
        return out

    def _row_groups(self, subset_ids: Sequence[int] | None,
                    steps: Sequence[int] | None) -> Iterator[tuple[pq.ParquetFile, int, np.ndarray]]:
        """``(file, row group, selected rows mask)`` for each row group with a selected row,
        in shard then row order; only the small id columns are read here."""
        fs, root = storage.resolve(self.uri)
        wanted = None if subset_ids is None else set(subset_ids)
        for name in sorted(self.manifest["shards"]):
            if wanted is not None and int(_SHARD_RE.fullmatch(name).group(1)) not in wanted:
                continue  # a shard holds one subset
            with fs.open_input_file(posixpath.join(root, name)) as f:
                pf = pq.ParquetFile(f)
                for g in range(pf.num_row_groups):
                    mask = _select(pf.read_row_group(g, columns=list(_ID_COLUMNS)), subset_ids, steps)
                    if mask.any():
                        yield pf, g, mask

    def _batches(self, subset_ids: Sequence[int] | None, steps: Sequence[int] | None,
                 batch_rows: int | None, sides: Sequence[str] = VECTOR_COLUMNS) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
        """Record batches of the selected row groups with their selected-rows masks, read
        one at a time (a Dataset scanner reads ahead and held ~20 MB per row at real scale)."""
        for pf, g, _ in self._row_groups(subset_ids, steps):
            size = batch_rows or pf.metadata.row_group(g).num_rows
            for batch in pf.iter_batches(batch_size=size, row_groups=[g], columns=[*sides, *_ID_COLUMNS],
                                         use_threads=False):
                mask = _select(batch, subset_ids, steps)
                if mask.any():
                    yield batch, mask


_ID_COLUMNS = ("subset_id", "step", "secret_k")


def _select(table: pa.Table | pa.RecordBatch, subset_ids: Sequence[int] | None, steps: Sequence[int] | None) -> np.ndarray:
    mask = np.ones(table.num_rows, dtype=bool)
    if subset_ids is not None:
        mask &= np.isin(table.column("subset_id").to_numpy(), np.asarray(list(subset_ids), dtype=np.int64))
    if steps is not None:
        mask &= np.isin(table.column("step").to_numpy(), np.asarray(list(steps), dtype=np.int64))
    return mask


def table_to_tensors(table: pa.Table | pa.RecordBatch, tiny_shape: Sequence[int],
                     llm_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """A table's rows as tensors; a single-chunk vector column becomes a view of Arrow's
    buffer (no copy), a multi-chunk one is copied once into one tensor.

    Returns:
        dict with ``tiny`` (N, *tiny_shape), ``llm`` (N, *llm_shape), ``subset_id``,
        ``step``, ``secret_k`` (N,) long.
    """
    n = table.num_rows

    def vec(col: str, shape: Sequence[int]) -> torch.Tensor:
        views = list(vector_views(table.column(col)))
        if len(views) == 1:
            with warnings.catch_warnings():  # Arrow's buffers are read-only; the tensor never writes to them
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(views[0]).reshape(n, *shape)
        flat = np.concatenate(views) if views else np.empty((0, int(np.prod(shape))), dtype=np.float32)
        return torch.from_numpy(flat).reshape(n, *shape)

    ids = {c: torch.from_numpy(np.asarray(table.column(c)).astype(np.int64)) for c in _ID_COLUMNS}
    return {"tiny": vec("tiny", tiny_shape), "llm": vec("llm", llm_shape), **ids}


class CorpusDataset(torch.utils.data.IterableDataset):
    """Streams (tiny, llm) pairs from the shards in record batches, never the whole corpus.

    Yields tuples ``(tiny (L_tiny, d_tiny), llm (L_llm, d_llm))``, views of the batch's
    Arrow memory (read-only: copy before modifying in place).
    """

    def __init__(self, corpus: Corpus, subset_ids: Sequence[int] | None = None, batch_rows: int = 1024):
        self.corpus, self.subset_ids, self.batch_rows = corpus, subset_ids, batch_rows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ids = self.corpus.subset_ids if self.subset_ids is None else self.subset_ids
        for batch, mask in self.corpus._batches(ids, None, self.batch_rows):
            t = table_to_tensors(batch, self.corpus.tiny_shape, self.corpus.llm_shape)
            for i in np.flatnonzero(mask):
                yield t["tiny"][i], t["llm"][i]


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
    out: dict[str, Any] = {"n_subsets": len(corpus.subset_ids), "n_tiny_only_subsets": len(corpus.tiny_only_ids),
                           "n_rows": int(data["step"].numel()),
                           "n_tiny_only_rows": int(corpus.manifest.get("n_tiny_only_rows", 0)),
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

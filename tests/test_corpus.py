import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gt_ray import corpus as corpus_mod
from gt_ray import shadow
from gt_ray import tasks
from gt_ray.config import ExperimentConfig, FinetuneConfig, PairConfig, TaskConfig
from gt_ray.corpus import Corpus, CorpusDataset, completed_subsets, corpus_schema, corpus_stats, read_shard, rows_to_table, split_by_subset, table_to_tensors, write_manifest, write_shard
from gt_ray.shadow import ShadowSubset, finetune_pair, plan_subsets
from gt_ray.models import load_card_side, make_pair_card
from tests.conftest import TASK_NAMES, tiny_spec

FT = FinetuneConfig(lr=3e-3, steps=6, batch_size=8, n_examples=32, snapshot_steps=[4, 6])


@pytest.fixture(scope="module")
def cfg():
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96))
    return ExperimentConfig(pair=pair, tasks=TaskConfig(names=TASK_NAMES), finetune=FT)


@pytest.fixture(scope="module")
def card(cfg, tiny_path, gqa_path):
    return make_pair_card(cfg.pair, tiny_path, gqa_path)


@pytest.fixture(scope="module")
def built(cfg, card, tmp_path_factory):
    """A 4-subset corpus built in-process, with the rows the 'worker' produced."""
    out = tmp_path_factory.mktemp("corpus")
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    produced = {}
    for subset in plan_subsets(cfg, 4, seed=5):
        rows = finetune_pair(tiny, llm, subset, FT)
        produced[subset.subset_id] = rows
        write_shard(out, subset.subset_id, rows, corpus_schema(card))
    write_manifest(out, card, {"test": True}, 4)
    return out, produced


def test_plan_uses_public_split_only(cfg):
    subsets = plan_subsets(cfg, 20, seed=5)
    assert all(s.spec.split == "public" for s in subsets)
    assert plan_subsets(cfg, 30, seed=5)[:20] == subsets  # growing keeps earlier subsets
    private = tasks.DatasetSpec("private_train", 1, {"add": 1.0}, 8, 1)
    with pytest.raises(ValueError, match="the shadow corpus may only use"):
        ShadowSubset(0, private)


def test_building_never_touches_the_private_split(cfg, card, monkeypatch):
    seen = []
    real = tasks.sample_input

    def spy(task, split, rng, max_tries=10_000):
        seen.append(split)
        return real(task, split, rng, max_tries)

    monkeypatch.setattr(tasks, "sample_input", spy)
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    finetune_pair(tiny, llm, plan_subsets(cfg, 1, seed=9)[0], FT)
    assert seen and set(seen) == {"public"}


def test_shards_read_back_bit_identical(built):
    out, produced = built
    corpus = Corpus(out)
    assert corpus.subset_ids == [0, 1, 2, 3]
    data = corpus.load()
    assert data["tiny"].shape == (8, 2, 256) and data["llm"].shape == (8, 3, 320)
    for i in range(8):
        row = produced[int(data["subset_id"][i])][[4, 6].index(int(data["step"][i]))]
        assert torch.equal(data["tiny"][i].reshape(-1), torch.tensor(row["tiny"], dtype=torch.float32))
        assert torch.equal(data["llm"][i].reshape(-1), torch.tensor(row["llm"], dtype=torch.float32))
    streamed = list(CorpusDataset(corpus, subset_ids=[1, 3], batch_rows=3))
    sel = (data["subset_id"] == 1) | (data["subset_id"] == 3)
    assert len(streamed) == int(sel.sum())
    torch.testing.assert_close(torch.stack([t for t, _ in streamed]), data["tiny"][sel], rtol=0, atol=0)


def test_rows_are_checked(built, card, tmp_path):
    out, produced = built
    rows = [dict(r) for r in produced[0]]
    rows[1]["llm"] = rows[0]["llm"]
    p = write_shard(tmp_path, 0, rows, corpus_schema(card))
    with pytest.raises(ValueError, match="repeated llm update vectors"):
        corpus_mod.check_rows(read_shard(p, card), p.name)
    rows = [dict(r) for r in produced[0]]
    rows[0]["tiny"] = [0.0] * len(rows[0]["tiny"])
    p = write_shard(tmp_path, 0, rows, corpus_schema(card))
    with pytest.raises(ValueError, match=r"zero tiny update vector in row\(s\) \[0\]"):
        corpus_mod.check_rows(read_shard(p, card), p.name)


def test_corrupt_and_mismatched_shards_are_reported(built, card, cfg, tiny_path, tmp_path):
    out, _ = built
    copy = tmp_path / "c"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / "shard-00002.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corpus shard shard-00002.parquet is corrupt: sha256 differs"):
        Corpus(copy)
    shard.write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match="shard-00002.parquet: corrupt or unreadable Parquet shard"):
        read_shard(shard, card)
    (copy / "shard-00001.parquet").unlink()
    with pytest.raises(ValueError, match="corpus shard shard-00001.parquet is missing"):
        Corpus(copy)
    other = make_pair_card(cfg.pair, tiny_path, tiny_path)  # another LLM: other layout
    with pytest.raises(ValueError, match="does not match the pair card's"):
        read_shard(out / "shard-00000.parquet", other)
    with pytest.raises(ValueError, match="incomplete: 1 subset"):
        write_manifest(copy, card, {}, 4)


def test_schema_metadata_has_shapes(built):
    out, _ = built
    meta = json.loads(pq.read_schema(out / "shard-00000.parquet").metadata[b"gt_ray"])
    assert meta["tiny_shape"] == [2, 256] and meta["llm_shape"] == [3, 320]


def test_completed_subsets_ignores_temporary_files(tmp_path):
    (tmp_path / ".shard-00003.parquet.tmp-abcd").write_bytes(b"half")
    (tmp_path / "shard-00001.parquet").write_bytes(b"x")
    assert completed_subsets(tmp_path) == {1}


def test_split_by_subset_has_no_overlap():
    train, val, test = split_by_subset(range(40), 0.1, 0.2, seed=3)
    assert len(val) == 4 and len(test) == 8 and sorted(train + val + test) == list(range(40))
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert split_by_subset(range(40), 0.1, 0.2, seed=3) == (train, val, test)  # seeded
    assert split_by_subset(range(40), 0.1, 0.2, seed=4) != (train, val, test)
    with pytest.raises(ValueError, match="need at least 3 subsets"):
        split_by_subset([1, 2], 0.2, 0.2, 0)
    with pytest.raises(ValueError, match="leave none for training"):
        split_by_subset(range(4), 0.5, 0.5, 0)


def test_stats(built):
    stats = corpus_stats(Corpus(built[0]))
    assert stats["n_subsets"] == 4 and stats["n_rows"] == 8 and stats["steps"] == [4, 6]
    assert len(stats["llm_layer_norm_mean"]) == 3
    assert -1 <= stats["llm_mean_cos_between_subsets"] <= 1


def test_rows_are_numpy_and_reach_arrow_without_a_copy(built, card):
    _, produced = built
    rows = produced[0]
    assert all(isinstance(r[c], np.ndarray) and r[c].dtype == np.float32 for r in rows for c in ("tiny", "llm"))
    table = rows_to_table(rows, corpus_schema(card))
    for i, row in enumerate(rows):  # each row's chunk is the row's own buffer
        chunk = table.column("llm").chunk(i)
        assert chunk.values.buffers()[1].address == row["llm"].ctypes.data
    with pytest.raises(ValueError, match="column tiny: row 1: update vector has 5 values, the card's layout has 512"):
        rows_to_table([rows[0], {**rows[1], "tiny": np.ones(5, dtype=np.float32)}], corpus_schema(card))


def test_table_to_tensors_views_arrow_memory(built, card):
    out, produced = built
    table = read_shard(out / "shard-00001.parquet", card)
    assert table.column("tiny").num_chunks == 1
    t = table_to_tensors(table, (2, 256), (3, 320))
    assert t["tiny"].data_ptr() == table.column("tiny").chunk(0).values.buffers()[1].address
    torch.testing.assert_close(t["llm"][1].reshape(-1), torch.from_numpy(produced[1][1]["llm"]), rtol=0, atol=0)
    assert t["step"].tolist() == [4, 6] and t["subset_id"].dtype == torch.long


def test_load_reads_many_row_groups_and_filters(built, card, tmp_path):
    out, produced = built
    for i, rows in produced.items():  # one row per row group
        write_shard(tmp_path, i, rows, corpus_schema(card), row_group_bytes=1)
    write_manifest(tmp_path, card, {}, 4)
    assert pq.ParquetFile(tmp_path / "shard-00002.parquet").num_row_groups == 2
    small, ref = Corpus(tmp_path).load(subset_ids=[3, 1], steps=[6]), Corpus(out).load()
    assert small["subset_id"].tolist() == [1, 3] and small["step"].tolist() == [6, 6]
    sel = (ref["step"] == 6) & ((ref["subset_id"] == 1) | (ref["subset_id"] == 3))
    for key in ("tiny", "llm", "secret_k"):
        torch.testing.assert_close(small[key], ref[key][sel], rtol=0, atol=0)
    empty = Corpus(tmp_path).load(subset_ids=[])
    assert empty.keys() == ref.keys() and empty["llm"].shape == (0, 3, 320)
    streamed = list(CorpusDataset(Corpus(tmp_path), subset_ids=[2], batch_rows=1))
    torch.testing.assert_close(torch.stack([lm for _, lm in streamed]), ref["llm"][ref["subset_id"] == 2], rtol=0, atol=0)


# ----------------------------------------------------------------------------- TinyLM-only subsets


@pytest.fixture(scope="module")
def mixed(cfg, card, tmp_path_factory):
    """A corpus of 3 paired and 2 TinyLM-only subsets, built in-process."""
    out = tmp_path_factory.mktemp("mixed")
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    produced = {}
    for subset in plan_subsets(cfg, 3, seed=5) + plan_subsets(cfg, 2, seed=5, kind="tiny_only"):
        if shadow.is_tiny_only(subset.subset_id):
            rows = shadow.finetune_tiny_only(tiny, subset, FT)
        else:
            rows = finetune_pair(tiny, llm, subset, FT)
        produced[subset.subset_id] = rows
        write_shard(out, subset.subset_id, rows, corpus_schema(card))
    manifest = write_manifest(out, card, {"test": True}, 3, n_tiny_only=2)
    return out, produced, manifest


def test_tiny_only_subsets_have_their_own_ids_and_stream(cfg):
    paired = plan_subsets(cfg, 4, seed=5)
    tiny_only = plan_subsets(cfg, 4, seed=5, kind="tiny_only")
    base = shadow.TINY_ONLY_BASE
    assert [s.subset_id for s in tiny_only] == [base, base + 1, base + 2, base + 3]
    assert all(s.spec.split == "public" for s in tiny_only)
    assert {s.spec.seed for s in tiny_only}.isdisjoint({s.spec.seed for s in paired})  # other subsets
    assert plan_subsets(cfg, 6, seed=5, kind="tiny_only")[:4] == tiny_only  # growing keeps earlier ones
    with pytest.raises(ValueError, match="subset kind must be one of"):
        plan_subsets(cfg, 1, seed=5, kind="llm_only")


def test_tiny_only_rows_equal_the_tiny_half_of_a_pair(cfg, card):
    """The same examples, order and seed: the TinyLM update does not depend on the LLM's presence."""
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    subset = plan_subsets(cfg, 1, seed=5, kind="tiny_only")[0]
    only = shadow.finetune_tiny_only(tiny, subset, FT)
    pair = finetune_pair(tiny, llm, subset, FT)
    assert [r["step"] for r in only] == FT.snapshot_steps
    for a, b in zip(only, pair):
        assert a["llm"] is None and a["llm_loss"] is None
        np.testing.assert_array_equal(a["tiny"], b["tiny"])
        assert np.abs(a["tiny"]).max() > 0
    with pytest.raises(ValueError, match="is a paired subset"):
        shadow.finetune_tiny_only(tiny, plan_subsets(cfg, 1, seed=5)[0], FT)


def test_mixed_corpus_counts_and_loads_each_kind(mixed):
    out, produced, manifest = mixed
    base = shadow.TINY_ONLY_BASE
    assert (manifest["n_subsets"], manifest["n_tiny_only_subsets"]) == (3, 2)
    assert (manifest["n_rows"], manifest["n_tiny_only_rows"]) == (3 * len(FT.snapshot_steps), 2 * len(FT.snapshot_steps))
    corpus = Corpus(out)
    assert corpus.subset_ids == [0, 1, 2]
    assert corpus.tiny_only_ids == [base, base + 1]
    assert corpus.all_subset_ids == [0, 1, 2, base, base + 1]
    paired = corpus.load()  # default: the paired subsets, both sides
    assert sorted(set(paired["subset_id"].tolist())) == [0, 1, 2]
    only = corpus.load(corpus.tiny_only_ids, sides=("tiny",))
    assert set(only) == {"tiny", "subset_id", "step", "secret_k"}
    expected = np.stack([r["tiny"] for i in corpus.tiny_only_ids for r in produced[i]])
    np.testing.assert_array_equal(only["tiny"].reshape(len(expected), -1).numpy(), expected)
    with pytest.raises(ValueError, match="TinyLM-only subset\\(s\\) .* have no LLM update"):
        corpus.load([base])
    specs = corpus.subset_specs()
    assert set(specs) == {0, 1, 2, base, base + 1}  # the function loss regenerates their examples
    stats = corpus_stats(corpus)
    assert (stats["n_subsets"], stats["n_tiny_only_subsets"]) == (3, 2)


def test_manifest_refuses_a_shard_of_the_wrong_kind(cfg, card, mixed, tmp_path):
    out, produced, _ = mixed
    base = shadow.TINY_ONLY_BASE
    for i in (0, 1, 2):
        write_shard(tmp_path, i, produced[i], corpus_schema(card))
    write_shard(tmp_path, base, produced[0], corpus_schema(card))  # paired rows under a TinyLM-only id
    with pytest.raises(ValueError, match="llm vectors are null; a TinyLM-only shard needs all"):
        write_manifest(tmp_path, card, {}, 3, n_tiny_only=1)
    with pytest.raises(ValueError, match="incomplete: 1 subset"):
        write_manifest(tmp_path, card, {}, 3, n_tiny_only=2)

"""Storage through pyarrow.fs: local paths unchanged, and a corpus on a real S3 API.

The S3 side talks HTTP to moto's S3 server, started here as a separate process on
127.0.0.1 (no mocked client): the same requests a real bucket would get.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from gt_ray import storage
from gt_ray.config import ExperimentConfig, FinetuneConfig, PairConfig, TaskConfig
from gt_ray.corpus import Corpus, completed_subsets, corpus_schema, finetune_pair, plan_subsets, write_manifest, write_shard
from gt_ray.models import PairCard, load_card_side, make_pair_card
from tests.conftest import TASK_NAMES, tiny_spec

FT = FinetuneConfig(lr=3e-3, steps=4, batch_size=8, n_examples=16, snapshot_steps=[2, 4])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; yields the URI prefix of that bucket."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180  # importing moto takes long on a loaded machine
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("gt-ray")
    yield f"s3://gt-ray/{{}}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def pair_and_rows(tiny_path, gqa_path):
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96))
    cfg = ExperimentConfig(pair=pair, tasks=TaskConfig(names=TASK_NAMES), finetune=FT)
    card = make_pair_card(cfg.pair, tiny_path, gqa_path)
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    return card, {s.subset_id: finetune_pair(tiny, llm, s, FT) for s in plan_subsets(cfg, 3, seed=3)}


def test_corpus_shards_and_manifest_through_s3(s3, pair_and_rows):
    card, produced = pair_and_rows
    uri = s3.format("runs/corpus")
    assert completed_subsets(uri) == set()
    for i, rows in produced.items():
        assert write_shard(uri, i, rows, corpus_schema(card)) == s3.format(f"runs/corpus/shard-{i:05d}.parquet")
    card.save(storage.join(uri, "pair_card.json"))
    manifest = write_manifest(uri, card, {"test": True}, 3)
    fs, root = storage.resolve(uri)
    assert isinstance(fs, pafs.S3FileSystem) and root == "gt-ray/runs/corpus"
    listed = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root)))
    assert listed == ["manifest.json", "pair_card.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert completed_subsets(uri) == {0, 1, 2} and manifest["n_rows"] == 6

    corpus = Corpus(uri)
    assert corpus.directory == uri and corpus.card() == card
    assert PairCard.load(storage.join(uri, "pair_card.json")) == card
    data = corpus.load(steps=[4])
    assert data["subset_id"].tolist() == [0, 1, 2]
    for j, i in enumerate(data["subset_id"].tolist()):
        expected = torch.from_numpy(produced[i][1]["llm"]).reshape(3, 320)
        torch.testing.assert_close(data["llm"][j], expected, rtol=0, atol=0)

    shard = storage.join(uri, "shard-00001.parquet")
    raw = bytearray(storage.read_bytes(shard))
    raw[len(raw) // 2] ^= 0xFF
    storage.write_bytes(shard, bytes(raw))
    with pytest.raises(ValueError, match="corpus shard shard-00001.parquet is corrupt: sha256 differs"):
        Corpus(uri)
    with pytest.raises(ValueError, match=r"no corpus at s3://gt-ray/elsewhere\?.*: manifest.json missing"):
        Corpus(s3.format("elsewhere"))


def test_a_failed_write_leaves_no_object(s3):
    uri = s3.format("partial/file.bin")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_output(uri) as f:
            f.write(b"half of it")
            raise RuntimeError("boom")
    assert not storage.exists(uri)
    storage.write_text(uri, "whole")
    assert storage.read_text(uri) == "whole" and storage.list_names(s3.format("partial")) == ["file.bin"]


def test_ray_gets_the_same_location(s3, tmp_path, monkeypatch):
    path, fs = storage.ray_storage(s3.format("runs/ray_results"))
    assert path == "gt-ray/runs/ray_results" and isinstance(fs, pafs.S3FileSystem)
    monkeypatch.chdir(tmp_path)
    assert storage.ray_storage("runs/x") == (str(tmp_path / "runs/x"), None)
    assert storage.ray_storage(f"file://{tmp_path}/y") == (f"{tmp_path}/y", None)


def test_local_paths_and_file_uris_are_the_same_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_text("a/b.txt", "x")  # relative: the cwd, as before
    assert (tmp_path / "a/b.txt").read_text() == "x"
    assert storage.read_text(f"file://{tmp_path}/a/b.txt") == "x"
    assert storage.join("a", "b.txt") == str(Path("a/b.txt"))
    assert storage.join("s3://b/p?region=x", "c") == "s3://b/p/c?region=x"
    assert storage.list_names(tmp_path / "a") == ["b.txt"] and storage.list_names(tmp_path / "none") == []
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary left
    with pytest.raises(ValueError, match=r"storage location 'nosuch://x/y': .*Unrecognized filesystem type"):
        storage.resolve("nosuch://x/y")


@pytest.mark.ray
def test_sweep_on_ray_with_corpus_results_and_best_config_on_s3(s3, pair_and_rows, ray_cluster):
    """Ray Tune's RunConfig gets the S3 location; trials read the corpus from S3."""
    from gt_ray.config import CorpusConfig, SweepConfig
    from jobs.common import work_location
    from jobs.tune_translator import tune

    card, produced = pair_and_rows
    corpus_uri = s3.format("sweep/corpus")
    for i, rows in produced.items():
        write_shard(corpus_uri, i, rows, corpus_schema(card))
    write_manifest(corpus_uri, card, {}, 3)  # three subsets: train / validation / test
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96))
    cfg = ExperimentConfig(pair=pair, tasks=TaskConfig(names=TASK_NAMES), finetune=FT, work_dir=s3.format("sweep"),
                           corpus=CorpusConfig(n_subsets=3, storage_path=corpus_uri),
                           sweep=SweepConfig(num_samples=2, max_concurrent_trials=2, max_epochs=2, grace_period=1,
                                             d_model=[16], num_layers=[1], batch_size=[2], cpus_per_trial=0.5))
    best = tune(cfg)
    assert best == work_location(cfg, "translator_best.yaml") and best.startswith("s3://gt-ray/sweep/")
    assert "d_model: 16" in storage.read_text(best)
    fs, results = storage.resolve(work_location(cfg, "ray_results"))
    (run,) = fs.get_file_info(pafs.FileSelector(results))
    trials = [i.base_name for i in fs.get_file_info(pafs.FileSelector(run.path)) if i.base_name.startswith("trial-")]
    assert len(trials) == 2

"""Storage through pyarrow.fs: local paths unchanged, and a corpus on a real S3 API.

The S3 side talks HTTP to moto's S3 server, started here as a separate process on
127.0.0.1 (no mocked client): the same requests a real bucket would get.
"""

import json
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
from gt_ray.corpus import Corpus, completed_subsets, corpus_schema, write_manifest, write_shard
from gt_ray.shadow import finetune_pair, plan_subsets
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


def test_listing_a_directory_that_changes_while_listed_retries(tmp_path, monkeypatch):
    # pyarrow can raise FileNotFoundError despite allow_not_found when the directory appears
    # or vanishes mid-listing (a corpus build polled by a test); list_names lists again
    storage.write_text(tmp_path / "a.txt", "x")
    real = pafs.LocalFileSystem()
    calls = {"n": 0}

    class Racy:
        def get_file_info(self, selector):
            calls["n"] += 1
            if calls["n"] <= failures:
                raise FileNotFoundError("Cannot list directory")
            return real.get_file_info(selector)

    monkeypatch.setattr(storage, "resolve", lambda location: (Racy(), str(location)))
    failures = 1
    assert storage.list_names(tmp_path) == ["a.txt"] and calls["n"] == 2
    calls["n"], failures = 0, 5
    assert storage.list_names(tmp_path) == [] and calls["n"] == 3  # gives up: as good as not there


@pytest.mark.ray
def test_sweep_on_ray_with_corpus_results_and_best_config_on_s3(s3, pair_and_rows, ray_cluster):
    """Ray Tune's RunConfig gets the S3 location; trials read the corpus from S3."""
    from gt_ray.config import CorpusConfig
    from gt_ray.translator.config import SweepConfig
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


@pytest.mark.ray
def test_translator_train_and_eval_with_the_work_dir_on_s3(s3, pair_and_rows, ray_cluster):
    """`translator train` writes the checkpoint (weights, config, history, input norms) to
    S3, a rerun finds it there, `translator eval` and the service's loaders read it back."""
    from gt_ray.config import CorpusConfig, TranslatorSection
    from gt_ray.pipeline import translator_dir
    from gt_ray.translator.checkpoint import (CONFIG_FILENAME, HISTORY_FILENAME, MODEL_FILENAME, NORM_BOUND_FILE,
                                              load_norm_bound, load_translator)
    from gt_ray.translator.config import TrainConfig, TranslatorConfig
    from jobs.common import work_location
    from jobs.eval_translator import EVAL_FILE, evaluate
    from jobs.train_translator import train

    card, produced = pair_and_rows
    pair = PairConfig(tiny=tiny_spec(), llm=tiny_spec(hidden=48, layers=3, heads=6, kv_heads=2, ffn=96))
    corpus_uri = s3.format("train/corpus")
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    more = ExperimentConfig(pair=pair, tasks=TaskConfig(names=TASK_NAMES), finetune=FT)
    for s in plan_subsets(more, 7, seed=3):  # 5 training subsets: enough for every baseline of the eval
        rows = produced[s.subset_id] if s.subset_id in produced else finetune_pair(tiny, llm, s, FT)
        write_shard(corpus_uri, s.subset_id, rows, corpus_schema(card))
    write_manifest(corpus_uri, card, {}, 7)
    cfg = ExperimentConfig(
        pair=pair, tasks=TaskConfig(names=TASK_NAMES), finetune=FT, work_dir=s3.format("train"),
        corpus=CorpusConfig(n_subsets=7, storage_path=corpus_uri),
        translator=TranslatorSection(model=TranslatorConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, dropout=0.0),
                                     train=TrainConfig(lr=1e-3, batch_size=2, max_epochs=2, patience=2)))
    out = train(cfg)
    assert out == translator_dir(cfg) == work_location(cfg, "translator") and out.startswith("s3://gt-ray/train/")
    assert storage.list_names(out) == sorted([CONFIG_FILENAME, MODEL_FILENAME, HISTORY_FILENAME, NORM_BOUND_FILE])
    before = storage.read_bytes(storage.join(out, MODEL_FILENAME))
    assert train(cfg) == out and storage.read_bytes(storage.join(out, MODEL_FILENAME)) == before  # cached on S3
    translator = load_translator(out, expected_fingerprints={"tiny": card.tiny.layout_fingerprint,
                                                           "llm": card.llm.layout_fingerprint})
    assert translator.metadata["card_id"] == card.card_id
    bound = load_norm_bound(out, fingerprint=card.tiny.layout_fingerprint)
    assert bound is not None and 0 < bound.min_norm <= bound.max_norm
    result = evaluate(cfg)  # reads the checkpoint from S3, writes translator_eval.json there
    stored = json.loads(storage.read_text(work_location(cfg, EVAL_FILE)))
    assert stored["methods"].keys() == result["methods"].keys() and stored["test_subsets"] == result["test_subsets"]


def test_translator_checkpoint_and_norm_bound_round_trip_through_s3(s3, tmp_path):
    """The library side, without Ray: the same files at a URI and at a path, read back equal."""
    from gt_ray.translator.checkpoint import load_norm_bound, load_translator, save_translator, write_norm_bound
    from gt_ray.translator.config import TranslatorConfig
    from gt_ray.translator.model import GradTransformer, Normalizer, Translator

    torch.manual_seed(0)
    config = TranslatorConfig(d_tiny=6, L_tiny=2, d_llm=10, L_llm=3, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    x, y = torch.randn(5, 2, 6), torch.randn(5, 3, 10)
    translator = Translator(config, GradTransformer(config), Normalizer.fit(x, y, "coordinate")).eval()
    uri = s3.format("ckpt/translator")
    assert save_translator(translator, uri, {"fingerprints": {"tiny": "t"}}) == uri
    save_translator(translator, tmp_path / "translator", {"fingerprints": {"tiny": "t"}})
    assert storage.list_names(uri) == sorted(p.name for p in (tmp_path / "translator").iterdir())
    assert storage.read_text(storage.join(uri, "translator.json")) == (tmp_path / "translator/translator.json").read_text()
    remote, local = load_translator(uri, expected_fingerprints={"tiny": "t"}), load_translator(tmp_path / "translator")
    for name, tensor in translator.state_dict().items():  # safetensors' header order varies: compare tensors
        torch.testing.assert_close(remote.state_dict()[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(local.state_dict()[name], tensor, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(remote.translate(x), translator.translate(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"translator checkpoint s3://gt-ray/nothing\?.* is missing translator.json"):
        load_translator(s3.format("nothing"))
    write_norm_bound(uri, x, "t")
    assert load_norm_bound(uri, fingerprint="t").max_norm == pytest.approx(float(x.flatten(1).norm(dim=1).max()))


def test_service_args_take_a_checkpoint_and_card_uri_but_keep_state_and_tokens_local(s3, tmp_path):
    from serve.schemas import ProviderArgs

    checkpoint, card = s3.format("svc/translator"), s3.format("svc/pair_card.json")
    storage.write_text(storage.join(checkpoint, "translator.json"), "{}")
    storage.write_text(card, "{}")
    (tmp_path / "tokens.json").write_text("{}")
    args = ProviderArgs(checkpoint=checkpoint, card=card, tokens=str(tmp_path / "tokens.json"), state_dir=str(tmp_path))
    assert (args.checkpoint, args.card) == (checkpoint, card)
    with pytest.raises(ValueError, match="state_dir must be a local path .* uses file locks"):
        ProviderArgs(checkpoint=checkpoint, card=card, tokens=str(tmp_path / "tokens.json"), state_dir=s3.format("state"))
    with pytest.raises(ValueError, match=r"checkpoint s3://gt-ray/svc/elsewhere\?.* holds no translator.json"):
        ProviderArgs(checkpoint=s3.format("svc/elsewhere"), card=card, tokens=str(tmp_path / "tokens.json"),
                     state_dir=str(tmp_path))


def test_private_files_are_owner_only(tmp_path):
    """Organizations' vectors and privacy ledgers are written 0600; other artifacts follow the umask."""
    storage.write_bytes(tmp_path / "secret.bin", b"x", private=True)
    storage.write_json(tmp_path / "ledger.json", {"a": 1}, private=True)
    storage.write_bytes(tmp_path / "public.bin", b"y")
    assert (tmp_path / "secret.bin").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ledger.json").stat().st_mode & 0o777 == 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "public.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "public.bin", "secret.bin"]  # no temp files

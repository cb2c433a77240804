"""``gt-ray org``: result lines, one-line errors with exit code 2, and no Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs import org as org_cli
from tests.conftest import ROOT
from tests.org_fixtures import DATA, card_path  # noqa: F401  (a fixture)


def test_cli_vector_release_prints_the_ledger_total_and_budget_refusal(card_path, tmp_path, capsys):
    common = ["finetune", "--card", str(card_path), "--data", DATA, "--steps", "4", "--batch-size", "8",
              "--vector-epsilon", "1", "--vector-mechanism", "laplace", "--vector-clip", "2",
              "--ledger", str(tmp_path / "ledger.json"), "--eps-budget", "1.5", "--org-id", "acme"]
    org_cli.main(common + ["--out", str(tmp_path / "a.safetensors"), "--round", "r1"])
    out = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert out["vector_mechanism"] == "laplace" and out["vector_delta"] == "0"
    assert (out["ledger_spent_epsilon"], out["ledger_releases"]) == ("1", "1")
    with pytest.raises(SystemExit) as exc:
        org_cli.main(common + ["--out", str(tmp_path / "b.safetensors"), "--round", "r2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: privacy budget exceeded for organization 'acme': spent epsilon=1")
    assert not (tmp_path / "b.safetensors").exists()


def test_cli_finetune_that_does_not_move_the_weights_prints_one_error_line(card_path, tmp_path, capsys):
    # lr 1e-50 is 0 in float32: AdamW leaves every LoRA weight where it was.
    out = tmp_path / "v.safetensors"
    with pytest.raises(SystemExit) as exc:
        org_cli.main(["finetune", "--card", str(card_path), "--data", DATA, "--out", str(out), "--steps", "2",
                     "--batch-size", "8", "--lr", "1e-50", "--seed", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: LoRA weights did not move by step 1: the update is zero "
        "(try a larger --lr or more --steps; nothing was written)"]
    assert not out.exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "org", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_finetune_bad_input_exits_2_with_one_error_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    r = _cli("finetune", "--card", "card.json", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "v"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'bad.jsonl'}:1: not valid JSON (Expecting property name enclosed in double quotes)"]


def test_cli_submit_bad_input_exits_2_with_one_error_line(tmp_path):
    (tmp_path / "v.safetensors").write_bytes(b"junk")
    r = _cli("submit", "--endpoint", "http://127.0.0.1:9", "--token", "t", "--round", "r1", "--org-id", "acme",
             str(tmp_path / "v.safetensors"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "not a readable safetensors file" in r.stderr
    r = _cli("submit", "--endpoint", "http://127.0.0.1:9", "--round", "r1", "--org-id", "acme", "v")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: gt-ray org submit: one of the arguments --token --token-file is required (see --help)")


def test_org_finetune_runs_without_loading_ray(card_path, tmp_path):
    code = (f"import sys\nfrom jobs import org\n"
            f"org.main(['finetune', '--card', {str(card_path)!r}, '--data', {DATA!r}, '--out', "
            f"{str(tmp_path / 'v.safetensors')!r}, '--steps', '4', '--batch-size', '8', '--seed', '0'])\n"
            "print('ray_loaded=' + str(any(m == 'ray' or m.startswith('ray.') for m in sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert out["ray_loaded"] == "False" and out["dp_sgd"] == "off" and out["n_examples"] == "32"
    assert Path(out["path"]).is_file()

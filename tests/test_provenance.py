"""Every results file names the code and the config that produced it."""

import subprocess

from gt_ray.config import load_yaml
from jobs.common import provenance
from tests.conftest import ROOT


def test_provenance_names_the_commit_and_the_config():
    cfg = load_yaml(ROOT / "configs" / "ci.yaml")
    p = provenance(cfg)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert p["git_commit"] == head and len(head) == 40
    assert isinstance(p["git_dirty"], bool)
    assert p["config"]["corpus"]["n_subsets"] == cfg.corpus.n_subsets
    assert p["config"]["translator"]["val_fraction"] == cfg.translator.val_fraction

"""The main job: the whole Grad-Transformer pipeline at the configured scale.

    gt-ray demo                      # configs/tiny.yaml on an embedded local Ray cluster
    gt-ray demo --config configs/ci.yaml

Every stage is cached in ``work_dir`` (and pretrained models in ``cache_dir``), so a
rerun reuses what is done. Stages so far: prepare the pair (pretraining on first run)
and the pair report (accuracy of both models per task before/after LoRA fine-tuning).
"""

from __future__ import annotations

import time

from jobs import prepare_pair
from jobs.common import base_parser, kv, load_config, work_dir, write_json


def main(argv=None) -> None:
    args = base_parser("Run the gt-ray pipeline end to end").parse_args(argv)
    cfg = load_config(args.config)
    t0 = time.time()
    card = prepare_pair.load_or_prepare_card(cfg)
    kv(stage="pair", seconds=round(time.time() - t0, 1))
    report_path = work_dir(cfg) / prepare_pair.REPORT_FILE
    rep = prepare_pair.report(cfg, card)
    write_json(report_path, rep)
    print(prepare_pair.format_report(rep))
    kv(stage="demo", status="done", seconds=round(time.time() - t0, 1), results=report_path)

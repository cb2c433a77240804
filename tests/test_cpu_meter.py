"""The demo's per-stage CPU accounting counts this process and its children."""

import subprocess
import sys

from jobs.common import CpuMeter


def test_cpu_meter_counts_busy_children_and_not_sleep():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
    with CpuMeter(interval=0.2) as busy_meter:
        subprocess.run([sys.executable, "-c", busy], check=True)
    with CpuMeter(interval=0.2) as idle_meter:
        subprocess.run([sys.executable, "-c", "import time; time.sleep(1.0)"], check=True)
    b, i = busy_meter.result(), idle_meter.result()
    assert b["cpu_seconds"] >= 0.8 and b["wall_seconds"] >= 1.0
    assert i["cpu_seconds"] < 0.5 and i["wall_seconds"] >= 1.0
    assert 0 < b["core_utilization"] <= 1.0 and i["core_utilization"] < b["core_utilization"]

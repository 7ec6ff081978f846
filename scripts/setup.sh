#!/usr/bin/env bash
# Create .venv and install the project into it. `bash scripts/setup.sh dev` adds test tools.
# torch is pinned to the CPU build these machines carry on disk; on a GPU cluster install the CUDA
# build of torch first (see README), then run this script: pip keeps the torch you have.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip show torch >/dev/null 2>&1 || .venv/bin/python -m pip install -q "torch==2.13.0"
# DeepSpeed builds its CUDA/CPU ops lazily at run time; DS_BUILD_OPS=0 keeps the install fast.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".${extra}"

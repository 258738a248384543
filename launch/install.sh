#!/usr/bin/env bash
# Creates ./.venv with everything the project, its tests and its benchmarks need.
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# A C++ compiler builds the CPU kernels (instaflow_jax/models/formulations/cpu_kernels.cc).
if ! command -v "${CXX:-c++}" >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q g++ >/dev/null
fi
# A headless browser for the live page's test (tests/test_serve.py takes its screenshot).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q chromium >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
# torch and torchvision first, as a matched pair: other versions pull multi-GB CUDA builds,
# and a torchvision that does not match torch breaks `import transformers`.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[test]'
# Build the kernels now, so that a compiler problem shows here rather than as a warning later.
.venv/bin/python -c 'from instaflow_jax.models.formulations import cpu_kernels as k; k.built_library()'

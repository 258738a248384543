#!/usr/bin/env bash
# The GPU benchmark on a lent GPU machine without internet: ours vs diffusers/transformers at
# Stable Diffusion 1.5 shapes (bench.py --config sd15). See benchmarks/README.md.
#   .venv/bin/python benchmarks/prepare_gpu.py    # here, first: the wheels into .whl/
#   bash benchmarks/gpu.sh [bench.py flags]       # there, with .whl carried
# e.g. `bash benchmarks/gpu.sh --rows train_b8` for one row. It installs only from .whl/ and
# writes gpu_bench.json and gpu_bench.log to $OUT (default /tmp/gpu_bench_out).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "gpu.sh: no wheels in .whl/: run benchmarks/prepare_gpu.py first and carry .whl" >&2
  exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv || echo "nvidia-smi failed"
  python3 - <<'EOF'
import importlib.metadata as metadata
import sys
names = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax', 'torch',
         'diffusers', 'transformers', 'huggingface-hub', 'safetensors', 'numpy', 'ml-collections')
versions = []
for name in names:
  try:
    versions.append(f'{name} {metadata.version(name)}')
  except metadata.PackageNotFoundError:
    pass
print('python', sys.version.split()[0], '|', ', '.join(versions))
EOF
  PYTHONUNBUFFERED=1 python3 benchmarks/bench.py --config sd15 --out "$OUT/gpu_bench.json" "$@"
} 2>&1 | tee "$OUT/gpu_bench.log"

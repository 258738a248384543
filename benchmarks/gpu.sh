#!/usr/bin/env bash
# The GPU benchmark, for the lent GPU machine (no internet): ours vs diffusers/transformers at
# Stable Diffusion 1.5 shapes. See benchmarks/README.md. Run from anywhere:
#   bash benchmarks/gpu.sh [extra bench.py flags]
# diffusers is not on that machine: its wheel travels in .whl/ (git-ignored, so the run must
# carry '.whl'). Results go to $OUT (gpu_bench.json, gpu_bench.log).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT"

{
  # diffusers 0.42 imports names that huggingface_hub gained in 1.32; bring the carried 1.x
  # wheel (which transformers 5 also accepts) only when the machine's one is older.
  if ! python3 -c 'from diffusers import AutoencoderKL, UNet2DConditionModel' 2>/dev/null; then
    echo "diffusers does not import with this huggingface_hub; installing .whl/fallback/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/fallback/*.whl
    python3 -c 'from diffusers import AutoencoderKL, UNet2DConditionModel' || echo "diffusers still does not import"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv || echo "nvidia-smi failed"
  python3 - <<'EOF'
import importlib.metadata as metadata
import sys
names = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax', 'torch',
         'diffusers', 'transformers', 'huggingface-hub', 'safetensors', 'numpy')
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

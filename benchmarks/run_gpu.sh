#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, as run on a lent H100 (no network there; JAX, Flax
# and Optax come with its image). Results go to $OUT (or benchmarks/results/).
set -uo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
python3 -m benchmarks.gpu_mfu --sizes=400M,100M --workers=1,8 --out="$out/gpu_mfu.json" \
  2>&1 | tee "$out/gpu_mfu.log"

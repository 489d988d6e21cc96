#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, as run on a lent H100 (no network there; JAX, Flax
# and Optax come with its image). Results go to $OUT (or benchmarks/results/gpu/): the log,
# JSON per command, perfetto traces of 2 steps of the traced variants (their kernel tables are in
# the log). Each command is capped so that one slow compile cannot take the whole lease.
set -uo pipefail
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
m="python3 -m benchmarks.gpu_mfu --amortised=false --reps=3 --steps=10"
echo "== 400M DDP (default XLA flags), traced"; timeout 150 $m --sizes=400M --workers= \
  --trace_dir="$out" --out="$out/a_400M.json"
echo "== 100M DDP and K = 8 on one card, traced"; timeout 150 $m --sizes=100M --workers=8 \
  --trace_dir="$out" --out="$out/b_100M.json"
echo "== 400M DDP, q|k|v and gate|up fused"; timeout 100 $m --sizes=400M --workers= \
  --fused_projections --out="$out/c_400M_fused.json"
echo "== 400M DDP, --xla_gpu_enable_triton_gemm=false"; XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \
  timeout 100 $m --sizes=400M --workers= --out="$out/d_400M_notriton.json"
} 2>&1 | tee "$out/gpu.log"

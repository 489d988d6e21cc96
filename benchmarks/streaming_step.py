"""Inner step time with a fragment in flight vs the plain inner step (CPU, 8 fake devices).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 nice -n 15 \\
    python -m benchmarks.streaming_step --out=benchmarks/results/streaming_step.json

Times blocks of inner steps of cpu-tiny on 8 workers: (a) a plain local SGD state, (b) a
streaming state (P = 2, tau = 5, eager updates) right after fragment 0 was sent, so that its
eager points are in the state while the steps run. The
blocks alternate (a, b, a, b, ...) so that load on a shared machine hits both alike; the table
gives the median of each and their ratio, and the time of one fragment send (which runs
serialised between two steps, see lsgd_jax/streaming.py). Writes the numbers as JSON.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from lsgd_jax import local_sgd, mesh, model, optim, streaming

_STEPS = flags.DEFINE_integer("steps", 20, "Steps per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed blocks per variant.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/streaming_step.json", "JSON output.")

CFG = streaming.Streaming(num_fragments=2, overlap_steps=5, eager=True)


def _block(step, state, batch, n):
  t = time.perf_counter()
  for _ in range(n):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  return state, time.perf_counter() - t


def main(argv):
  del argv
  layout = mesh.make_layout(8)
  mcfg = model.model_config("cpu-tiny", vocab_size=257, max_seq_len=64)
  init = functools.partial(model.init_params, mcfg)
  tx = optim.inner_optimizer("adamw", learning_rate=3e-3, total_steps=10_000, warmup_steps=10)
  outer = optim.outer_optimizer("nesterov", 0.7, 0.9)
  step = local_sgd.make_train_step(layout, "local_sgd", functools.partial(model.loss_fn, mcfg),
                                   tx)
  rng = np.random.default_rng(0)
  batch = mesh.put_global(rng.integers(0, 257, (8, 4, 65)).astype(np.int32), layout.batch)
  plain = local_sgd.init_state(layout, "local_sgd", init, tx, outer, jax.random.key(0))
  stream = local_sgd.init_state(layout, "local_sgd", init, tx, outer, jax.random.key(0),
                                streaming=CFG)
  send = streaming.make_syncs(layout, outer, CFG, stream.params)[0].send
  plain, _ = _block(step, plain, batch, 3)  # compile and warm up
  stream, _ = _block(step, stream, batch, 3)
  t = time.perf_counter()
  stream, _ = send(stream)  # fragment 0 in flight from here on (compiles once)
  jax.block_until_ready(stream)
  sends = []
  for _ in range(3):
    t = time.perf_counter()
    stream, _ = send(stream)
    jax.block_until_ready(stream)
    sends.append(time.perf_counter() - t)
  times = {"plain": [], "in_flight": []}
  for _ in range(_REPEATS.value):
    plain, dt = _block(step, plain, batch, _STEPS.value)
    times["plain"].append(dt / _STEPS.value)
    stream, dt = _block(step, stream, batch, _STEPS.value)
    times["in_flight"].append(dt / _STEPS.value)
  med = {k: float(np.median(v)) for k, v in times.items()}
  ratio = med["in_flight"] / med["plain"]
  print("| inner step | median ms | blocks (ms) |\n|---|---|---|")
  for k, v in times.items():
    print(f"| {k} | {1e3 * med[k]:.2f} | {', '.join(f'{1e3 * x:.1f}' for x in v)} |")
  print(f"\nin flight / plain = {ratio:.4f} (target: within 3%); one fragment send ("
        f"serialised between steps): {1e3 * float(np.median(sends)):.1f} ms")
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"per_step_s": times, "median_s": med, "ratio": ratio,
               "send_s": sends, "config": CFG.__dict__, "steps_per_block": _STEPS.value,
               "devices": jax.device_count()}, f, indent=2)


if __name__ == "__main__":
  app.run(main)

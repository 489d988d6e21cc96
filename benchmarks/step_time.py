"""Time and bytes per token: plain optax loop vs local SGD (inner step, amortised outer sync) vs DDP.

  python -m benchmarks.step_time [--size=cpu-small --seq_len=128 --batch=32 --workers=8 --reps=5]

Everything runs in one process and is reported as ratios to the plain loop measured in the same
run (absolute times on a shared CPU are noisy). Timing uses one device, so that every variant
does the same arithmetic on the same hardware: the plain loop trains one replica on the global
batch; local SGD trains K replicas (vmapped on the device) on B / K sequences each; DDP is the
plain step lifted onto the mesh. Bytes are read from the programs compiled for the 8-device mesh
(`K` workers on `K` devices), where the collectives exist. Medians over `--reps` interleaved
repetitions. Writes benchmarks/results/step_time.json.

Targets (issue "Core training"): inner step <= 1.05x the plain loop; outer-sync overhead at
H = 50 <= 3%; DDP bytes / local SGD bytes = H within 1%.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from lsgd_jax import comm, mesh, model, optim  # noqa: E402

_SIZE = flags.DEFINE_string("size", "cpu-small", "Model preset.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch (sequences per step).")
_WORKERS = flags.DEFINE_integer("workers", 8, "Local SGD workers K.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed inner steps per repetition (a multiple of 50).")
_REPS = flags.DEFINE_integer("reps", 5, "Interleaved repetitions (the median is reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/step_time.json", "JSON output.")


def main(_):
  k, b, t = _WORKERS.value, _BATCH.value, _SEQ.value
  cfg = model.model_config(_SIZE.value, vocab_size=256, max_seq_len=t)
  loss = functools.partial(model.loss_fn, cfg)
  init = functools.partial(model.init_params, cfg)
  tx = optim.inner_optimizer("adamw", learning_rate=1e-3, total_steps=10**6, warmup_steps=10)
  outer = optim.outer_optimizer("nesterov")
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (k, b // k, t + 1)).astype(np.int32)
  tokens_per_step = b * t
  steps = _STEPS.value

  # --- the plain single-replica optax loop (no mesh, no shard_map) ---
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def plain_step(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  one = mesh.make_layout(k, num_devices=1)
  flat = jax.device_put(tokens.reshape(b, t + 1), one.mesh.devices.flat[0])
  plain = {"params": init(jax.random.key(0))}
  plain["opt"] = tx.init(plain["params"])

  def run_plain(n):
    p, o = plain["params"], plain["opt"]
    for _ in range(n):
      p, o, v = plain_step(p, o, flat)
    jax.block_until_ready(v)
    plain["params"], plain["opt"] = p, o

  lifted = lambda algorithm, layout: common.mesh_run(layout, algorithm, init, loss, tx, outer,
                                                     tokens)
  run_lsgd, run_ddp = lifted("local_sgd", one).run, lifted("ddp", one).run
  variants = {
      "plain optax loop (1 replica, batch B)": lambda n: run_plain(n),
      f"local SGD inner step (K={k}, B/K each)": lambda n: run_lsgd(n),
      "local SGD, H=1 (sync every step)": lambda n: run_lsgd(n, 1),
      "local SGD, H=10": lambda n: run_lsgd(n, 10),
      "local SGD, H=50": lambda n: run_lsgd(n, 50),
      "DDP step": lambda n: run_ddp(n),
  }
  for name, fn in variants.items():  # compile and warm up (the H=50 variant: one whole round)
    fn(50 if name.endswith("H=50") else 10)
  times = {name: [] for name in variants}
  for _ in range(_REPS.value):
    for name, fn in variants.items():
      t0 = time.perf_counter()
      fn(steps)
      times[name].append((time.perf_counter() - t0) / (steps * tokens_per_step))
  med = {name: float(np.median(v)) for name, v in times.items()}
  base = med["plain optax loop (1 replica, batch B)"]
  inner = med[f"local SGD inner step (K={k}, B/K each)"]

  # --- bytes per token from the programs compiled for K workers on K devices ---
  spread = mesh.make_layout(k)
  lr, dr = lifted("local_sgd", spread), lifted("ddp", spread)
  lsgd_step_bytes = comm.measure(lr.step, lr.state, lr.batch, mesh=spread.mesh).wire_bytes
  lsgd_sync_bytes = comm.measure(lr.sync, lr.state, mesh=spread.mesh).wire_bytes
  ddp_bytes = comm.measure(dr.step, dr.state, dr.batch, mesh=spread.mesh).wire_bytes

  rows = []
  for name, v in med.items():
    h = {"H=1": 1, "H=10": 10, "H=50": 50}.get(name.split("(")[0].strip().split(", ")[-1])
    if name.startswith("DDP"):
      bpt = ddp_bytes / tokens_per_step
    elif name.startswith("local SGD"):
      bpt = (lsgd_step_bytes + (lsgd_sync_bytes / h if h else 0)) / tokens_per_step
    else:
      bpt = 0.0
    rows.append({"variant": name, "us_per_token": v * 1e6, "vs_plain": v / base,
                 "vs_inner_step": v / inner, "bytes_per_token_per_device": bpt})
  n = model.non_embedding_params(cfg)
  summary = {
      "inner_step_vs_plain": inner / base,
      "sync_overhead_H50": med["local SGD, H=50"] / inner - 1,
      "sync_overhead_H10": med["local SGD, H=10"] / inner - 1,
      "ddp_bytes_over_local_sgd_bytes_H50": ddp_bytes / (lsgd_sync_bytes / 50 + lsgd_step_bytes),
      "ddp_bytes_over_local_sgd_bytes_H10": ddp_bytes / (lsgd_sync_bytes / 10 + lsgd_step_bytes),
  }
  print(f"\nmodel {_SIZE.value} ({n:,} non-embedding params), seq {t}, global batch {b}, "
        f"K={k}; {jax.devices()[0].device_kind}; median of {_REPS.value} x {steps} steps\n")
  print(f"| {'variant':40s} | us/token | vs plain | vs inner | bytes/token/device |")
  print(f"|{'-' * 42}|----------|----------|----------|--------------------|")
  for r in rows:
    print(f"| {r['variant']:40s} | {r['us_per_token']:8.3f} | {r['vs_plain']:8.3f} | "
          f"{r['vs_inner_step']:8.3f} | {r['bytes_per_token_per_device']:18.1f} |")
  print()
  for key, v in summary.items():
    print(f"{key}: {v:.4f}")
  common.write_json(_OUT.value, {
      "config": {"size": _SIZE.value, "seq_len": t, "batch": b, "workers": k, "steps": steps,
                 "reps": _REPS.value, "device": jax.devices()[0].device_kind},
      "rows": rows, "summary": summary, "raw_seconds_per_token": times})


if __name__ == "__main__":
  app.run(main)

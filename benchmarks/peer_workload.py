"""The CPU workload other DiLoCo simulators are compared on (issue 11), measured in one process.

  python -m benchmarks.peer_workload                    # ~6 min on 2 cores
  python -m benchmarks.peer_workload --devices=8 --reps=1 --steps=10 --profile   # + breakdown

Workload: DiLoCo with K = 8 workers, H = 10, the "cpu-base" decoder (4 layers, width 256, 4 heads,
SwiGLU 704, vocabulary 1024), sequence 256, 2 sequences per worker per step (4,096 tokens per
step), float32, AdamW inner / Nesterov outer; DDP on the same global batch. Random tokens already
on the devices (the input pipeline is measured by benchmarks/data_pipeline.py).

For each device layout in `--devices` (the K workers spread over that many fake CPU devices,
vmapped where a device holds several) and each algorithm, the benchmark compiles the step, warms
it up with one whole round, then times `--steps` steps (local SGD: with its outer syncs every H)
`--reps` times (and, with `--scanned`, local SGD with each round one compiled program: H steps
in a `lax.scan`, then the sync), the variants interleaved so that load from other processes falls on all of them.
Reported per variant: tokens/s (median), model GFLOP/s = 6 N_matmul tokens/s (N_matmul: the
weights of every matmul, output head included; attention scores not counted), that as a share of
the float32 matmul peak measured in the same process (a 2048^3 `jnp.dot` on one device, median of
5), and the bytes XLA plans for the step (arguments + temporaries, from the compiled program).
Because other processes may share the cores, tokens per CPU-second of this process x the core
count is printed beside wall-clock tokens/s: it is what the variant would reach owning every core
(spinning pool threads count as work, so it errs low), and it is steadier under load.
Peak RSS is the process's (all variants); minor page faults per step are the process's during
each variant's timed steps (fresh pages XLA's per-call buffers fault in; an allocator preloaded
with LD_PRELOAD changes them, docs/benchmarks.md). `--size` / `--seq_len` run the same workload
at another model or sequence length (e.g. the attention block rule's measurements);
`--library_fusion` compiles the steps with the trainer's `train.library_fusion` setting (auto:
as the trainer; several values: variants); `--dtypes` the model's compute dtype (float32, the
workload's; bfloat16: variants); `--compile_options` adds variants compiled with one more XLA
option each. `--profile` adds where one step's time goes (a
jax.profiler trace of the local SGD step on one device, whose kernels are not preempted by other
devices' threads, grouped into matmuls, attention, optimizer, copies and other elementwise work).
Writes JSON (`--out`).
"""

import os
import sys

# Kernel-level trace events (for --profile) are only recorded with this flag; they cost nothing
# while no trace is active, but it is set only when asked.
_TRACE = " --xla_cpu_enable_xprof_traceme=true" if "--profile" in sys.argv else ""
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8" + _TRACE).strip()

import functools  # noqa: E402
import itertools  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from lsgd_jax import mesh, model, optim, rounds  # noqa: E402

_DEVICES = flags.DEFINE_list("devices", ["1", "2", "8"], "Device layouts to measure (the 8 "
                             "workers spread over this many fake CPU devices).")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["local_sgd", "ddp"], "Algorithms to measure.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per repetition (a multiple of H).")
_REPS = flags.DEFINE_integer("reps", 3, "Interleaved repetitions (the median is reported).")
_PROFILE = flags.DEFINE_bool("profile", False, "Add the per-category time breakdown of one local "
                             "SGD step on one device.")
_SCANNED = flags.DEFINE_bool("scanned", True, "Also time local SGD with each round (H steps and "
                             "the sync) compiled as one program (benchmarks/common.scanned_round).")
_CHUNKS = flags.DEFINE_list("attention_chunks", ["0"], "Query blocks of the causal attention "
                            "(lsgd_jax.model.ModelConfig.attention_chunks; 0: auto, 4 at this "
                            "sequence length); several values add interleaved variants.")
_FUSION = flags.DEFINE_list("library_fusion", ["auto"], "What XLA:CPU hands YNNPACK "
                            "(train.library_fusion: auto, dot, xla); several values are "
                            "measured as variants, interleaved.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes (model.dtype: float32, "
                            "bfloat16; parameters and optimizer state stay float32); several: "
                            "variants. The workload's is float32.")
_OPTIONS = flags.DEFINE_list("compile_options", [], "Extra XLA compile options, each KEY=VALUE "
                             "(e.g. xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED): "
                             "each one a variant on top of the trainer's options, measured "
                             "interleaved with the trainer's options alone.")
_SIZE = flags.DEFINE_string("size", "cpu-base", "Model preset (the workload's: cpu-base).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence (the workload's: 256).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/peer_workload.json", "JSON output.")

K, H, GLOBAL_BATCH, VOCAB = 8, 10, 16, 1024


def main(_):
  size, seq = _SIZE.value, _SEQ.value
  chunk_values = [int(c) for c in _CHUNKS.value]
  dtypes = _DTYPES.value
  try:
    cfgs = {(c, d): model.model_config(size, vocab_size=VOCAB, max_seq_len=seq,
                                       attention_chunks=c, dtype=d)
            for c in chunk_values for d in dtypes}
  except ValueError as e:  # an unknown size or dtype, named by the message
    raise app.UsageError(str(e)) from None
  cfg = cfgs[chunk_values[0], dtypes[0]]
  tx = optim.inner_optimizer("adamw", learning_rate=1e-3, total_steps=10**6, warmup_steps=10)
  outer = optim.outer_optimizer("nesterov")
  tokens = np.random.default_rng(0).integers(0, VOCAB, (K, GLOBAL_BATCH // K, seq + 1))
  tokens_per_step = GLOBAL_BATCH * seq
  steps = max(_STEPS.value // H, 1) * H

  runs, memory = {}, {}
  fusions = _FUSION.value
  extras = [""] + _OPTIONS.value
  for option in _OPTIONS.value:
    if "=" not in option:
      raise app.UsageError(f"--compile_options: {option!r} is not KEY=VALUE")
  for devices, algorithm, chunks, dtype, fusion, extra in itertools.product(
      map(int, _DEVICES.value), _ALGORITHMS.value, chunk_values, dtypes, fusions, extras):
    layout = mesh.make_layout(K, devices)
    loss = functools.partial(model.loss_fn, cfgs[chunks, dtype])
    init = functools.partial(model.init_params, cfgs[chunks, dtype])
    where = f"{devices} device{'s' * (devices > 1)}" + (  # named by the flag's value (0: auto)
        f", {chunks or 'auto'} attention blocks" if len(chunk_values) > 1 else "") + (
        f", {dtype}" if len(dtypes) > 1 else "") + (
        f", fusion {fusion}" if len(fusions) > 1 else "") + (f", +{extra}" if extra else "")
    name = f"{algorithm}, {where}"
    options = rounds.compiler_options(fusion, jax.default_backend(), cfg.d_model)
    if extra:
      options = {**options, **dict([extra.split("=", 1)])}
    r = common.mesh_run(layout, algorithm, init, loss, tx, outer, tokens.astype(np.int32),
                        options)
    compiled = r.step.lower(r.state, r.batch).compile()
    mem = compiled.memory_analysis()
    memory[name] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) if mem else None
    r.run(H, H if algorithm == "local_sgd" else None)  # compile the sync, warm up one round
    runs[name] = (r, algorithm, compiled)
    print(f"compiled {name}", flush=True)
    if algorithm == "local_sgd" and _SCANNED.value:
      fresh = common.mesh_run(layout, algorithm, init, loss, tx, outer, tokens.astype(np.int32),
                              options)
      scanned = common.scanned_round(fresh, H)
      scanned.run(H, H)
      runs[f"local_sgd scanned, {where}"] = (scanned, algorithm, compiled)
      memory[f"local_sgd scanned, {where}"] = None

  peak = common.matmul_peak()
  times = {name: [] for name in runs}
  cpu_times = {name: [] for name in runs}
  faults = {name: [] for name in runs}  # minor page faults per step (the process's, all threads)
  for _ in range(_REPS.value):
    for name, (r, algorithm, _) in runs.items():
      t0, c0 = time.perf_counter(), time.process_time()
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      r.run(steps, H if algorithm == "local_sgd" else None)
      times[name].append(time.perf_counter() - t0)
      cpu_times[name].append(time.process_time() - c0)
      faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
  peak = float(np.median([peak, common.matmul_peak()]))  # before and after: the load may change
  n_mm = common.matmul_params(cfg)
  cpus = os.cpu_count() or 1
  rows = []
  for name, ts in times.items():
    tps = steps * tokens_per_step / float(np.median(ts))
    cpu_tps = steps * tokens_per_step / (float(np.median(cpu_times[name])) / cpus)
    rows.append({"variant": name, "tokens_per_sec": tps, "tokens_per_cpu_share": cpu_tps,
                 "tokens_per_sec_all": [steps * tokens_per_step / t for t in ts],
                 "model_gflops": 6 * n_mm * tps / 1e9, "share_of_peak": 6 * n_mm * tps / peak,
                 "planned_bytes": memory[name],
                 "minor_faults_per_step": float(np.median(faults[name]))})
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

  print(f"\n{size}: K={K}, H={H}, seq {seq}, {tokens_per_step} tokens/step, N_matmul {n_mm:,}; "
        f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; median of {_REPS.value} x {steps} steps; "
        f"peak RSS {rss / 2**30:.2f} GiB\n")
  print(f"| {'variant':26s} | tokens/s | tokens/CPU-s x {cpus} | model GFLOP/s | % of peak | "
        "planned GiB | page faults/step |")
  print(f"|{'-' * 28}|----------|{'-' * (18 + len(str(cpus)))}|---------------|-----------|"
        "-------------|------------------|")
  for r in rows:
    gib = f"{r['planned_bytes'] / 2**30:11.2f}" if r["planned_bytes"] else f"{'-':>11s}"
    print(f"| {r['variant']:26s} | {r['tokens_per_sec']:8.0f} | "
          f"{r['tokens_per_cpu_share']:{16 + len(str(cpus))}.0f} | {r['model_gflops']:13.1f} | "
          f"{100 * r['share_of_peak']:8.1f}% | {gib} | {r['minor_faults_per_step']:16,.0f} |")
  result = {"config": {"size": size, "dtypes": dtypes, "workers": K, "sync_every": H, "seq_len": seq,
                       "global_batch": GLOBAL_BATCH, "vocab": VOCAB, "steps": steps,
                       "reps": _REPS.value, "cpus": os.cpu_count(),
                       "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "compile_options": _OPTIONS.value,
                       "library_fusion": {f: rounds.compiler_options(
                           f, jax.default_backend(), cfg.d_model) for f in fusions},
                       **{k: os.environ[k] for k in ("LD_PRELOAD", "GLIBC_TUNABLES")
                          if k in os.environ}},
            "matmul_peak_flops": peak, "matmul_params": n_mm, "peak_rss_bytes": rss,
            "rows": rows}
  for algorithm in _ALGORITHMS.value:
    pair = [r for r in rows if r["variant"].startswith(algorithm)]
    best = max(pair, key=lambda r: r["tokens_per_sec"])
    print(f"fastest {algorithm}: {best['variant']}")
  lsgd = {r["variant"].split(", ", 1)[1]: r["tokens_per_sec"] for r in rows
          if r["variant"].startswith("local_sgd,")}
  ddp = {r["variant"].split(", ", 1)[1]: r["tokens_per_sec"] for r in rows
         if r["variant"].startswith("ddp")}
  result["local_sgd_step_over_ddp_step"] = {k: ddp[k] / lsgd[k] for k in lsgd if k in ddp}
  for k, v in result["local_sgd_step_over_ddp_step"].items():
    print(f"local SGD time per token / DDP's on {k}: {v:.3f}")
  scanned = {r["variant"].split(", ", 1)[1]: r["tokens_per_sec"] for r in rows
             if r["variant"].startswith("local_sgd scanned,")}
  result["scanned_round_speedup"] = {k: scanned[k] / lsgd[k] for k in scanned if k in lsgd}
  for k, v in result["scanned_round_speedup"].items():
    print(f"local SGD scanned round / per-step dispatch on {k}: {v:.3f}x tokens/s")
  if _PROFILE.value:  # on one device: with more fake devices than cores, kernels are preempted
    r = common.mesh_run(mesh.make_layout(K, 1), "local_sgd",
                        functools.partial(model.init_params, cfg),
                        functools.partial(model.loss_fn, cfg), tx, outer, tokens.astype(np.int32),
                        rounds.compiler_options(fusions[0], jax.default_backend(), cfg.d_model))
    compiled = r.step.lower(r.state, r.batch).compile()
    r.run(2)
    breakdown, largest = common.profile_breakdown(lambda n: r.run(n), compiled.as_text(), top=8)
    result["profile"] = {"variant": "local_sgd inner step, 1 device", "categories": breakdown,
                         "largest_kernels": largest}
    print("\nwhere a local SGD inner step's kernel time goes (1 device, summed over threads):")
    for b in breakdown:
      print(f"  {b['ms_per_step']:8.1f} ms  {100 * b['share']:5.1f}%  {b['category']}")
    print("the largest kernels:")
    for k in largest:
      print(f"  {k['ms_per_step']:8.1f} ms  {100 * k['share']:5.1f}%  {k['kernel']} "
            f"({k['category']})")
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)

"""Tokens/s and model FLOPs utilisation (MFU) of DDP and local SGD on the accelerators at hand.

  python -m benchmarks.gpu_mfu                       # 100M and 400M, bfloat16, on all GPUs
  python -m benchmarks.gpu_mfu --sizes=cpu-tiny --dtype=float32 --seq_len=64 --batch=16 \
      --steps=3 --reps=1                             # CPU smoke run (seconds)

For each model size, three variants on the same global batch (`--batch` sequences of `--seq_len`
tokens, random tokens already on the devices, so the input pipeline is not measured):
- `ddp`: one replica, gradients averaged over all devices every step;
- `local_sgd_inner`: K replicas (each K of `--workers`), the inner step alone (no cross-worker
  traffic);
- `local_sgd_amortised`: H inner steps plus one outer sync, per step (H = `--sync_every`).
K = 1 is the per-device cost of a deployment with one worker per device (the comparison the 5%
target is about: the same work as a DDP step, plus the local SGD state); K = 8 on one device is what
simulating the study's 8 workers on one accelerator costs (8 optimizer updates per step).
Time per step is the median of `--reps` timings of `--steps` steps (after compiling and one
warm-up pass). MFU = tokens/s x training FLOPs per token (lsgd_jax.model.train_flops_per_token:
6N + attention + output head) / (devices x the device's peak dense bf16 FLOP/s, PEAK_FLOPS below;
`--peak_tflops` overrides). Prints a table and writes JSON (`--out`). Installs nothing, needs no
network.

K replicas of a model hold K copies of parameters, gradients and AdamW moments (16 bytes per
parameter each): where K / devices replicas and the activations (`activation_bytes`) would not fit
in 85% of a device's memory, K is halved until they do (and again on an out-of-memory error), and
the table says so. Targets (issue 7): MFU >= 45% at 400M on an H100;
local SGD inner step within 5% of the DDP step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from lsgd_jax import mesh, model, optim

_SIZES = flags.DEFINE_list("sizes", ["100M", "400M"], "Model presets (lsgd_jax.model.PRESETS).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_ATTENTION = flags.DEFINE_enum("attention", "auto", list(model.ATTENTION),
                               "Attention kernel (auto: cuDNN's fused one on a GPU in bfloat16; "
                               "if it fails to build, XLA's is measured instead and said so).")
_SEQ = flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch", 16, "Global batch in sequences (the same for all "
                             "variants): 16 x 2048 = 32k tokens per step.")
_VOCAB = flags.DEFINE_integer("vocab", 32_000, "Vocabulary size (C4's SentencePiece: 32k).")
_WORKERS = flags.DEFINE_list("workers", ["1", "8"], "Local SGD worker counts K to measure (the "
                             "study's 8); each halved while its replicas would not fit in memory.")
_H = flags.DEFINE_integer("sync_every", 50, "H for the amortised local SGD variant.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timing.")
_REPS = flags.DEFINE_integer("reps", 3, "Timings per variant (the median is reported).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device (0: from the table).")
_AMORTISED = flags.DEFINE_bool("amortised", True, "Also time H inner steps plus one outer sync.")
_FUSED = flags.DEFINE_bool("fused_projections", False, "q|k|v and gate|up as one matmul each "
                           "(lsgd_jax.model.ModelConfig.fused_projections).")
_TRACE = flags.DEFINE_string("trace_dir", "", "If set, a profiler trace of 2 steps of each "
                             "variant is written there (perfetto JSON) and its kernel time "
                             "per step printed by kernel.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/gpu_mfu.json", "JSON output.")

# Peak dense bf16 tensor FLOP/s per device, by a substring of `device.device_kind` (first match).
# Vendor datasheets: NVIDIA H100 SXM 989 TF (PCIe 756, NVL 835), H200 989, A100 312, L4 121,
# V100 125 (fp16); Google Cloud TPU v4 275, v5e 197, v5p 459, v6e 918.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("GH200", 989e12), ("A100", 312e12), ("L4", 121e12), ("V100", 125e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
  for key, value in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def _device_memory(device) -> int | None:
  try:
    return (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  (CPU and some runtimes have no stats)
    return None


def activation_bytes(cfg, tokens: int) -> float:
  """Rough bytes of the activations kept for the backward pass of `tokens` tokens: per layer and
  token about 8 d_model + 3 d_ff values in the compute dtype (attention by a fused kernel, whose
  T x T scores are not stored), plus float32 logits and their gradient."""
  width = 2 if cfg.dtype == "bfloat16" else 4
  per_token = cfg.num_layers * (8 * cfg.d_model + 3 * cfg.d_ff) * width + 8 * cfg.vocab_size
  return float(tokens) * per_token


def fit_workers(workers: int, total_params: int, num_devices: int, memory: int | None,
                activations: float = 0.0) -> int:
  """K halved until K / devices replicas (params, grads, two AdamW moments: 16 B / parameter), the
  outer parameters and momentum (8 B / parameter) and a device's share of `activations` take at
  most 85% of a device's memory (`memory` None: K as asked)."""
  if memory is None:
    return workers
  k = workers
  while k > 1:
    per_device = (max(k // num_devices, 1) * 16 * total_params + 8 * total_params
                  + activations / num_devices)
    if per_device <= 0.85 * memory:
      break
    k //= 2
  return k


def _out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def _timed(fn, steps: int, reps: int) -> tuple[float, list[float]]:
  fn(steps)  # compile and warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn(steps)
    times.append((time.perf_counter() - t0) / steps)
  return statistics.median(times), times


def bench_size(size: str, *, attention: str = "auto", fused_projections: bool = False, log=print,
               **kwargs) -> dict:
  """DDP and, for each K in `workers`, the two local SGD variants of one model size; returns a
  JSON-able dict. `log` gets one line per measured variant (progress on long runs). A fused
  attention kernel that does not build here (an old cuDNN, say) falls back to XLA's, logged."""
  cfg = model.model_config(size, vocab_size=kwargs["vocab"], max_seq_len=kwargs["seq_len"],
                           dtype=kwargs["dtype"], attention=attention)
  cfg = dataclasses.replace(cfg, fused_projections=fused_projections)
  impl = model.attention_implementation(cfg)
  try:
    result = _bench(cfg, size, log=log, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    if impl == "xla" or _out_of_memory(e):
      raise
    log(f"{size}: attention {impl!r} failed ({type(e).__name__}: {str(e)[:300]}); "
        "measuring XLA's attention instead")
    cfg = dataclasses.replace(cfg, attention="xla")
    impl = "xla"
    result = _bench(cfg, size, log=log, **kwargs)
  result["attention"] = impl
  return result


def _bench(cfg, size: str, *, dtype: str, seq_len: int, batch: int, vocab: int,
           workers: tuple[int, ...], sync_every: int, steps: int, reps: int,
           peak: float | None, amortised: bool = True, trace_dir: str = "", log=print) -> dict:
  del dtype  # in cfg
  devices = jax.devices()
  n = len(devices)
  loss = functools.partial(model.loss_fn, cfg)
  init = functools.partial(model.init_params, cfg)
  tx = optim.inner_optimizer("adamw", learning_rate=3e-4, total_steps=10**6, warmup_steps=10)
  outer = optim.outer_optimizer("nesterov")
  flops_per_token = model.train_flops_per_token(cfg, seq_len)
  tokens_per_step = batch * seq_len
  memory = _device_memory(devices[0])
  activations = activation_bytes(cfg, tokens_per_step)
  rng = np.random.default_rng(0)

  def make(algorithm, num_workers):
    layout = mesh.make_layout(num_workers)
    mesh.check_batch(layout, batch)
    tokens = rng.integers(0, vocab, (num_workers, batch // num_workers, seq_len + 1), np.int32)
    return common.mesh_run(layout, algorithm, init, loss, tx, outer, tokens)

  def row(variant, seconds, times, num_workers):
    tps = tokens_per_step / seconds
    r = {"variant": variant, "workers": num_workers, "step_seconds": seconds,
         "step_seconds_all": times, "tokens_per_sec": tps,
         "mfu": tps * flops_per_token / (n * peak) if peak else None}
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
    log(f"{size} {variant} K={num_workers}: {1e3 * seconds:.1f} ms/step, {tps:,.0f} tokens/s{mfu}")
    return r

  def trace(fn, name):
    if not trace_dir:
      return
    try:
      path = common.trace_to(fn, 2, os.path.join(trace_dir, f"trace_{name}.json.gz"))
      log(f"{name}: trace in {path}; device time per step by kernel:")
      log(common.kernel_table(path, steps=2))
    except Exception as e:  # pylint: disable=broad-except  (a profiler that fails costs no rows)
      log(f"{name}: no trace ({type(e).__name__}: {str(e)[:300]})")

  result = {"size": size, "fused_projections": cfg.fused_projections, "non_embedding_params": model.non_embedding_params(cfg),
            "total_params": model.total_params(cfg), "train_flops_per_token": flops_per_token,
            "rows": [], "workers": {}}
  try:
    runner = make("ddp", n)
    sec, times = _timed(runner.run, steps, reps)
  except jax.errors.JaxRuntimeError as e:
    if not _out_of_memory(e):
      raise
    result["error"] = f"DDP out of memory at global batch {batch}: lower --batch"
    return result
  result["rows"].append(row("ddp", sec, times, n))
  trace(runner.run, f"{size}_ddp")
  ddp = sec
  runner = None  # free the DDP state before K replicas are created
  for asked in workers:
    k = fit_workers(asked, model.total_params(cfg), n, memory, activations)
    while True:  # the estimate is rough: on out-of-memory halve K and try again
      try:
        runner = make("local_sgd", k)
        sec, times = _timed(runner.run, steps, reps)
        if amortised:  # H inner steps and one sync, per step (at least one whole round)
          h_steps = max(sync_every, steps // sync_every * sync_every)
          sec_h, times_h = _timed(lambda m: runner.run(m, sync_every), h_steps, reps)
        break
      except jax.errors.JaxRuntimeError as e:
        runner = None
        if not _out_of_memory(e) or k == 1:
          raise
        k //= 2
        log(f"{size}: out of memory with K = {2 * k}; trying K = {k}")
    result["rows"].append(row("local_sgd_inner", sec, times, k))
    trace(runner.run, f"{size}_local_sgd_K{k}")
    runner = None  # free the K replicas before the next K
    result["workers"][str(asked)] = {"measured": k, "inner_over_ddp": sec / ddp}
    if amortised:
      result["rows"].append(row(f"local_sgd_amortised_H{sync_every}", sec_h, times_h, k))
      result["workers"][str(asked)]["amortised_over_ddp"] = sec_h / ddp
  return result


def run(sizes, *, dtype="bfloat16", seq_len=2048, batch=16, vocab=32_000, workers=(1, 8),
        sync_every=50, steps=10, reps=3, peak_tflops=0.0, attention="auto", on_size=None,
        amortised=True, fused_projections=False, trace_dir="", log=print) -> dict:
  """Benchmarks every size; returns the JSON-able report (also what `main` writes). `on_size` is
  called with the report so far after each size (so a long run that is cut off keeps its results)."""
  dev = jax.devices()[0]
  peak = peak_tflops * 1e12 if peak_tflops else peak_flops(dev.device_kind)
  report = {"device_kind": dev.device_kind, "platform": dev.platform,
            "num_devices": jax.device_count(), "peak_flops_per_device": peak,
            "jax": jax.__version__, "host": platform.node(), "dtype": dtype, "seq_len": seq_len,
            "global_batch": batch, "vocab": vocab, "steps": steps, "reps": reps,
            "sync_every": sync_every, "amortised": amortised,
            "fused_projections": fused_projections, "xla_flags": os.environ.get("XLA_FLAGS", ""), "sizes": []}
  for size in sizes:
    report["sizes"].append(bench_size(size, attention=attention, dtype=dtype, seq_len=seq_len,
                                      batch=batch,
                                      vocab=vocab, workers=tuple(workers), sync_every=sync_every,
                                      steps=steps, reps=reps, peak=peak, amortised=amortised,
                                      fused_projections=fused_projections, trace_dir=trace_dir,
                                      log=log))
    if on_size is not None:
      on_size(report)
  return report


def table(report: dict) -> str:
  lines = [f"{report['num_devices']} x {report['device_kind']} ({report['platform']}), "
           f"{report['dtype']}, seq {report['seq_len']}, global batch {report['global_batch']}, "
           f"attention {'/'.join(sorted({s.get('attention', '?') for s in report['sizes']}))}, "
           f"median of {report['reps']} x {report['steps']} steps",
           "", "| size | variant | K | step (ms) | tokens/s | MFU | vs DDP |",
           "|---|---|---|---|---|---|---|"]
  for s in report["sizes"]:
    if "error" in s:
      lines.append(f"| {s['size']} | {s['error']} | | | | | |")
      continue
    ddp = s["rows"][0]["step_seconds"]
    for r in s["rows"]:
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
      lines.append(f"| {s['size']} | {r['variant']} | {r['workers']} | "
                   f"{1e3 * r['step_seconds']:.1f} | {r['tokens_per_sec']:,.0f} | {mfu} | "
                   f"{r['step_seconds'] / ddp:.3f} |")
    for asked, w in s["workers"].items():
      if w["measured"] != int(asked):
        lines.append(f"(K = {asked} replicas of {s['size']} do not fit; K = {w['measured']} "
                     "measured)")
  lines.append("")
  for s in (s for s in report["sizes"] if "error" not in s):
    best = max((r["mfu"] for r in s["rows"] if r["mfu"] is not None), default=None)
    mfu_txt = f"best MFU {100 * best:.1f}%" if best is not None else "MFU n/a (no peak known)"
    ratios = ", ".join(f"K={w['measured']}: {w['inner_over_ddp']:.3f}"
                       for w in s["workers"].values())
    lines.append(f"{s['size']}: {mfu_txt}; local SGD inner step / DDP step: {ratios} "
                 "(target <= 1.05 per worker)" + ("; target MFU >= 45%" if s["size"] == "400M"
                                                  else ""))
  return "\n".join(lines)


def main(argv):
  del argv
  try:
    workers = tuple(int(k) for k in _WORKERS.value)
  except ValueError:
    raise app.UsageError(f"--workers must be whole numbers, got {_WORKERS.value}") from None
  if workers and min(workers) < 1:
    raise app.UsageError(f"--workers must be positive (or empty: DDP alone), got {_WORKERS.value}")
  def write(report):
    common.write_json(_OUT.value, report)

  report = run(_SIZES.value, dtype=_DTYPE.value, seq_len=_SEQ.value, batch=_BATCH.value,
               vocab=_VOCAB.value, workers=workers, sync_every=_H.value, steps=_STEPS.value,
               reps=_REPS.value, peak_tflops=_PEAK.value, attention=_ATTENTION.value,
               on_size=write, amortised=_AMORTISED.value, fused_projections=_FUSED.value,
               trace_dir=_TRACE.value,
               log=lambda line: print(line, flush=True))
  print(table(report))
  print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

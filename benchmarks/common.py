"""What the benchmarks share: a local SGD or DDP run on a mesh, ready to time; the matmul
FLOPs of a model, the fp32 matmul peak, and a kernel-time breakdown from a profiler trace."""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from types import ModuleType
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsgd_jax import local_sgd, mesh, model


@dataclasses.dataclass
class MeshRun:
  """`run(n, sync_every=None)`: n train steps from the current state (an outer sync every
  `sync_every` steps), waiting for the devices at the end. `state` holds the latest state."""

  step: Callable
  sync: Callable | None
  batch: jax.Array
  state: Any
  round: Callable | None = None  # scanned_round: a round as the CPU loop runs it
  inner: Callable | None = None  # the step without compiler options, for programs built on it
  options: dict[str, str] | None = None  # XLA's compiler options of the step (and of its rounds)
  batches: jax.Array | None = None  # [H, K, B/K, T+1]: the batch repeated for the scanned round

  def run(self, num_steps: int, sync_every: int | None = None) -> None:
    if self.round is not None and sync_every:  # whole rounds, each one program
      s = self.state
      for _ in range(num_steps // sync_every):
        s = self.round(s, self.batches)
      jax.block_until_ready(s)
      self.state = s
      return
    s = self.state
    for i in range(num_steps):
      s, _ = self.step(s, self.batch)
      if sync_every and (i + 1) % sync_every == 0:
        s, _ = self.sync(s)
    jax.block_until_ready(s)
    self.state = s


def mesh_run(layout: mesh.Layout, algorithm: str, init, loss, tx, outer, tokens,
             options: dict[str, str] | None = None) -> MeshRun:
  """`tokens` [K, B/K, T+1] on the layout's devices, a fresh state, the jitted step and sync;
  `options`: XLA's compiler options for the step (`rounds.compiler_options`, as the trainer)."""
  state = local_sgd.init_state(layout, algorithm, init, tx,
                               outer if algorithm == "local_sgd" else None, jax.random.key(0))
  inner = local_sgd.make_train_step(layout, algorithm, loss, tx)
  step = jax.jit(inner, donate_argnums=0, compiler_options=options) if options else inner
  return MeshRun(step=step, inner=inner, options=options,
                 sync=(local_sgd.make_outer_sync(layout, outer) if algorithm == "local_sgd"
                       else None),
                 batch=mesh.put_global(tokens, layout.batch), state=state)


def scanned_round(run: MeshRun, sync_every: int) -> MeshRun:
  """The same run as the training loop runs it on a CPU (`train.steps_per_call`): each round's H
  inner steps one compiled program (a `lax.scan` of the step), then the outer sync, so the host
  dispatches twice per round instead of H + 1 times. Compiled with the run's options."""
  step, sync = run.inner or run.step, run.sync
  steps = jax.jit(lambda state, batches: jax.lax.scan(lambda s, b: step(s, b), state, batches),
                  donate_argnums=0, compiler_options=run.options or None)
  stacked = jax.sharding.NamedSharding(
      run.batch.sharding.mesh, jax.sharding.PartitionSpec(None, *run.batch.sharding.spec))
  batches = jax.device_put(jnp.broadcast_to(run.batch, (sync_every,) + run.batch.shape), stacked)
  return dataclasses.replace(run, round=lambda state, b: sync(steps(state, b)[0])[0],
                             batches=batches)


def matmul_params(cfg: model.ModelConfig) -> int:
  """Weights of every matmul of the model: per layer 4 d^2 + 3 d d_ff, plus the output head."""
  d = cfg.d_model
  return cfg.num_layers * (4 * d * d + 3 * d * cfg.d_ff) + d * cfg.vocab_size


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of an n^3 float32 `jnp.dot` on one device (all of its threads), median of `reps`."""
  dev = jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    dot(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))


def _category(name: str, op: str) -> str:
  """The kind of work an XLA:CPU kernel does, from its name and the op_name JAX gave it."""
  attention = "swiglu" not in op and any(  # SwiGLU's remat also reads "jvp(vmap(" under vmap
      s in op for s in ("BTNH", "BNTS", "BSNH", "_where", "jvp(vmap(", "causal_attention"))
  if "jvp" not in op:
    return "optimizer (AdamW, clipping)"
  if attention:
    return "attention (scores, mask, softmax)"
  if name.startswith(("dot", "ynn_fusion", "xnn_fusion", "onednn")):
    return "matmuls (forward + backward)"
  if name.startswith(("copy", "transpose")):
    return "copies / transposes (fused with elementwise)"
  return "other elementwise (norms, RoPE, SwiGLU, loss)"


def profile_breakdown(run, compiled_text: str, steps: int = 3,
                      top: int = 0) -> list[dict] | tuple[list[dict], list[dict]]:
  """Milliseconds per step by kernel category, from a jax.profiler trace of `run(steps)`; with
  `top`, also the `top` largest kernels (name, category, ms per step, share).

  Kernel time is summed over threads, so on a multi-core CPU the total may exceed wall time."""
  meta = {m.group(1): m.group(2) for m in re.finditer(
      r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", compiled_text, re.M)}
  with tempfile.TemporaryDirectory() as d:
    events = trace_events(trace_to(run, steps, os.path.join(d, "trace.json.gz")))
  kernels = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in meta:
      kernels[e["name"]] += e.get("dur", 0) / 1e3 / steps
  totals = collections.Counter()
  for name, ms in kernels.items():
    totals[_category(name, meta[name])] += ms
  whole = sum(totals.values()) or 1.0
  categories = [{"category": c, "ms_per_step": v, "share": v / whole}
                for c, v in totals.most_common()]
  if not top:
    return categories
  return categories, [{"kernel": n, "category": _category(n, meta[n]), "ms_per_step": v,
                       "share": v / whole} for n, v in kernels.most_common(top)]


def trace_to(fn: Callable[[int], Any], steps: int, dest: str) -> str:
  """Runs `fn(steps)` under `jax.profiler.trace` and keeps the trace's perfetto JSON as `dest`."""
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      fn(steps)
    src = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with open(src, "rb") as f, open(dest, "wb") as g:
      g.write(f.read())
  return dest


def trace_events(path: str) -> list[dict]:
  """The events of a perfetto JSON trace (`trace_to`)."""
  with gzip.open(path) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


_KERNEL_KINDS = (  # (kind, substrings of a GPU kernel's name), first match wins
    ("attention", ("flash", "fmha", "sdpa", "attn")),  # not "cudnn": its GEMM fusions too
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "wgmma", "matmul", "dot")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("reduction", ("reduce", "reduction")),
)


def kernel_kind(name: str) -> str:
  low = name.lower()
  for kind, keys in _KERNEL_KINDS:
    if any(k in low for k in keys):
      return kind
  return "elementwise / other fusions"


def _cpu_kernel(name: str) -> bool:  # not a Python frame or a runtime wrapper
  return not name.startswith("$") and "::" not in name and "(" not in name


def kernel_table(path: str, steps: int = 1, top: int = 25) -> str:
  """Device time per step from a perfetto trace (`trace_to`): by kind of kernel (matmul,
  attention, copies, reductions, other fusions), then the `top` kernels by name, then the time
  on each of the device's timelines (streams; the derived lines 'XLA Ops', 'XLA Modules', 'Steps'
  and the like repeat the kernels and are left out of the tables, every other line is summed). On
  a CPU trace (no device process) the XLA threads' events are used instead."""
  events = trace_events(path)
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  device = {p for p, n in procs.items() if "/device:" in n}
  kernels = [e for e in events if e.get("ph") == "X" and (
      e["pid"] in device if device else _cpu_kernel(e["name"]))]
  line = lambda e: (e["pid"], e.get("tid"))
  per_line = collections.Counter()
  for e in kernels:
    per_line[line(e)] += e.get("dur", 0) / 1e3 / steps
  lines = [f"{procs.get(p, p)} / {threads.get((p, t), t)}: {ms:.2f} ms" for (p, t), ms in
           per_line.most_common(12)]
  derived = ("xla ops", "xla modules", "steps", "framework", "source", "launch stats")
  by_name, by_kind = collections.Counter(), collections.Counter()
  for e in kernels:
    if not threads.get(line(e), "").lower().startswith(derived):
      ms = e.get("dur", 0) / 1e3 / steps
      by_name[e["name"]] += ms
      by_kind[kernel_kind(e["name"])] += ms
  whole = sum(by_kind.values()) or 1.0
  out = [f"kernel time {whole:.2f} ms per step"]
  out += [f"  {k:<28} {ms:8.2f} ms  {100 * ms / whole:5.1f}%" for k, ms in by_kind.most_common()]
  out.append(f"top {top} kernels:")
  out += [f"  {ms:8.3f} ms {100 * ms / whole:5.1f}%  {n[:110]}"
          for n, ms in by_name.most_common(top)]
  out.append("timelines:")
  out += ["  " + line for line in lines]
  return "\n".join(out)


_ROOT = pathlib.Path(__file__).resolve().parent.parent

# The issue-11 workload as the trainer's command line (with `--workdir` and `--config.train.steps`
# added; 8 fake CPU devices from XLA_FLAGS): configs/tiny.py with cpu-base, a 1,024-token
# sentencepiece vocabulary, sequence 256, 16 sequences per step, K = 8, H = 10, no evaluation.
TRAINER_WORKLOAD = ["--config=configs/tiny.py", "--config.model.size=cpu-base",
                    "--config.data.tokenizer=sentencepiece", "--config.data.vocab_size=1024",
                    "--config.data.seq_len=256", "--config.model.max_seq_len=256",
                    "--config.train.global_batch=16", "--config.local_sgd.sync_every=10",
                    "--config.train.eval_every=0", "--config.train.eval_batches=0"]


def write_json(path: str, result: Any, indent: int = 2) -> None:
  """A benchmark's results as JSON at `path`, its folder made if missing."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=indent)


def steady_tokens_per_sec(records: list[dict], steps: int, sync_every: int) -> float:
  """The median tokens/s of a trainer's metrics.jsonl `records` over the log intervals after
  step 2 H (compilation; the checkpoint at the first outer sync) and before step `steps` (the
  final save)."""
  values = [r["tokens_per_sec"] for r in records
            if "tokens_per_sec" in r and 2 * sync_every < r.get("step", 0) < steps]
  if not values:
    raise ValueError(f"no log record between step {2 * sync_every} and step {steps} (both "
                     "excluded): give more steps or log more often")
  return float(np.median(values))


def unpack(revision: str, dest: str, *paths: str) -> str:
  """The project's files at git `revision` (all, or those under `paths`) into `dest`."""
  archive = subprocess.run(["git", "-C", str(_ROOT), "archive", revision, *paths],
                           check=True, capture_output=True).stdout
  with tempfile.TemporaryFile() as f:
    f.write(archive)
    f.seek(0)
    with tarfile.open(fileobj=f) as tar:
      tar.extractall(dest, filter="data")
  return dest


def package_at(revision: str, dest: str, name: str = "lsgd_base") -> ModuleType:
  """`lsgd_jax` as it was at `revision`, imported as `name` from `dest`."""
  unpack(revision, dest, "lsgd_jax")
  pkg = pathlib.Path(dest) / name
  (pathlib.Path(dest) / "lsgd_jax").rename(pkg)
  for path in pkg.rglob("*.py"):
    path.write_text(path.read_text().replace("lsgd_jax", name))
  sys.path.insert(0, dest)
  return importlib.import_module(name)

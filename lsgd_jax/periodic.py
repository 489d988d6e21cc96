"""The periodic actions of the training loop, in the style of `clu.periodic_actions`.

`train.train_and_evaluate` runs: get the batch, the inner step, the outer syncs due now, then each
action in order: `if action.due(end): action(end)`, where `end` (`StepEnd`) says what the step
left. An action is a small object with its own state that gets only the values it needs:

- `Evaluation`: held-out loss every `train.eval_every` steps and at the end (its time is not
  training time: `TrainClock.paused`);
- `MetricsLog`: one record per logged step in metrics.jsonl (and TensorBoard), written one step
  late so the host never waits for the step it just dispatched; the divergence check
  (`Divergence`) reads each record;
- `Checkpointing`: every `checkpoint.every_steps` steps / `every_minutes` minutes and on a signal,
  never a diverged state;
- `Profile`: a jax.profiler trace of the steps `train.profile_steps` names, in workdir/profile;
- `Preemption`: after a SIGTERM / SIGINT, once the checkpoint is written, raises `Preempted`;
- `ReleaseMemory`: once a checkpoint's background write has finished, hands the C heap's free
  pages back to the OS (`release_free_memory`).

The running counts a checkpoint keeps (bytes moved, skipped rounds, the simulated clock) are a
`Tally` the loop updates after the step and after the syncs.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsgd_jax import mesh as mesh_lib


def every(n: int, step: int) -> bool:
  """Whether `step` (steps done) is a multiple of a period `n` (0: never)."""
  return bool(n) and step % n == 0


@dataclasses.dataclass
class StepEnd:
  """What a step left, handed to each periodic action."""

  step: int  # steps done (the record's step: 1 after the first step)
  last: bool  # the run's last step
  state: Any  # local_sgd.TrainState after the step and its outer syncs
  metrics: dict | None  # the inner step's metrics, still on the devices
  diag: dict | None  # outer-sync diagnostics of this step (None: no sync)
  point: dict  # the counters of its record (`Tally.point`), plus "eval_loss" once evaluated


class TrainClock:
  """Seconds of training: wall time less the time spent inside `paused()` (evaluation)."""

  def __init__(self):
    self._paused = 0.0

  def now(self) -> float:
    return time.perf_counter() - self._paused

  @contextlib.contextmanager
  def paused(self):
    t = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - t


class Tally:
  """The running counts a checkpoint keeps: bytes moved per device, rounds skipped as non-finite
  (a device scalar, read one logged step late) and the simulated clock (`sim`, None if off)."""

  def __init__(self, meta: dict, sim, *, tokens_per_step: int, flops_per_token: float,
               local_sgd: bool):
    self.sim, self.local_sgd = sim, local_sgd
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.comm_bytes = float(meta.get("comm_bytes", 0.0))
    self.skipped_rounds = jnp.asarray(meta.get("skipped_rounds", 0.0), jnp.float32)
    if sim is not None:
      sim.load_state_dict(meta.get("sim", {"seconds": meta.get("sim_time", 0.0)}))

  def inner_step(self, wire_bytes: float) -> None:
    self.comm_bytes += wire_bytes
    if self.sim is not None:
      self.sim.step()

  def outer_sync(self, scope: str | None, moved: float, diag: dict | None,
                 syncs: int = 1) -> None:
    """Counts the syncs of a step (`scope` None: none ran; `syncs`: how many, e.g. streaming
    fragments sent)."""
    if scope is None:
      return
    self.comm_bytes += moved
    if "outer_skipped" in diag:
      self.skipped_rounds = self.skipped_rounds + diag["outer_skipped"]
    if self.sim is not None:  # clock.py prices a global sync with its in-cluster stages
      for _ in range(syncs):
        self.sim.sync(scope)

  def point(self, step: int) -> dict:
    """The counters of the record of `step` (steps done)."""
    tokens = step * self.tokens_per_step
    out = {"tokens": tokens, "comm_bytes": self.comm_bytes,
           "flops": tokens * self.flops_per_token}
    if self.sim is not None:
      out["sim_time"] = self.sim.seconds
      out["sim_utilisation"] = self.sim.utilisation
    if self.local_sgd:
      out["skipped_rounds"] = self.skipped_rounds
    return out


def nonfinite(record: dict) -> str | None:
  """"key = value" for the first non-finite loss or norm of a record, else None."""
  for key in ("train_loss", "grad_norm", "pseudo_grad_norm"):
    v = record.get(key)
    if v is not None and not math.isfinite(v):
      return f"{key} = {v}"
  return None


class Divergence:
  """Under train.on_nonfinite = "stop", a non-finite record stops the run with an error naming
  the last good checkpoint (`saved` tells it each checkpoint written)."""

  def __init__(self, stop: bool, tag: str, directory: str, last_good: int | None):
    self.stop, self.tag, self.directory, self.last_good = stop, tag, directory, last_good

  def saved(self, step: int) -> None:
    self.last_good = step

  def check(self, record: dict) -> None:
    bad = nonfinite(record)
    if not (bad and self.stop):
      return
    where = (f"the last good checkpoint is step {self.last_good} in {self.directory}"
             if self.last_good is not None else "no checkpoint was saved before it")
    raise FloatingPointError(
        f"{self.tag} training diverged: {bad} at step {record['step']}; {where}. Lower optim.lr, "
        "or set train.on_nonfinite='skip' to skip non-finite steps and rounds.")


def eval_period(eval_every: int, sync_every: int, local_sgd: bool) -> int:
  """Steps between evaluations. Local SGD is scored on its global parameters, which are current
  only right after an outer sync (mid-round they are up to H - 1 steps old while the token count
  runs on), so its `eval_every` is rounded up to a multiple of H: every evaluation falls on a sync
  boundary (H = `local_sgd.sync_every`, the global sync of hierarchical runs). DDP keeps
  `eval_every`; 0 (only at the end) stays 0."""
  if not local_sgd or not eval_every or eval_every % sync_every == 0:
    return eval_every
  return -(-eval_every // sync_every) * sync_every


class Evaluation:
  """Held-out loss every `every` steps (0: only at the end) and at the last step, if there are
  eval batches; `loss` is the latest."""

  def __init__(self, evaluate: Callable[[Any], float], every_steps: int, batches: int,
               clock: TrainClock):
    self.evaluate, self.every, self.batches, self.clock = evaluate, every_steps, batches, clock
    self.loss = None

  def due(self, end: StepEnd) -> bool:
    return bool(self.batches) and (end.last or every(self.every, end.step))

  def __call__(self, end: StepEnd) -> None:
    jax.block_until_ready(end.state)  # the wait for training work counts as training time
    with self.clock.paused():  # evaluation time is not training throughput
      self.loss = self.evaluate(end.state)
    end.point["eval_loss"] = self.loss


class MetricsLog:
  """Writes the record of each logged step (every `log_every` and `eval_every` steps and the last)
  one step late: its metrics are fetched once the next step is dispatched (the loop calls
  `write_pending` right after dispatching it, before the syncs, which may wait for it). `writer`
  is a metrics.MetricWriter, `progress` a metrics.Progress; `last_record` is the latest written."""

  def __init__(self, writer, progress, divergence: Divergence, clock: TrainClock, *,
               log_every: int, eval_every: int, tokens: int):
    self.writer, self.progress, self.divergence, self.clock = writer, progress, divergence, clock
    self.log_every, self.eval_every = log_every, eval_every
    self.pending, self.last_record = None, {}
    self.t_log, self.tokens_at_log = clock.now(), tokens

  def due(self, end: StepEnd) -> bool:
    del end
    return True  # the pending record, if any, is written after every step

  def __call__(self, end: StepEnd) -> None:
    self.write_pending()
    if end.last or every(self.eval_every, end.step) or every(self.log_every, end.step):
      self.pending = (end.step, end.metrics, end.diag, end.point)

  def write_pending(self) -> None:
    if self.pending is None:
      return
    step, m, diag, point = self.pending
    record, self.pending = self._record(step, m, diag, point), None
    self.writer.write(record, outer=diag.keys() if diag is not None else ())
    self.progress.update(record["step"], record)
    self.last_record = record

  def _record(self, step: int, m: dict, diag: dict | None, point: dict) -> dict:
    m = mesh_lib.fetch(m)  # per-worker metrics span every process's devices; waits for the step
    now = self.clock.now()  # after the wait: the host may run ahead of the devices
    losses = np.asarray(m["worker_loss"], np.float64)
    record = {"step": step, "train_loss": float(losses.mean()), **point,
              "tokens_per_sec": (point["tokens"] - self.tokens_at_log) / max(now - self.t_log,
                                                                             1e-9),
              "grad_norm": float(np.mean(m["grad_norm"]))}
    if losses.size > 1:
      record["worker_loss_std"] = float(losses.std())
      record["worker_loss_range"] = float(losses.max() - losses.min())
    if "skipped_steps" in m:
      record["skipped_steps"] = int(np.sum(m["skipped_steps"]))
    if diag is not None:
      record.update({k: float(v) for k, v in jax.device_get(diag).items()})
    if "skipped_rounds" in point:
      record["skipped_rounds"] = float(point["skipped_rounds"])
    self.divergence.check(record)
    self.t_log, self.tokens_at_log = now, point["tokens"]
    return record


class Checkpointing:
  """Saves when `checkpointer.due` (not at the last step: the end saves) or after a signal
  (`stop`), once the metrics up to it are written; under `skip_nonfinite=False` never a diverged
  state (one host sync per save). `meta(step)` gives the checkpoint's meta."""

  def __init__(self, checkpointer, stop: "SignalFlag", log: MetricsLog, divergence: Divergence,
               meta: Callable[[int], dict], probe_nonfinite: bool):
    self.checkpointer, self.stop, self.log, self.divergence = checkpointer, stop, log, divergence
    self.meta, self.probe_nonfinite = meta, probe_nonfinite

  def due(self, end: StepEnd) -> bool:
    return self.stop.signum is not None or (not end.last and self.checkpointer.due(end.step))

  def __call__(self, end: StepEnd) -> None:
    self.log.write_pending()  # metrics up to the checkpoint are written (and shown) before it
    self.save(end)

  def save(self, end: StepEnd) -> None:
    if self.probe_nonfinite and end.metrics is not None:
      m = end.metrics
      probe = {"train_loss": float(np.mean(mesh_lib.fetch(m["worker_loss"]))),
               "grad_norm": float(np.mean(mesh_lib.fetch(m["grad_norm"])))}
      if end.diag is not None:
        probe["pseudo_grad_norm"] = float(end.diag.get("pseudo_grad_norm", 0.0))
      if nonfinite(probe):
        return
    self.checkpointer.save(end.step, end.state, self.meta(end.step))
    self.divergence.saved(end.step)


def _glibc(name: str) -> Callable | None:
  """The C library's function `name` where the process runs on Linux and has it, else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    return getattr(ctypes.CDLL(None), name)
  except (OSError, AttributeError, TypeError):
    return None


def release_free_memory() -> bool:
  """Hands the free pages of the C heap back to the OS (glibc's `malloc_trim(0)`); False where
  there is no glibc (macOS, Windows, musl). A process keeps memory it has freed for reuse, and a
  checkpoint save on a CPU frees a host copy of the whole state from threads whose heaps the
  training's threads do not reuse: without this the trainer's resident memory stays that much
  higher after the first save (the issue-11 workload: 2.7-2.85 GiB for the rest of the run, not
  ~2.0, docs/benchmarks.md). Costs a few milliseconds, and page faults where the freed pages are
  used again."""
  trim = _glibc("malloc_trim")
  if trim is None:
    return False
  trim(0)
  return True


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX_MIB = 32  # glibc refuses a larger mmap threshold on 64-bit hosts


def map_large_blocks(mib: int) -> bool:
  """Makes the C heap serve every request of `mib` MiB or more from a fresh memory map that goes
  back to the OS when freed (glibc's `M_MMAP_THRESHOLD`), and keep up to 4 x `mib` MiB free at
  the top of a heap (`M_TRIM_THRESHOLD`); process-wide, for later requests, and for the rest of
  the process (glibc has no call that restores its own rule). False where there is no glibc or
  `mib` is 0 (nothing changed).

  glibc's default raises its threshold to the size of each mapped block that is freed (up to 32
  MiB), so after the first outer sync, a sync's temporaries (22 MB per fake device on the
  issue-11 workload) come from the heap and stay resident for the whole next round, beside the
  round's own buffers: 8 x 22 MB of the run's peak (docs/benchmarks.md). With 16 MiB they are
  mapped for the sync and returned after it. The trim threshold is raised with it because a
  fixed mmap threshold also fixes glibc's trim threshold at 128 KiB, and trimming that eagerly
  cost ~10% tokens/s there (buffers of a few MiB faulted in afresh at every step)."""
  mallopt = _glibc("mallopt") if mib else None
  if mallopt is None:
    return False
  return bool(mallopt(M_MMAP_THRESHOLD, mib << 20)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                      4 * mib << 20))


class ReleaseMemory:
  """`release_free_memory()` once per checkpoint save, at the first call end after its write has
  finished (at once for a save written while training waited, `checkpoint.async_save`)."""

  def __init__(self, checkpointer, release: Callable[[], Any] = release_free_memory):
    self.checkpointer, self.release = checkpointer, release

  def due(self, end: StepEnd) -> bool:
    del end
    return self.checkpointer.save_finished()

  def __call__(self, end: StepEnd) -> None:
    del end
    self.release()


class Preempted(Exception):
  """Raised after a SIGTERM / SIGINT once the checkpoint is written; re-run to resume."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    super().__init__(f"stopped by signal {signum} at step {step}; a checkpoint was saved: re-run "
                     "the same command to resume.")


class SignalFlag:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps (main thread only)."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


class Preemption:
  """After a signal (the checkpoint action has saved): says so and raises `Preempted`."""

  def __init__(self, stop: SignalFlag, tag: str, directory: str):
    self.stop, self.tag, self.directory = stop, tag, directory

  def due(self, end: StepEnd) -> bool:
    del end
    return self.stop.signum is not None

  def __call__(self, end: StepEnd) -> None:
    print(f"{self.tag} stopped by signal {self.stop.signum} at step {end.step}: checkpoint saved "
          f"in {self.directory}; re-run the same command to resume.", flush=True)
    raise Preempted(self.stop.signum, end.step)


def parse_profile_steps(spec: str, total: int) -> tuple[int, int] | None:
  """(first step, count) of train.profile_steps = "START,COUNT" (0-based steps START ..
  START + COUNT - 1 of a run of `total` steps); None for "" (off). ValueError for anything else."""
  if spec == "":
    return None
  try:
    first, count = (int(x) for x in str(spec).split(","))
  except ValueError:
    first = count = -1
  if first < 0 or count < 1 or first + count > total:
    raise ValueError(f"train.profile_steps={spec!r} must be 'START,COUNT' with START >= 0, "
                     f"COUNT >= 1 and START + COUNT <= train.steps={total} (e.g. '10,2'), "
                     "or '' (off).")
  return first, count


class Profile:
  """Traces steps `first` .. `first + count - 1` with jax.profiler into `directory` (TensorBoard's
  profile plugin / XProf read it: directory/plugins/profile/<time>/*.xplane.pb). Starts after the
  step before them (or with `begin` when the run starts at `first`), stops once the last traced
  step has finished on the devices."""

  def __init__(self, first: int, count: int, directory: str):
    self.first, self.stop_at, self.directory = first, first + count, directory
    self.active = False

  def begin(self, step: int) -> None:
    """Called before the first step of a run (or resumed run) that starts at `step`."""
    if step == self.first:
      self._start()

  def _start(self) -> None:
    jax.profiler.start_trace(self.directory)
    self.active = True

  def due(self, end: StepEnd) -> bool:
    return end.step == self.first or (self.active and end.step == self.stop_at)

  def __call__(self, end: StepEnd) -> None:
    if self.active:
      jax.block_until_ready(end.state)  # the traced steps' device work is in the trace
      self.close()
    else:
      self._start()

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()

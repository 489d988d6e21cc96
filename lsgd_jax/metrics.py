"""Metric writing (JSONL and TensorBoard), progress lines and plots of finished runs.

Only process 0 writes (multi-host runs call the same code on every process).
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import time
from typing import Any, Iterable, Mapping

import jax


def _clean(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN / inf
  return v


# TensorBoard groups (the part of a tag before "/") of metrics.jsonl's keys; the outer-sync
# diagnostics a record holds are grouped under "outer_sync", any other key under "run".
TB_GROUPS = {
    "train_loss": "train/loss", "grad_norm": "train/grad_norm",
    "worker_loss_std": "train/worker_loss_std", "worker_loss_range": "train/worker_loss_range",
    "skipped_steps": "train/skipped_steps", "eval_loss": "eval/loss",
    "tokens_per_sec": "throughput/tokens_per_sec", "tokens": "progress/tokens",
    "flops": "progress/flops", "comm_bytes": "progress/comm_bytes",
    "sim_time": "clock/sim_time", "sim_utilisation": "clock/sim_utilisation",
    "skipped_rounds": "outer_sync/skipped_rounds",
}


def tb_tag(key: str, outer: bool = False) -> str:
  """The TensorBoard tag of a metrics.jsonl key (`outer`: an outer-sync diagnostic)."""
  if key in TB_GROUPS:
    return TB_GROUPS[key]
  return f"outer_sync/{key}" if outer else f"run/{key}"


class MetricWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl` and writes its scalars,
  at the same step, to a TensorBoard event file in `workdir` (tensorboardX: no TensorFlow).
  `tensorboard=False` writes JSONL only. `purge_step`: the run's first step (a resumed run's
  checkpoint, 0 for a restart); TensorBoard drops the earlier files' events from that step on, as
  metrics.jsonl is truncated there."""

  def __init__(self, workdir: str, filename: str = "metrics.jsonl", *, tensorboard: bool = True,
               purge_step: int | None = None):
    self.path = os.path.join(workdir, filename)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(logdir=workdir, purge_step=purge_step, flush_secs=30)

  def write(self, record: Mapping[str, Any], outer: Iterable[str] = ()) -> None:
    """Writes `record` (its "step" is the x axis); `outer` names its outer-sync diagnostics."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
    if self._tb is not None:
      outer = set(outer)
      for k, v in record.items():
        if k != "step" and isinstance(_clean(v), (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(tb_tag(k, k in outer), float(v), global_step=record["step"])

  def close(self) -> None:
    """Flushes and closes the event file (metrics.jsonl is written line by line)."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl. A last line cut short (a run killed while appending it)
  is dropped, since the run resumes from a checkpoint at or before it; a bad line anywhere else
  raises ValueError naming the file and the line."""
  with open(path) as f:
    lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
  records = []
  for n, (i, line) in enumerate(lines):
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    except ValueError as e:
      if n == len(lines) - 1 and not line.endswith("\n"):
        print(f"WARNING: {path}: the last line is cut short (a run killed while writing it); "
              "it is left out.", flush=True)
        break
      raise ValueError(f"{path}, line {i}: not a metrics record ({e}); repair or remove the "
                       "line.") from None
    records.append(record)
  return records


def read_events(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """The scalars of the TensorBoard event files in `workdir` (not its subfolders): tag ->
  [(step, value)] in the order written. Reads the TFRecord framing directly (length, CRC, event,
  CRC; CRCs not checked): no TensorFlow."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      while len(header := f.read(12)) == 12:
        (length,) = struct.unpack("<Q", header[:8])
        event = event_pb2.Event.FromString(f.read(length))
        f.read(4)
        for v in event.summary.value:
          out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_sim_time(seconds: float) -> str:
  """A simulated duration: 3 significant digits under a minute (tiny runs price in ms)."""
  return f"{seconds:.3g}s" if seconds < 60 else format_duration(seconds)


def format_count(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


class Progress:
  """Prints `step i/n | loss | eval | tok/s | sim time, utilisation | ETA` lines (process 0 only;
  the simulated time when the clock is on)."""

  def __init__(self, total_steps: int, name: str = ""):
    self.total, self.name, self.start = total_steps, name, time.perf_counter()
    self.start_step = None
    self.enabled = jax.process_index() == 0

  def update(self, step: int, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if self.start_step is None:
      self.start_step, self.start = step, now
    done = step - self.start_step
    eta = (now - self.start) / done * (self.total - step) if done > 0 else float("nan")
    parts = [f"{self.name} step {step}/{self.total}", f"loss {record['train_loss']:.4f}"]
    if "eval_loss" in record:
      parts.append(f"eval {record['eval_loss']:.4f}")
    parts.append(f"{format_count(record['tokens_per_sec'])} tok/s")
    if "sim_time" in record:  # the simulated clock (clock.device)
      parts.append(f"sim {format_sim_time(record['sim_time'])} at "
                   f"{100 * record['sim_utilisation']:.0f}% utilisation")
    parts.append(f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}")
    print(" | ".join(p.strip() for p in parts), flush=True)


def plot_eval_curves(runs: Mapping[str, Iterable[Mapping[str, Any]]], path: str,
                     title: str = "") -> str:
  """PNG of eval loss against tokens, one line per run (name -> metric records)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, records in runs.items():
    pts = [(r["tokens"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if pts:
      x, y = zip(*pts)
      ax.plot(x, y, marker="o", markersize=3, label=name)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("held-out loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path

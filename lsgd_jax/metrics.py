"""Metric writing (JSONL), progress lines and plots of finished runs.

Only process 0 writes (multi-host runs call the same code on every process).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Mapping

import jax


def _clean(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN / inf
  return v


class MetricWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
    self.path = os.path.join(workdir, filename)
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_count(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


class Progress:
  """Prints `step i/n | loss | eval | tok/s | ETA` lines (process 0 only)."""

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

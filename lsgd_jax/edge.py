"""Edge and multi-cluster scenarios: real training on the device mesh, priced by the clock.

`run_scenarios(config, workdir, names)` trains each named scenario of `SCENARIOS` (a set of
config overrides on one base config) in `workdir/NAME`, resuming where a run stopped;
`summarize` reads the runs back (loss against simulated wall clock); `memory_table`,
`cluster_table` and `straggler_table` are the clock's analytic answers (no training);
`write_report` draws the plots and writes the Markdown report (`experiments/edge.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from lsgd_jax import clock, report

# Two slow workers out of eight: one at half speed, one at a quarter (a phone that throttles, an
# older phone); the round under "wait" lasts as long as the quarter-speed worker's H steps.
SLOW = "1,1,1,1,1,1,0.5,0.25"

# name -> (what it shows, config overrides as dotted keys). Each local SGD scenario is read against
# DDP on the same network ("ddp", or the DDP scenario of the same condition).
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddp": ("DDP, 8 equal workers", {"algorithm": "ddp"}),
    "local_sgd": ("local SGD, 8 equal workers", {}),
    "ddp_stragglers": ("DDP, speeds " + SLOW, {"algorithm": "ddp", "edge.speeds": SLOW}),
    "stragglers_wait": ("local SGD, speeds " + SLOW + ", rounds wait for the slowest",
                        {"edge.speeds": SLOW}),
    "stragglers_budget": ("local SGD, speeds " + SLOW + ", fixed round time, mean weighted by "
                          "steps done", {"edge.speeds": SLOW, "edge.policy": "budget"}),
    "dropout_10": ("local SGD, each worker misses a round with probability 0.1",
                   {"faults.fail_prob": 0.1}),
    "dropout_30": ("local SGD, each worker misses a round with probability 0.3",
                   {"faults.fail_prob": 0.3}),
    "dropout_60": ("local SGD, each worker misses a round with probability 0.6",
                   {"faults.fail_prob": 0.6}),
    "dropout_90": ("local SGD, each worker misses a round with probability 0.9",
                   {"faults.fail_prob": 0.9}),
    "non_iid": ("local SGD, plays split over workers by Dirichlet(0.1) shares",
                {"data.non_iid": "dirichlet", "data.dirichlet_alpha": 0.1}),
    "ddp_non_iid": ("DDP, the same non-i.i.d. split",
                    {"algorithm": "ddp", "data.non_iid": "dirichlet",
                     "data.dirichlet_alpha": 0.1}),
    "slow_uplink": ("local SGD, 5 Mbit/s uplinks", {"clock.inter_bandwidth": 5.0}),
    "ddp_slow_uplink": ("DDP, 5 Mbit/s uplinks",
                        {"algorithm": "ddp", "clock.inter_bandwidth": 5.0}),
}

# Plots: a title and the scenarios drawn together.
GROUPS = (
    ("Stragglers", ("ddp", "local_sgd", "ddp_stragglers", "stragglers_wait", "stragglers_budget")),
    ("Drop-outs", ("ddp", "local_sgd", "dropout_10", "dropout_30", "dropout_60", "dropout_90")),
    ("Non-i.i.d. data", ("ddp", "local_sgd", "ddp_non_iid", "non_iid")),
    ("Uplink bandwidth", ("ddp", "local_sgd", "ddp_slow_uplink", "slow_uplink")),
)


def scenario_config(base: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`base` with the overrides of scenario `name` (a copy; `base` is not changed)."""
  if name not in SCENARIOS:
    raise ValueError(f"Unknown scenario {name!r}; allowed: {', '.join(SCENARIOS)}.")
  c = ml_collections.ConfigDict(base.to_dict())
  for key, value in SCENARIOS[name][1].items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c


def run_scenarios(base: ml_collections.ConfigDict, workdir: str,
                  names: Sequence[str] = tuple(SCENARIOS)) -> dict[str, dict]:
  """Trains each scenario in workdir/NAME (a finished one is read back, a stopped one resumes)."""
  from lsgd_jax import train  # JAX only here: the tables and the report need none
  configs = {n: scenario_config(base, n) for n in names}  # every name checked before any training
  if not base.clock.device:
    raise ValueError("The edge scenarios are priced by the clock: set clock.device (e.g. 'phone').")
  return {n: train.train_and_evaluate(c, os.path.join(workdir, n), name=n)
          for n, c in configs.items()}


@dataclasses.dataclass
class Curve:
  name: str
  sim_time: np.ndarray   # seconds, at each evaluation
  eval_loss: np.ndarray
  results: dict
  contributing: tuple[float, ...] = ()  # workers in each logged outer mean

  def time_to(self, loss: float) -> float:
    """Simulated seconds until the eval loss first reaches `loss` (linear between evaluations;
    inf if it never does)."""
    t, y = self.sim_time, self.eval_loss
    hit = np.nonzero(y <= loss)[0]
    if not hit.size:
      return math.inf
    i = hit[0]
    if i == 0:
      return float(t[0])
    f = (y[i - 1] - loss) / (y[i - 1] - y[i])
    return float(t[i - 1] + f * (t[i] - t[i - 1]))


def read_curve(workdir: str, name: str) -> Curve:
  d = os.path.join(workdir, name)
  with open(os.path.join(d, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(d, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [(r.get("sim_time", 0.0), r["eval_loss"]) for r in records if "eval_loss" in r]
  t, y = (np.array(v, np.float64) for v in zip(*evals))
  return Curve(name, t, y, results,
               tuple(r["contributing_workers"] for r in records if "contributing_workers" in r))


def summarize(workdir: str, names: Sequence[str], reference: str = "local_sgd") -> list[dict]:
  """One row per scenario: final eval loss, simulated hours, utilisation, bytes, and the simulated
  hours until the held-out loss first reaches 1% above the `reference` run's final loss (a level
  DDP passes on its way down, so the two algorithms are compared at the same loss)."""
  curves = {n: read_curve(workdir, n) for n in names}
  reference = reference if reference in curves else next(iter(curves))
  target = 1.01 * float(curves[reference].eval_loss[-1])
  rows = []
  for n, cv in curves.items():
    r = cv.results
    rows.append({"scenario": n, "what": SCENARIOS.get(n, ("", {}))[0],
                 "eval_loss": float(cv.eval_loss[-1]), "sim_hours": r["sim_time"] / 3600,
                 "utilisation": r.get("sim_utilisation"), "comm_bytes": r["comm_bytes"],
                 "skipped_rounds": r.get("skipped_rounds"), "memory_fits": r.get("memory_fits"),
                 "missed": (1 - np.mean(cv.contributing) / r["num_workers"]
                            if cv.contributing else None),
                 "reference": reference, "target_loss": target,
                 "hours_to_target": cv.time_to(target) / 3600})
  return rows


# ---------------------------------------------------------------------------------------------
# Analytic tables (the clock alone).


def memory_table(sizes: Sequence[str], devices: Sequence[str], seq_len: int = 2048,
                 tokens_per_step: float = 16384, vocab_size: int = 32_000) -> list[dict]:
  """Does a worker (float32 model, grads and AdamW moments, the outer state, 16-bit activations
  of `tokens_per_step` tokens, no recomputation) fit on each device? `sizes`: model presets."""
  from lsgd_jax import model  # pylint: disable=import-outside-toplevel  (JAX only here)
  rows = []
  for name in sizes:
    m = model.model_config(name, vocab_size, max(seq_len, 1))
    acts = clock.activation_bytes(m.num_layers, m.d_model, m.num_heads, seq_len, tokens_per_step)
    row = {"size": name, "params": model.total_params(m)}
    for dev in devices:
      rep = clock.memory_check(row["params"], dev, activations=acts)
      row[dev] = {"fits": rep.fits, "gb": rep.total / 1e9}
    rows.append(row)
  return rows


def cluster_table(params: Sequence[float], inter_gbit: Sequence[float], *, clusters: int = 4,
                  gpus_per_cluster: int = 8, tokens_per_step: float = 16384,
                  target: float = 0.9, device: str = "h100") -> list[dict]:
  """H needed for `target` utilisation by local SGD over `clusters` clusters of H100 nodes (each
  cluster one worker of `gpus_per_cluster` devices, two-stage sync), per inter-cluster bandwidth
  (Gbit/s per device), beside DDP's utilisation on the same network."""
  rows = []
  for n in params:
    for g in inter_gbit:
      net = clock.Network.for_device(device, clock.Link(g * 1e9 / 8, 20e-3, "inter"))
      kw = dict(params=n, flops_per_token=6 * n, tokens_per_step=tokens_per_step,
                devices_per_worker=gpus_per_cluster, workers=clusters, clusters=clusters,
                layout="two_stage")
      lsgd = clock.Run("local_sgd", sync_every=1, **kw)
      ddp = clock.Run("ddp", **kw)
      h = clock.sync_every_needed(target, lsgd, device, net)
      ratio = net.worker.bandwidth / net.inter.bandwidth
      step_share = (clock.step_comm(lsgd, net).time(net)
                    / clock.compute_time(tokens_per_step, 6 * n, device))
      rows.append({"params": n, "inter_gbit": g, "bandwidth_ratio": ratio,
                   "h_needed": h, "step_comm_share": step_share,
                   "ddp_utilisation": clock.utilisation(ddp, device, net)})
  return rows


def uplink_table(params: float, flops_per_token: float, tokens_per_step: float,
                 mbit: Sequence[float], sync_every: Sequence[int], *, workers: int = 8,
                 device: str = "phone", link: str = "edge-uplink") -> list[dict]:
  """Utilisation of DDP and of local SGD at each H, and the H needed for 50% and 90%, for
  `workers` devices in a flat ring over an uplink of each bandwidth (Mbit/s, the preset's
  latency)."""
  rows = []
  for m in mbit:
    net = clock.Network.for_device(device, link).with_bandwidth("inter", m * 1e6 / 8)
    kw = dict(params=params, flops_per_token=flops_per_token, tokens_per_step=tokens_per_step,
              workers=workers, clusters=workers)
    row = {"mbit": m, "ddp": clock.utilisation(clock.Run("ddp", **kw), device, net)}
    for h in sync_every:
      row[f"H{h}"] = clock.utilisation(clock.Run("local_sgd", sync_every=h, **kw), device, net)
    for u in (0.5, 0.9):
      row[f"h_for_{int(100 * u)}"] = clock.sync_every_needed(
          u, clock.Run("local_sgd", **kw), device, net)
    rows.append(row)
  return rows


def straggler_table(slowest: Sequence[float], workers: int = 8, sync_every: int = 50,
                    step_s: float = 1.0, sync_s: float = 10.0) -> list[dict]:
  """Utilisation of a round with one worker at speed v (the rest at 1) under each policy."""
  rows = []
  for v in slowest:
    speeds = [1.0] * (workers - 1) + [v]
    wait = clock.heterogeneous_round(speeds, sync_every, step_s, sync_s, "wait")
    budget = clock.heterogeneous_round(speeds, sync_every, step_s, sync_s, "budget")
    rows.append({"slowest": v, "wait_utilisation": wait.utilisation,
                 "wait_round_s": wait.seconds, "budget_utilisation": budget.utilisation,
                 "budget_round_s": budget.seconds, "budget_slowest_steps": budget.steps[-1],
                 "budget_step_share": sum(budget.steps) / (workers * sync_every)})
  return rows


# ---------------------------------------------------------------------------------------------
# Plots and the report.


def plot_scenarios(workdir: str, names: Sequence[str]):
  """Eval loss against simulated wall clock, one panel per group of `GROUPS`."""
  groups = [(t, [n for n in g if n in names]) for t, g in GROUPS]
  groups = [(t, g) for t, g in groups if len(g) > 1]
  cols = 2
  rows = max(1, math.ceil(len(groups) / cols))
  fig = report.new_figure((6 * cols, 4 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax, (title, group) in zip(axes.flat, groups):
    for n in group:
      cv = read_curve(workdir, n)
      t = np.maximum(cv.sim_time / 3600, 1e-6)
      ax.plot(t[1:], cv.eval_loss[1:], marker=".", ls="--" if n.startswith("ddp") else "-",
              label=n)
    ax.set_xscale("log")
    ax.set_xlabel("simulated wall clock (hours)")
    ax.set_ylabel("held-out loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  fig.tight_layout()
  return fig


def plot_clusters(rows: list[dict], target: float):
  fig = report.new_figure((6, 4))
  ax = fig.subplots()
  for n in sorted({r["params"] for r in rows}):
    pts = [(r["inter_gbit"], r["h_needed"]) for r in rows
           if r["params"] == n and math.isfinite(r["h_needed"])]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=f"N = {n:.0e}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("inter-cluster bandwidth per device (Gbit/s)")
  ax.set_ylabel(f"H needed for {100 * target:.0f}% utilisation")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  fig.tight_layout()
  return fig


def plot_stragglers(rows: list[dict]):
  fig = report.new_figure((6, 4))
  ax = fig.subplots()
  v = [r["slowest"] for r in rows]
  ax.plot(v, [r["wait_utilisation"] for r in rows], marker="o", label="wait for the slowest")
  ax.plot(v, [r["budget_utilisation"] for r in rows], marker="s", label="fixed round time")
  ax.plot(v, [r["budget_step_share"] for r in rows], ls=":", label="budget: share of steps done")
  ax.set_xscale("log")
  ax.set_xlabel("speed of the slowest of 8 workers")
  ax.set_ylabel("utilisation of a round")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return fig

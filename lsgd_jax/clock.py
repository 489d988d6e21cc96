"""Network and device model: simulated wall clock, utilisation and bandwidth needs (no JAX).

Units: bytes, seconds, FLOP/s. A link's bandwidth is bytes/s per device per direction (a pipe of
capacity C shared by d devices is a link of C / d). A run has three levels, fastest first:
`worker` (the devices of one replica), `cluster` (workers of one cluster) and `inter` (clusters).

Collectives, alpha-beta model seen from one device (B bytes, R devices, bandwidth W, latency a):
  ring all-reduce            2 (R - 1) a + 2 (R - 1) / R * B / W   (reduce-scatter + all-gather)
  reduce-scatter, all-gather   (R - 1) a +   (R - 1) / R * B / W
  flat all-reduce over several levels: one ring over all R devices, every hop as slow as the slowest
    level spanned: its latency (the largest) and its bandwidth carry all 2 (R - 1) / R * B bytes.
  two-stage (hierarchical) over group sizes g_0 .. g_L: reduce-scatter over g_0, ..., all-reduce of
    the B / (g_0 ... g_{L-1}) slice over g_L, then all-gathers back down. Local SGD's outer sync
    skips the first reduce-scatter: the devices of a worker hold the same pseudo-gradient and just
    take their 1/g_0 slice (lsgd_jax/local_sgd.py, `Layout.two_stage`).

Time per step (no overlap): T = T_comp + T_step_comm + T_period_comm / P, where P is the period
(1 for DDP, H for local SGD, H2 for hierarchical local SGD) and utilisation u = T_comp / T. With
overlap a step takes max(T_comp, T_step_comm) and an outer sync hides behind the steps since the
last sync. Compute time = tokens * FLOPs/token / (peak FLOP/s * MFU).

Finer overlap and the streaming outer sync (`Run` fields; docs/streaming.md):
  comm_overlap = f: a collective issued during a step hides behind the share f of its compute
    (f = 2/3: the backward pass, the convention of the published DiLoCo simulators): a step
    takes T_c + max(0, T_step_comm - f T_c) and an outer sync exposes max(0, T_sync - f T_c).
  fragments = P, overlap_steps = tau (streaming DiLoCo): every H steps each of the P fragments is
    sent once; a fragment sync moves 1 / P of the bytes (latency in full) and hides behind the
    tau steps it flies over: it exposes max(0, T_sync / P - (tau + f) T_c).
  outer_bytes_per_element: bytes per element of the outer sync on the wire (quantize.py formats
    with their scales; default: bytes_per_element).
  comm_buckets = L (with comm_overlap = f): the collective leaves in L equal buckets, bucket l when
    the backward pass of layer l ends (every f T_c / L seconds), one bucket on the wire at a time
    (PyTorch DDP's gradient buckets, one per layer): a collective of T seconds exposes
    max(T / L, T - f T_c (1 - 1 / L)) after the backward pass: the last bucket can only leave when
    the backward pass ends. L = 0: infinitely fine buckets, max(0, T - f T_c).
  duplex: the links are full duplex and every all-reduce runs two rings in opposite directions,
    each over half of the buffer (what NCCL does), so each direction carries half of the bytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

# The presets and the memory check live in hardware.py; they stay reachable as clock.NAME.
from lsgd_jax.hardware import (DEVICES, LINKS, Device, Link, MemoryReport,  # noqa: F401
                               _check, _count, _pos, activation_bytes, device, link,
                               memory_check)

LEVELS = ("worker", "cluster", "inter")
ALGORITHMS = ("ddp", "local_sgd", "hierarchical")
LAYOUTS = ("flat", "two_stage")
POLICIES = ("wait", "budget")
INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Network:
  """The links of the three levels a run spans (see the module docstring)."""

  worker: Link
  cluster: Link
  inter: Link

  @classmethod
  def for_device(cls, dev: str | Device, inter: str | Link = "wan-10g",
                 cluster: str | Link | None = None) -> "Network":
    dev = device(dev)
    return cls(link(dev.node_link), link(cluster or dev.cluster_link), link(inter))

  def with_bandwidth(self, level: str, bandwidth: float) -> "Network":
    _check("level", level, level in LEVELS, f"one of {LEVELS}")
    return dataclasses.replace(self, **{level: dataclasses.replace(getattr(self, level),
                                                                    bandwidth=bandwidth)})


@dataclasses.dataclass(frozen=True)
class Comm:
  """Communication of one device: latency seconds plus bytes sent over each level."""

  latency: float = 0.0
  bytes: dict = dataclasses.field(default_factory=dict)

  def __add__(self, other: "Comm") -> "Comm":
    keys = set(self.bytes) | set(other.bytes)
    return Comm(self.latency + other.latency,
                {k: self.bytes.get(k, 0.0) + other.bytes.get(k, 0.0) for k in keys})

  def __mul__(self, k: float) -> "Comm":
    return Comm(self.latency * k, {lv: b * k for lv, b in self.bytes.items()})

  def time(self, net: Network) -> float:
    return self.latency + sum(b / getattr(net, lv).bandwidth for lv, b in self.bytes.items())


def ring_allreduce_bytes(nbytes: float, nodes: int) -> float:
  """Bytes each of R nodes sends (and receives) in a ring all-reduce: 2 (R - 1) / R * B."""
  return 2.0 * (nodes - 1) / nodes * nbytes


def ring_allreduce_time(nbytes: float, nodes: int, lk: Link) -> float:
  """2 (R - 1) latency + 2 (R - 1) / R * B / bandwidth."""
  _count("nodes", nodes)
  return 2 * (nodes - 1) * lk.latency + ring_allreduce_bytes(nbytes, nodes) / lk.bandwidth


def _gather(nbytes: float, size: int, level: str, net: Network) -> Comm:
  """A reduce-scatter or an all-gather of a full buffer of `nbytes` over `size` devices."""
  return Comm((size - 1) * getattr(net, level).latency, {level: (size - 1) / size * nbytes})


def flat_allreduce(nbytes: float, groups: Sequence[tuple[int, str]], net: Network) -> Comm:
  """One ring over all devices of `groups` [(size, level), ...] (fastest first)."""
  spanned = [lv for size, lv in groups if size > 1]
  r = math.prod(size for size, _ in groups)
  if r == 1:
    return Comm()
  lat = max(getattr(net, lv).latency for lv in spanned)
  return Comm(2 * (r - 1) * lat, {spanned[-1]: ring_allreduce_bytes(nbytes, r)})


def two_stage_allreduce(nbytes: float, groups: Sequence[tuple[int, str]], net: Network,
                        reduce_scatter: bool = True) -> Comm:
  """Hierarchical all-reduce over `groups` (fastest first); see the module docstring."""
  live = [i for i, (s, _) in enumerate(groups) if s > 1]
  if not live:
    return Comm()
  out, b = Comm(), float(nbytes)
  for i in live[:-1]:
    size, lv = groups[i]
    out = out + _gather(b, size, lv, net) * (2 if (reduce_scatter or i > 0) else 1)  # RS + AG
    b /= size
  size, lv = groups[live[-1]]
  lk = getattr(net, lv)
  return out + Comm(2 * (size - 1) * lk.latency, {lv: ring_allreduce_bytes(b, size)})


def two_stage_allreduce_time(nbytes: float, group: int, fast: Link, groups: int, slow: Link,
                             reduce_scatter: bool = True) -> float:
  """Time of a two-stage all-reduce: `groups` groups of `group` devices, fast link inside."""
  net = Network(fast, fast, slow)
  return two_stage_allreduce(nbytes, [(group, "worker"), (groups, "inter")], net,
                             reduce_scatter).time(net)


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run does per step. `tokens_per_step` is per device; `params` are the synced elements.

  algorithm: "ddp" (gradients averaged over all devices every step), "local_sgd" (gradients
  averaged inside a worker every step, outer sync over all workers every `sync_every` = H steps) or
  "hierarchical" (outer sync inside each cluster every H1 = `sync_every` steps, over all clusters
  every H2 = `global_sync_every` steps). layout: "flat" (each device all-reduces the full buffer in
  one ring) or "two_stage" (the hierarchical all-reduce of the module docstring).
  """

  algorithm: str
  params: float
  flops_per_token: float
  tokens_per_step: float
  bytes_per_element: float = 4.0
  devices_per_worker: int = 1
  workers: int = 1
  clusters: int = 1
  sync_every: int = 1
  global_sync_every: int = 0
  layout: str = "flat"
  fragments: int = 1
  overlap_steps: int = 0
  outer_bytes_per_element: float | None = None
  comm_overlap: float = 0.0
  comm_buckets: int = 0
  duplex: bool = False

  def __post_init__(self):
    _check("algorithm", self.algorithm, self.algorithm in ALGORITHMS, f"one of {ALGORITHMS}")
    _check("layout", self.layout, self.layout in LAYOUTS, f"one of {LAYOUTS}")
    for name in ("params", "flops_per_token", "tokens_per_step", "bytes_per_element"):
      _pos(name, getattr(self, name))
    for name in ("devices_per_worker", "workers", "clusters"):
      _count(name, getattr(self, name))
    _check("workers", self.workers, self.workers % self.clusters == 0,
           f"a multiple of clusters = {self.clusters}")
    _check("H (sync_every)", self.sync_every,
           isinstance(self.sync_every, int) and self.sync_every >= 1, "an integer >= 1")
    _check("fragments", self.fragments, isinstance(self.fragments, int) and 1 <= self.fragments
           <= self.sync_every, f"an integer in [1, H = {self.sync_every}]")
    _check("overlap_steps", self.overlap_steps, isinstance(self.overlap_steps, int) and
           0 <= self.overlap_steps < max(self.sync_every // self.fragments, 1),
           "an integer in [0, H / fragments)")
    _check("comm_overlap", self.comm_overlap, 0.0 <= self.comm_overlap <= 1.0, "a share in [0, 1]")
    _check("comm_buckets", self.comm_buckets,
           isinstance(self.comm_buckets, int) and self.comm_buckets >= 0,
           "an integer >= 0 (0: infinitely fine buckets)")
    if self.outer_bytes_per_element is not None:
      _pos("outer_bytes_per_element", self.outer_bytes_per_element)
    if self.algorithm == "hierarchical":
      _check("fragments", self.fragments, self.fragments == 1 and self.overlap_steps == 0,
             "1 (no overlap_steps) for hierarchical runs")
      h1, h2 = self.sync_every, self.global_sync_every
      _check("H2 (global_sync_every)", h2, isinstance(h2, int) and h2 >= h1 and h2 % h1 == 0,
             f"a positive multiple of H1 (sync_every) = {h1}")

  def exposed(self, comm_s: float, compute_s: float, window_s: float = 0.0) -> float:
    """Seconds of a collective of `comm_s` issued during a step of `compute_s` that no compute
    hides, with `window_s` more seconds of compute after that step (streaming overlap)."""
    backward = self.comm_overlap * compute_s
    if self.comm_buckets == 0:
      return max(0.0, comm_s - backward - window_s)
    tail = comm_s / self.comm_buckets
    return max(0.0, tail - window_s, comm_s - backward * (1 - 1 / self.comm_buckets) - window_s)

  @property
  def period(self) -> int:
    return {"ddp": 1, "local_sgd": self.sync_every,
            "hierarchical": self.global_sync_every}[self.algorithm]

  def groups(self, scope: str = "global") -> list[tuple[int, str]]:
    g = [(self.workers // self.clusters, "cluster")]
    return g + [(self.clusters, "inter")] if scope == "global" else g


def compute_time(tokens: float, flops_per_token: float, dev: str | Device) -> float:
  """tokens * FLOPs/token / (peak FLOP/s * MFU)."""
  return tokens * flops_per_token / device(dev).flops


def _duplex(comm: Comm, run: Run) -> Comm:
  """Two counter-rotating rings: each direction carries half of the bytes (latency unchanged)."""
  return Comm(comm.latency, {k: b / 2 for k, b in comm.bytes.items()}) if run.duplex else comm


def step_comm(run: Run, net: Network) -> Comm:
  """The collective of every step: DDP's gradient all-reduce, or local SGD's inside a worker."""
  nbytes = run.params * run.bytes_per_element
  if run.algorithm != "ddp":
    comm = flat_allreduce(nbytes, [(run.devices_per_worker, "worker")], net)
  elif run.layout == "flat":
    comm = flat_allreduce(nbytes, [(run.devices_per_worker, "worker")] + run.groups(), net)
  else:
    comm = two_stage_allreduce(nbytes, [(run.devices_per_worker, "worker")] + run.groups(), net)
  return _duplex(comm, run)


def sync_comm(run: Run, net: Network, scope: str = "global") -> Comm:
  """One outer sync over all workers ("global") or over the workers of a cluster ("cluster")."""
  _check("scope", scope, scope in ("global", "cluster"), "'global' or 'cluster'")
  if run.algorithm == "ddp" or math.prod(s for s, _ in run.groups(scope)) == 1:
    return Comm()
  nbytes = run.params * (run.outer_bytes_per_element or run.bytes_per_element) / run.fragments
  if run.layout == "flat":
    comm = flat_allreduce(nbytes, run.groups(scope), net)
  else:
    comm = two_stage_allreduce(nbytes, [(run.devices_per_worker, "worker")] + run.groups(scope),
                               net, reduce_scatter=False)
  return _duplex(comm, run)


def period_comm(run: Run, net: Network) -> Comm:
  """The outer syncs of one period (hierarchical: H2 / H1 - 1 cluster syncs and a global one;
  streaming: the P fragment syncs)."""
  out = sync_comm(run, net) * run.fragments
  if run.algorithm == "hierarchical":
    out = out + sync_comm(run, net, "cluster") * (run.period // run.sync_every - 1)
  return out


class Clock:
  """Simulated seconds a training loop advances: `clock.step()` each step, `clock.sync()` per sync.

  Hierarchical runs call `clock.sync("cluster")` at H1 syncs. `clock.metrics()` gives `sim_time`
  (wall clock), `sim_comm_time` (all communication, hidden or not) and `sim_utilisation` (the
  workers' mean busy share of the wall clock).

  Heterogeneous workers: `speeds` [K] multiply the device's speed (0.5: half as fast). DDP and
  local SGD under `policy="wait"` go at the slowest worker's pace (a step takes step_s / min v)
  while the others idle; under "budget" (local SGD) a round lasts H steps of the fastest worker
  (step_s / max v each) and slower workers do fewer steps (`heterogeneous_round`).
  """

  def __init__(self, run: Run, dev: str | Device, net: Network, overlap: bool = False,
               speeds: Sequence[float] | None = None, policy: str = "wait"):
    self.run, self.overlap = run, overlap
    self.step_compute_s = compute_time(run.tokens_per_step, run.flops_per_token, dev)
    self.busy = 1.0  # the workers' mean share of a step's compute time spent computing
    if speeds is not None:
      _check("policy", policy, policy in POLICIES, f"one of {POLICIES}")
      budget = policy == "budget" and run.algorithm != "ddp"
      h = 1 if run.algorithm == "ddp" else run.sync_every
      pace = max(speeds) if budget else min(speeds)
      r = heterogeneous_round(speeds, h, self.step_compute_s, 0.0,
                              "budget" if budget else "wait",
                              budget_s=h * self.step_compute_s / pace)
      self.step_compute_s /= pace
      self.busy = r.utilisation
    self.step_comm_s = step_comm(run, net).time(net)
    self.sync_time = {s: sync_comm(run, net, s).time(net) for s in ("global", "cluster")}
    self.seconds = self.compute_seconds = self.comm_seconds = 0.0
    self.steps = self.syncs = 0
    self._since_sync = 0.0

  def step(self, n: int = 1) -> float:
    c, s = self.step_compute_s, self.step_comm_s
    wall = n * (max(c, s) if self.overlap else c + self.run.exposed(s, c))
    self.seconds += wall
    self._since_sync += wall
    self.compute_seconds += n * c * self.busy
    self.comm_seconds += n * s
    self.steps += n
    return self.seconds

  def sync(self, scope: str = "global") -> float:
    _check("scope", scope, scope in self.sync_time, "'global' or 'cluster'")
    t = self.sync_time[scope]
    c = self.step_compute_s
    hide = (self.run.overlap_steps + self.run.comm_overlap) * c
    self.seconds += (max(0.0, t - max(self._since_sync, hide)) if self.overlap else
                     self.run.exposed(t, c, self.run.overlap_steps * c))
    self.comm_seconds += t
    self._since_sync = 0.0
    self.syncs += 1
    return self.seconds

  @property
  def utilisation(self) -> float:
    return self.compute_seconds / self.seconds if self.seconds else 1.0

  def metrics(self) -> dict[str, float]:
    return {"sim_time": self.seconds, "sim_comm_time": self.comm_seconds,
            "sim_utilisation": self.utilisation}

  _STATE = ("seconds", "compute_seconds", "comm_seconds", "steps", "syncs", "_since_sync")

  def state_dict(self) -> dict[str, float]:
    """What a checkpoint keeps, so that a resumed run's clock goes on where it stopped."""
    return {k: getattr(self, k) for k in self._STATE}

  def load_state_dict(self, d: dict) -> None:
    for k in self._STATE:
      if k in d:
        setattr(self, k, type(getattr(self, k))(d[k]))


def sim_times(events: Iterable[tuple[int, int]], run: Run, dev: str | Device, net: Network,
              overlap: bool = False) -> list[float]:
  """Simulated seconds at each event (steps done, global syncs done), both cumulative.

  Steps are taken before syncs within an event; for hierarchical runs the cluster syncs are the
  H1 multiples that are not H2 multiples, inferred from the steps.
  """
  clock, out, prev = Clock(run, dev, net, overlap), [], (0, 0)
  for steps, syncs in events:
    _check("event", (steps, syncs), steps >= prev[0] and syncs >= prev[1], "non-decreasing")
    for s in range(prev[0] + 1, steps + 1):
      clock.step()
      if (run.algorithm == "hierarchical" and s % run.sync_every == 0
          and s % run.global_sync_every):
        clock.sync("cluster")
    for _ in range(syncs - prev[1]):
      clock.sync()
    out.append(clock.seconds)
    prev = (steps, syncs)
  return out


@dataclasses.dataclass(frozen=True)
class Timing:
  steps: int
  syncs: int
  compute_s: float
  comm_s: float   # all communication time, hidden by overlap or not
  total_s: float  # simulated wall clock

  @property
  def step_s(self) -> float:
    return self.total_s / self.steps

  @property
  def utilisation(self) -> float:
    return self.compute_s / self.total_s


def _drive(clock: Clock, steps: int, global_sync_at_end: bool) -> Clock:
  run = clock.run
  h1 = run.sync_every if run.algorithm == "hierarchical" else steps
  done = 0
  while done < steps:
    n = min(h1 - done % h1, steps - done)
    clock.step(n)
    done += n
    if (run.algorithm == "hierarchical" and done % h1 == 0
        and (done < steps or not global_sync_at_end)):
      clock.sync("cluster")
  if global_sync_at_end and run.algorithm != "ddp":
    for _ in range(run.fragments):  # streaming: P fragment syncs per period
      clock.sync()
  return clock


def simulate(run: Run, dev: str | Device, net: Network, steps: int | None = None,
             overlap: bool = False) -> Timing:
  """Wall clock of `steps` steps (default: one period) with their outer syncs."""
  steps = run.period if steps is None else steps
  _count("steps", steps)
  n, rest = divmod(steps, run.period)
  per = _drive(Clock(run, dev, net, overlap), run.period, True)
  tail = _drive(Clock(run, dev, net, overlap), rest, False) if rest else Clock(run, dev, net)
  return Timing(steps, n * per.syncs + tail.syncs,
                n * per.compute_seconds + tail.compute_seconds,
                n * per.comm_seconds + tail.comm_seconds, n * per.seconds + tail.seconds)


def utilisation(run: Run, dev: str | Device, net: Network, overlap: bool = False) -> float:
  return simulate(run, dev, net, overlap=overlap).utilisation


def _check_target(u: float) -> None:
  _check("target utilisation", u, isinstance(u, (int, float)) and 0 < u < 1,
         "a fraction in (0, 1)")


def bandwidth_needed(target: float, run: Run, dev: str | Device, net: Network,
                     level: str | None = None, overlap: bool = False) -> float:
  """Bandwidth (bytes/s) of `level` (default: the slowest level the run spans) for utilisation
  `target`; inf where latency and the other links alone exceed the budget.

  Without overlap, per period of P steps: P T_c / u = P (T_c + a_s + x_s / W) + a_o + x_o / W, with
  x the bytes on `level` and a the rest (latency, other links), so
  W = (P x_s + x_o) / (P T_c (1 / u - 1) - P a_s - a_o). With overlap it bisects on `simulate`.
  """
  _check_target(target)
  level = level or ("inter" if run.clusters > 1 else "cluster" if run.workers > 1 else "worker")
  _check("level", level, level in LEVELS, f"one of {LEVELS}")
  s, o = step_comm(run, net), period_comm(run, net)
  x_s, x_o = s.bytes.get(level, 0.0), o.bytes.get(level, 0.0)
  if x_s == 0 and x_o == 0:  # nothing crosses `level`: any bandwidth or none will do
    return 0.0 if utilisation(run, dev, net, overlap) >= target else INF
  if overlap or run.comm_overlap or run.overlap_steps:
    lo, hi = 1.0, 1e18
    if utilisation(run, dev, net.with_bandwidth(level, hi), overlap) < target:
      return INF
    for _ in range(200):
      mid = math.sqrt(lo * hi)
      lo, hi = (mid, hi) if utilisation(run, dev, net.with_bandwidth(level, mid), overlap) < target \
          else (lo, mid)
    return hi
  p, w = run.period, getattr(net, level).bandwidth
  t_c = compute_time(run.tokens_per_step, run.flops_per_token, dev)
  room = p * t_c * (1 / target - 1) - p * (s.time(net) - x_s / w) - (o.time(net) - x_o / w)
  if room <= 0:
    return INF
  return (p * x_s + x_o) / room


def sync_every_needed(target: float, run: Run, dev: str | Device, net: Network) -> float:
  """Smallest real H (H2 for hierarchical, H1 fixed) reaching utilisation `target`, no overlap.

  local SGD: H (T_c + T_s) + T_o = H T_c / u  =>  H = T_o / (T_c (1 / u - 1) - T_s).
  hierarchical: H2 = (T_g - T_cl) / (T_c (1 / u - 1) - T_s - T_cl / H1). inf if unreachable.
  """
  _check_target(target)
  _check("algorithm", run.algorithm, run.algorithm != "ddp", "'local_sgd' or 'hierarchical'")
  t_c = compute_time(run.tokens_per_step, run.flops_per_token, dev)
  t_s, t_g = step_comm(run, net).time(net), sync_comm(run, net).time(net)
  t_cl = sync_comm(run, net, "cluster").time(net) if run.algorithm == "hierarchical" else 0.0
  room = t_c * (1 / target - 1) - t_s - (t_cl / run.sync_every if t_cl else 0.0)
  return INF if room <= 0 else (t_g - t_cl) / room


def sync_every_for_comm_share(run: Run, net: Network, share: float = 0.5) -> float:
  """H at which outer syncs are `share` of all communication time: H = T_o (1 - s) / (s T_s).

  With the inner all-reduce on W0 and the outer on W1, equal group sizes and no latency, share 1/2
  gives H = W0 / W1 (the condition of Scaling Laws for DiLoCo, arXiv 2503.09799).
  """
  _check("share", share, 0 < share < 1, "a fraction in (0, 1)")
  t_s, t_o = step_comm(run, net).time(net), sync_comm(run, net).time(net)
  return INF if t_s == 0 else t_o * (1 - share) / (share * t_s)


@dataclasses.dataclass(frozen=True)
class Round:
  seconds: float              # wall clock of the round, outer sync included
  steps: tuple[int, ...]      # steps each worker did
  busy: tuple[float, ...]     # seconds each worker computed

  @property
  def utilisation(self) -> float:
    return sum(self.busy) / (len(self.busy) * self.seconds)


def heterogeneous_round(speeds: Sequence[float], sync_every: int, step_s: float,
                        sync_s: float = 0.0, policy: str = "wait",
                        budget_s: float | None = None) -> Round:
  """One round with per-worker speed multipliers (a worker of speed v takes step_s / v per step).

  "wait": every worker does H steps; the round lasts H step_s / min(v) + sync_s.
  "budget": the round lasts budget_s (default H step_s) + sync_s; worker k does
  floor(budget_s v_k / step_s) steps.
  """
  _check("policy", policy, policy in POLICIES, f"one of {POLICIES}")
  _check("H (sync_every)", sync_every, isinstance(sync_every, int) and sync_every >= 1,
         "an integer >= 1")
  _pos("step_s", step_s)
  for v in speeds:
    _pos("speed", v)
  if policy == "wait":
    busy = tuple(sync_every * step_s / v for v in speeds)
    return Round(max(busy) + sync_s, (sync_every,) * len(busy), busy)
  budget_s = sync_every * step_s if budget_s is None else budget_s
  _pos("budget_s", budget_s)
  steps = tuple(int(math.floor(budget_s * v / step_s + 1e-9)) for v in speeds)
  return Round(budget_s + sync_s, steps, tuple(n * step_s / v for n, v in zip(steps, speeds)))

"""What happens at the end of each round: who contributes to the outer mean and with what weight
(`Rounds`: drop-outs, heterogeneous speeds under the "budget" policy), and the compiled programs
that run the train step and the outer syncs (`Programs`)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from lsgd_jax import comm, faults, local_sgd, streaming
from lsgd_jax import mesh as mesh_lib


LIBRARY_FUSION = ("auto", "dot", "xla")
_YNN_FUSION = "xla_cpu_experimental_ynn_fusion_type"
_SCHEDULER = "xla_cpu_scheduler_type"
MEMORY_SCHEDULER_FROM_WIDTH = 128  # step_options: the one-step program's scheduler (measured)
DOT_ONLY_FROM_WIDTH = 48  # "auto": dot fusions only from this d_model on (measured below)


def compiler_options(library_fusion: str, backend: str,
                     d_model: int | None = None) -> dict[str, str]:
  """XLA options of the train-step programs for `train.library_fusion` on `backend` (for a
  model of width `d_model`; None: any width).

  By default XLA:CPU hands its YNNPACK library the dots (with elementwise work fused in) and also
  reductions with the elementwise work feeding them; for those a broadcast operand, such as an
  RMSNorm scale in the scale's gradient, is first written out at the activations' size (on the
  issue-11 workload ~2.4% of a step went to such broadcasts). "dot" hands YNNPACK the dot
  fusions alone and leaves reductions to XLA's own fused loops: one device's kernel time per step
  1,624 -> 1,484 ms, +3-5% tokens/s for the trainer's loop on 8 fake devices
  (docs/benchmarks.md). At the study's two smallest widths (16, 32) it lost 2-5% in the same
  comparison, so "auto" is "dot" on a CPU from d_model 48 on (+5% there), unless XLA_FLAGS sets
  the option (an explicit "dot" overrides it) or the installed jaxlib lacks it (an experimental
  option). "xla" keeps XLA's default. Empty on other backends (the option is XLA:CPU's)."""
  check_library_fusion(library_fusion)
  if backend != "cpu" or library_fusion == "xla" or (library_fusion == "auto" and (
      _YNN_FUSION in os.environ.get("XLA_FLAGS", "")
      or (d_model is not None and d_model < DOT_ONLY_FROM_WIDTH))):
    return {}
  options = {_YNN_FUSION: "LIBRARY_FUSION_TYPE_DOT"}
  if not _known(tuple(options.items())):
    if library_fusion == "auto":
      return {}
    raise ValueError(f"train.library_fusion='dot': this jaxlib ({jax.__version__}) has no XLA "
                     f"option {_YNN_FUSION}; use 'auto' or 'xla'.")
  return options


def step_options(options: dict[str, str] | None, backend: str,
                 d_model: int | None = None) -> dict[str, str]:
  """XLA options of the one-step program (the runs that dispatch every step: streaming syncs,
  the budget policy, `train.steps_per_call=1`) for a model of width `d_model` (None: any):
  `options` (`compiler_options`) and, on a CPU from width `MEMORY_SCHEDULER_FROM_WIDTH` on,
  XLA's memory-optimised scheduler. Its buffers are smaller, so each call faults in fewer fresh
  pages: 8 workers on 8 devices, 256 tokens, one step per call ran 1.23x as fast at width 128
  (76k -> 16k page faults per step) and 1.05-1.07x at 256 (148k -> 110k); at width 32 and 64
  tokens (no faults to save) it lost 9% (docs/benchmarks.md). The same operations in another
  order: equal to the default's up to float rounding (tests/test_calls.py). The trainer's loop
  program keeps the default scheduler (it reuses its buffers over the steps of a call; 0.988 at
  width 256). Left out where XLA_FLAGS names the scheduler or the jaxlib lacks the option."""
  options = dict(options or {})
  if (backend != "cpu" or _SCHEDULER in os.environ.get("XLA_FLAGS", "")
      or (d_model is not None and d_model < MEMORY_SCHEDULER_FROM_WIDTH)):
    return options
  extra = {_SCHEDULER: "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  return {**options, **extra} if _known(tuple(extra.items())) else options


def check_library_fusion(value) -> None:
  if value not in LIBRARY_FUSION:
    raise ValueError(f"train.library_fusion={value!r}: allowed "
                     f"{', '.join(map(repr, LIBRARY_FUSION))}.")


@functools.lru_cache(maxsize=None)
def _known(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib's CPU compiler takes `options` (one tiny program compiled once)."""
  try:  # called only where the default backend is the CPU
    jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((), np.float32)).compile(dict(options))
  except Exception:  # pylint: disable=broad-except  # "No such compile option", a bad value, ...
    return False
  return True


def _steps_loop(train_step: Callable, state: local_sgd.TrainState, batch: jax.Array, per_call: int,
                layout: mesh_lib.Layout, options: dict[str, str] | None = None):
  """The compiled `loop(state, batches [per_call, ...], n) -> (state, metrics of step n)`: the
  train step over the first n batches in a `fori_loop` whose trip count is an argument, so calls
  of every length share one program (a `scan` would compile once per length; a run's calls are
  cut at syncs, logs and evaluations into several lengths). The state is donated."""
  metrics = jax.eval_shape(train_step, state, batch)[1]

  def loop(st, batches, n):
    zeros = jax.tree.map(lambda m: jax.numpy.zeros(m.shape, m.dtype), metrics)
    return jax.lax.fori_loop(0, n, lambda i, c: train_step(c[0], batches[i]), (st, zeros))

  stacked = jax.ShapeDtypeStruct(
      (per_call, *batch.shape), batch.dtype,
      sharding=layout.sharding(jax.sharding.PartitionSpec(None, *layout.batch.spec)))
  count = jax.ShapeDtypeStruct((), np.int32, sharding=layout.sharding(jax.sharding.PartitionSpec()))
  lowered = jax.jit(loop, donate_argnums=0).lower(state, stacked, count)
  return lowered.compile(options or None)


def budget_policy(algorithm: str, policy: str, speeds: np.ndarray) -> bool:
  """Whether slow workers do fewer inner steps (local SGD, edge.policy "budget", unequal speeds)."""
  return algorithm == "local_sgd" and policy == "budget" and speeds.min() < speeds.max()


@dataclasses.dataclass(frozen=True)
class RoundSpec:
  """The settings `Rounds` follows: the run's seed, injected failures (faults.fail_prob,
  faults.fail_schedule) and worker speeds (edge.speeds, edge.policy)."""

  algorithm: str = "local_sgd"
  seed: int = 0
  fail_prob: float = 0.0
  fail_schedule: str = ""
  speeds: str = ""
  policy: str = "wait"

  @classmethod
  def of(cls, c: ml_collections.ConfigDict) -> "RoundSpec":
    return cls(c.algorithm, c.seed, c.faults.fail_prob, c.faults.fail_schedule, c.edge.speeds,
               c.edge.policy)


class Rounds:
  """Who contributes what to each outer round: the weights of the outer mean (0 for a failed
  worker; under the budget policy, the inner steps a worker did) and, under the budget policy, the
  per-step mask of the workers that take a step. A worker of relative speed v does
  floor(j v / max v) steps in the first j steps of a round, so its steps are spread through the
  round and a last, shorter round credits only the steps its time allowed. All pure functions of
  (config, step), so a resumed run does what an uninterrupted one does."""

  def __init__(self, spec: RoundSpec | ml_collections.ConfigDict, layout: mesh_lib.Layout,
               round_steps: int, global_steps: int | None = None):
    if not isinstance(spec, RoundSpec):  # a config: read the settings above from it
      spec = RoundSpec.of(spec)
    k = layout.num_workers
    self.layout, self.round_steps, self.seed = layout, round_steps, spec.seed
    self.global_steps = global_steps  # hierarchical: steps between global syncs (H2)
    self.fail_prob = spec.fail_prob
    self.schedule = faults.parse_schedule(spec.fail_schedule, k)
    self.speeds = faults.parse_speeds(spec.speeds, k, spec.seed)
    self.budget = budget_policy(spec.algorithm, spec.policy, self.speeds)
    self.steps = faults.budget_steps(self.speeds, round_steps) if self.budget else None
    self.uniform = local_sgd.uniform_weights(layout)
    self._masks: dict[bytes, jax.Array] = {}

  @property
  def weighted(self) -> bool:
    return self.budget or self.fail_prob > 0 or bool(self.schedule)

  def step_args(self, step: int) -> tuple:
    """Extra arguments of the train step at `step`: (active mask,) under the budget policy."""
    if not self.budget:
      return ()
    j = step % self.round_steps
    active = (faults.budget_steps(self.speeds, j + 1) > faults.budget_steps(self.speeds, j))
    active = active.astype(np.float32)
    key = active.tobytes()
    if key not in self._masks:  # at most H distinct masks: put each on the devices once
      self._masks[key] = mesh_lib.put_global(active, self.layout.per_worker)
    return (self._masks[key],)

  def host_weights(self, step: int) -> np.ndarray:
    """Outer-mean weights [K] of the round that ends after `step` (0-based), on the host."""
    w = faults.round_weights(step // self.round_steps, self.layout.num_workers, seed=self.seed,
                             fail_prob=self.fail_prob, schedule=self.schedule)
    if self.budget:  # the steps each worker did in this round
      w = w * faults.budget_steps(self.speeds, step % self.round_steps + 1)
    return w.astype(np.float32)

  def weights(self, step: int) -> jax.Array:
    if not self.weighted:
      return self.uniform
    # The same on every process: no cross-host equality check.
    return mesh_lib.put_global(self.host_weights(step), self.layout.per_worker)

  def cluster_weights(self, step: int, ones: jax.Array) -> jax.Array:
    """Hierarchical runs: the weight [C] of each cluster in the global mean that ends after
    `step`: the weights of its workers summed over the cluster rounds since the last global sync
    (0 for a cluster none of whose workers contributed). `ones` where all clusters are equal."""
    if not self.weighted:
      return ones
    h1, h2 = self.round_steps, self.global_steps
    first = step // h2 * h2
    ends = sorted({min(r + h1 - 1, step) for r in range(first, step + 1, h1)})
    total = sum(self.host_weights(e) for e in ends)
    per_cluster = total.reshape(self.layout.num_clusters, -1).sum(axis=1).astype(np.float32)
    if np.all(per_cluster == per_cluster[0]) and per_cluster[0] > 0:
      return ones
    return mesh_lib.put_global(per_cluster, ones.sharding)


class Programs:
  """The run's programs, compiled ahead of time (the compiled programs also tell the bytes their
  collectives move): the train step, the outer sync, and for hierarchical runs the clusters' sync
  every H1 = `rounds.round_steps` steps (the outer sync then runs over clusters every
  H = H2 = `rounds.global_steps` steps; flat runs sync every H = `rounds.round_steps`).

  `train_step`, `outer_sync` (None for DDP) and `cluster_sync` (None unless hierarchical) are the
  jitted functions of `train.Setup`; `options` are XLA's for the train step (`compiler_options`),
  `one_step_options` (None: `options`) for it where it runs one step per call (`step_options`)."""

  def __init__(self, layout: mesh_lib.Layout, train_step: Callable, outer_sync: Callable | None,
               cluster_sync: Callable | None, state: local_sgd.TrainState, batch: jax.Array,
               rounds: Rounds, per_call: int = 1, options: dict[str, str] | None = None,
               one_step_options: dict[str, str] | None = None):
    mesh = layout.mesh
    self.rounds, self.h = rounds, rounds.global_steps or rounds.round_steps
    stats = lambda fn: comm.CommStats.of(comm.collectives(fn, mesh))
    none = comm.CommStats(0, 0.0, {})
    self.per_call, self.step, self.loop = per_call, None, None
    if per_call > 1:  # one program for calls of 1 .. per_call steps (none compiled per step)
      self.loop = _steps_loop(train_step, state, batch, per_call, layout, options)
      self.step_comm = stats(self.loop)  # the loop body's collectives: one step's
      self._counts = [mesh_lib.put_global(np.int32(n), layout.sharding(jax.sharding.PartitionSpec()))
                      for n in range(per_call + 1)]
    else:
      one = options if one_step_options is None else one_step_options
      self.step = train_step.lower(state, batch, *rounds.step_args(0)).compile(one or None)
      self.step_comm = stats(self.step)
    self.sync, self.sync_comm = None, none
    self.cluster, self.cluster_comm, self.h1, self.cluster_ones = None, none, self.h, None
    weights = local_sgd.uniform_weights(layout)
    if cluster_sync is not None:
      self.cluster = cluster_sync.lower(state, weights).compile()
      self.cluster_comm = stats(self.cluster)
      self.h1 = rounds.round_steps
      self.cluster_ones = mesh_lib.put_global(
          np.ones(layout.num_clusters, np.float32),
          layout.sharding(jax.sharding.PartitionSpec("cluster")))
      weights = self.cluster_ones
    self.syncs_done = 1  # outer syncs the last `outer_syncs` ran (streaming: fragments sent)
    self.stream = None  # streaming outer syncs (lsgd_jax/streaming.py): fragments, overlap, ...
    if isinstance(outer_sync, streaming.Factory):
      self.stream = outer_sync.programs(state, weights)
      self.sync_comm = self.stream.sync_comm
    elif outer_sync is not None:
      self.sync = outer_sync.lower(state, weights).compile()
      self.sync_comm = stats(self.sync)

  def steps(self, state, batches: jax.Array, n: int):
    """n inner steps in one call of the loop program over `batches` [per_call, ...] (the first n
    used): (state, the last step's metrics: the ones a record reads). The same numbers as n calls
    of the train step."""
    return self.loop(state, batches, self._counts[n])

  def outer_syncs(self, state, step: int, last: bool):
    """The syncs due after `step` (0-based): (state, diagnostics, scope or None, bytes moved per
    device). A last, incomplete round still ends with a global sync, so the run yields one global
    model."""
    if self.stream is not None:
      state, diag, sent, moved = self.stream.outer_syncs(state, step, last, self.rounds.weights)
      self.syncs_done = sent
      return state, diag, "global" if sent else None, moved
    glob = self.sync is not None and ((step + 1) % self.h == 0 or last)
    if not (glob or (self.cluster is not None and (step + 1) % self.h1 == 0)):
      return state, None, None, 0.0
    w, diag, moved = self.rounds.weights(step), {}, 0.0
    if self.cluster is not None:  # the clusters' own outer step (also before a global one)
      state, diag = self.cluster(state, w)
      moved += self.cluster_comm.wire_bytes
      w = self.rounds.cluster_weights(step, self.cluster_ones)
    if glob:
      state, outer = self.sync(state, w)
      diag = {**outer, **diag}
      moved += self.sync_comm.wire_bytes
    return state, diag, "global" if glob else "cluster", moved

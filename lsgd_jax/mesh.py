"""Device mesh `('worker', 'data')` (hierarchical: `('cluster', 'worker', 'data')`) and the
shardings of the training state.

A *worker* is one replica of the model that trains on its own data between outer syncs. Workers
live on the mesh's `'worker'` axis (outermost, so that on a multi-slice TPU or a multi-node GPU job
it lands on the slow links); the devices of one worker form the `'data'` axis, over which gradients
are averaged every step.

Two layouts:
- `num_workers <= devices`: each worker gets `devices // num_workers` devices on `'data'`;
- `num_workers > devices`: each device holds `num_workers // devices` workers, vmapped (this is how
  8 workers train on one laptop CPU or one GPU; results equal the spread-out layout).

Hierarchical runs (`num_clusters` given) add a `'cluster'` axis outermost: the K workers split into
C clusters of K / C (cluster c holds workers [c K / C, (c + 1) K / C)); the per-worker leading axis
is sharded over `('cluster', 'worker')` (`Layout.worker_axes`).

Two-stage outer state (`two_stage`, default when a worker spans several devices): the global
parameters and the outer optimizer state are stored per leaf flattened and zero-padded to a
multiple of |data|, sharded over `'data'` (`Layout.outer`), so each device keeps 1/|data| of them.
Sharded outer state (`shard_outer`, the trainer's default where it applies: a flat mesh with one
worker per device) stores them the same way over `'worker'`.

Logical shapes (sharding in brackets):
- per-worker state (params, inner optimizer state): [K, ...]          ('worker' on axis 0)
- global (outer) state, plain:                       [...]            (replicated)
- global (outer) state, two-stage:                   [n padded]       ('data')
- global (outer) state, `shard_outer`:               [n padded]       ('worker')
- per-cluster outer state (hierarchical):            [C, ...] / [C, n padded] ('cluster'[, 'data'])
- DDP state:                                         [...]            (replicated)
- a step's batch:                                    [K, B / K, T + 1] ('worker', 'data', -)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CLUSTER, WORKER, DATA = "cluster", "worker", "data"
TWO_STAGE = ("auto", True, False)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where `num_workers` workers sit on the mesh, and whether the outer state is sharded."""

  mesh: Mesh
  num_workers: int
  two_stage: bool = False  # outer parameters and outer optimizer state sharded over 'data'
  shard_outer: bool = False  # ... sharded over 'worker' instead (flat mesh, one device per worker)

  @property
  def outer_axis(self) -> str | None:
    """The mesh axis the outer state is sharded over ('data' two-stage, 'worker' with
    `shard_outer`), or None (replicated)."""
    return DATA if self.two_stage else WORKER if self.shard_outer else None

  @property
  def outer_shards(self) -> int:
    """Devices that share one copy of the outer state (each holds 1/outer_shards of it)."""
    return self.mesh.shape[self.outer_axis] if self.outer_axis else 1

  @property
  def num_clusters(self) -> int:
    return self.mesh.shape.get(CLUSTER, 1)

  @property
  def hierarchical(self) -> bool:
    return CLUSTER in self.mesh.axis_names

  @property
  def worker_axes(self) -> tuple[str, ...]:
    """The mesh axes the leading worker dimension [K] is sharded over (cluster-major)."""
    return (CLUSTER, WORKER) if self.hierarchical else (WORKER,)

  @property
  def worker_axis_size(self) -> int:
    """Device groups along the worker axes (clusters x workers per cluster on the mesh)."""
    return math.prod(self.mesh.shape[a] for a in self.worker_axes)

  @property
  def data_axis_size(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def workers_per_device(self) -> int:
    return self.num_workers // self.worker_axis_size

  @property
  def workers_per_cluster(self) -> int:
    return self.num_workers // self.num_clusters

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  @property
  def replicated(self) -> NamedSharding:
    return self.sharding(P())

  @property
  def per_worker(self) -> NamedSharding:
    """Sharding of arrays with a leading worker dimension of size K."""
    return self.sharding(P(self.worker_axes))

  @property
  def batch(self) -> NamedSharding:
    """Sharding of a [K, B / K, T + 1] batch."""
    return self.sharding(P(self.worker_axes, DATA))

  @property
  def outer(self) -> NamedSharding:
    """Sharding of a leaf of the global (outer) state with at least one dimension."""
    return self.sharding(P(self.outer_axis) if self.outer_axis else P())

  @property
  def per_cluster(self) -> NamedSharding:
    """Sharding of a leaf [C, ...] of the per-cluster outer state (hierarchical runs)."""
    return self.sharding(P(CLUSTER, DATA) if self.two_stage else P(CLUSTER))


def order_devices(devices) -> list:
  """Devices grouped by TPU slice, then by process; the given order is kept within a process.

  `jax.devices()` is not promised to list one process's devices together; the mesh needs that so
  that a worker's devices (its 'data' axis, all-reduced every step) share a host and the 'worker'
  axis runs between hosts and slices.
  """
  return sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.process_index))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def make_layout(num_workers: int, num_devices: int | None = None,
                devices: list | None = None, *, num_clusters: int | None = None,
                two_stage: bool | str = "auto", shard_outer: bool | str = False) -> Layout:
  """Builds the `('worker', 'data')` mesh for `num_workers` workers.

  `num_clusters` (an int, 1 included) builds the hierarchical `('cluster', 'worker', 'data')` mesh
  instead: clusters outermost, so the slowest links carry only the cluster axis. `two_stage`
  ("auto": when a worker has several devices on 'data') shards the outer state over 'data'.
  `shard_outer` ("auto": when the mesh is flat with one worker per device, |data| = 1 and
  |worker| = K > 1) shards it over 'worker' instead: each device keeps 1/|worker| of theta and of
  the outer optimizer state, and the outer sync exchanges the workers' slices (an all-to-all) and
  all-gathers the new theta, the bytes of one all-reduce. True also allows several workers per
  device; the all-to-all then carries each of a device's K / |worker| workers' slices, that many
  times the bytes of the all-reduce that sums them locally first (so "auto" leaves it off there).

  `num_devices` limits the mesh to the first devices (None: all of `jax.devices()`). Works across
  processes: `jax.devices()` is the global list after `jax.distributed.initialize()`; devices are
  grouped by slice, then process (`order_devices`). With P processes of equal device counts and K
  workers a multiple of P, process p holds exactly workers [p K / P, (p + 1) K / P), and no worker
  spans two processes (2 processes x 4 devices: K = 8 puts workers 0-3 on process 0; K = 2 gives
  each worker one process's 4 devices on 'data'). With K < P a worker spans P / K processes and
  its every-step gradient all-reduce crosses hosts.
  """
  devices = order_devices(jax.devices() if devices is None else devices)
  if num_devices is not None and num_devices > 0:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are visible "
                       f"({devices[0].platform}).")
    devices = devices[:num_devices]
  n = len(devices)
  if num_workers < 1:
    raise ValueError(f"num_workers must be at least 1, got {num_workers}.")
  if two_stage not in TWO_STAGE:
    raise ValueError(f"two_stage must be 'auto', True or False, got {two_stage!r}.")
  if shard_outer not in TWO_STAGE:
    raise ValueError(f"shard_outer must be 'auto', True or False, got {shard_outer!r}.")
  if num_workers <= n:
    if n % num_workers:
      raise ValueError(
          f"num_workers={num_workers} does not divide the device count {n}: allowed are its "
          f"divisors {_divisors(n)} (each worker gets an equal share of devices) or multiples of "
          f"{n} (several workers per device).")
    shape = (num_workers, n // num_workers)
  else:
    if num_workers % n:
      raise ValueError(
          f"num_workers={num_workers} is neither a divisor nor a multiple of the device count "
          f"{n}: allowed are {_divisors(n)} or multiples of {n}.")
    shape = (n, 1)
  axes = (WORKER, DATA)
  if num_clusters is not None:
    c = num_clusters
    if c < 1 or num_workers % c:
      raise ValueError(
          f"num_clusters={c} must divide num_workers={num_workers} (each cluster gets an equal "
          f"share of workers): allowed are {_divisors(num_workers)}.")
    if shape[0] % c:
      raise ValueError(
          f"The mesh cannot split into clusters x workers x data = {c} x "
          f"{num_workers // c} x {shape[1]}: num_clusters={c} must divide the {shape[0]} device "
          f"groups of the worker axis ({n} devices, {num_workers} workers); allowed "
          f"num_clusters: {[d for d in _divisors(shape[0]) if num_workers % d == 0]}.")
    shape, axes = (c, shape[0] // c, shape[1]), (CLUSTER, WORKER, DATA)
  # Workers outermost (clusters before them): after order_devices consecutive devices share a
  # slice and a host, so the 'data' axis stays inside a host or slice and the 'worker' (and
  # 'cluster') axes cross the slow links.
  mesh = Mesh(np.asarray(devices, dtype=object).reshape(shape), axes)
  if two_stage == "auto":
    two_stage = mesh.shape[DATA] > 1
  flat = CLUSTER not in mesh.axis_names and mesh.shape[DATA] == 1 and mesh.shape[WORKER] > 1
  if shard_outer == "auto":
    shard_outer = flat and not two_stage and num_workers == mesh.shape[WORKER]
  elif shard_outer and not (flat and not two_stage):
    raise ValueError(
        f"shard_outer=True shards the outer state over 'worker' and needs a flat mesh (no "
        f"clusters, 'data' of size 1) with several devices on 'worker'; this mesh is "
        f"{dict(mesh.shape)}"
        f"{' with the two-stage layout' if two_stage else ''} (use shard_outer='auto' or False).")
  return Layout(mesh=mesh, num_workers=num_workers, two_stage=bool(two_stage),
                shard_outer=bool(shard_outer))


def check_batch(layout: Layout, global_batch: int) -> int:
  """Validates the global batch against the layout; returns the batch per worker."""
  k, d = layout.num_workers, layout.data_axis_size
  if global_batch < 1 or global_batch % (k * d):
    step = k * d
    raise ValueError(
        f"Global batch size {global_batch} is not divisible by num_workers x data devices = "
        f"{k} x {d} = {step}; allowed: multiples of {step} (e.g. {step}, {2 * step}, "
        f"{4 * step}).")
  return global_batch // k


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The host array `array` (the *global* value, the same on every process) on the mesh.

  Each process copies only the shards its own devices hold, so with several processes every host
  may compute the whole (cheap, deterministic) batch and feed just its part. One process: the same
  as `jax.device_put(array, sharding)`.
  """
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def process_slice(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The box of a global array of `shape` that this process's devices hold (for a data pipeline
  that produces only its rows: e.g. the workers `[K, ...]` of a batch a process needs)."""
  indices = list(sharding.addressable_devices_indices_map(tuple(shape)).values())
  box = []
  for dim, size in enumerate(shape):
    starts = [idx[dim].indices(size)[0] for idx in indices]
    stops = [idx[dim].indices(size)[1] for idx in indices]
    box.append(slice(min(starts), max(stops)))
  return tuple(box)


def local_workers(layout: Layout) -> range:
  """The workers whose state and data live (at least partly) on this process's devices."""
  rows = process_slice(layout.per_worker, (layout.num_workers,))[0]
  return range(rows.start, rows.stop)


def fetch(x):
  """Host copy of a pytree of arrays, whole on every process: arrays sharded over devices of
  other processes (e.g. per-worker metrics [K]) are all-gathered across processes first."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def one(a):
    if isinstance(a, jax.Array) and not (a.is_fully_addressable or a.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))

  return jax.tree.map(one, x)


def describe(layout: Layout) -> str:
  m = layout.mesh
  kind = m.devices.flat[0].platform
  text = (f"mesh {dict(m.shape)} on {m.size} {kind} device(s), {layout.num_workers} workers, "
          f"{layout.workers_per_device} per device-group, {layout.data_axis_size} device(s) per "
          f"worker; {jax.process_count()} process(es)")
  if layout.hierarchical:
    text += f"; {layout.num_clusters} cluster(s) of {layout.workers_per_cluster} workers"
  if layout.two_stage:
    text += f"; two-stage outer sync (outer state sharded over {layout.data_axis_size} devices)"
  if jax.process_count() > 1:
    w = local_workers(layout)
    held = f"workers {w.start}-{w.stop - 1}" if len(w) > 1 else f"worker {w.start}"
    text += f"; process {jax.process_index()} holds {held}"
  if layout.shard_outer:
    text += f"; outer state sharded over the {layout.outer_shards} worker devices"
  return text


def global_size(tree) -> int:
  """Number of elements in a pytree of arrays."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

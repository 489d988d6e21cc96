"""Device mesh `('worker', 'data')` and the shardings of the training state.

A *worker* is one replica of the model that trains on its own data between outer syncs. Workers
live on the mesh's `'worker'` axis (outermost, so that on a multi-slice TPU or a multi-node GPU job
it lands on the slow links); the devices of one worker form the `'data'` axis, over which gradients
are averaged every step.

Two layouts:
- `num_workers <= devices`: each worker gets `devices // num_workers` devices on `'data'`;
- `num_workers > devices`: each device holds `num_workers // devices` workers, vmapped (this is how
  8 workers train on one laptop CPU or one GPU; results equal the spread-out layout).

Logical shapes (sharding in brackets):
- per-worker state (params, inner optimizer state): [K, ...]          ('worker' on axis 0)
- global (outer) state, DDP state:                   [...]            (replicated)
- a step's batch:                                    [K, B / K, T + 1] ('worker', 'data', -)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

WORKER, DATA = "worker", "data"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where `num_workers` workers sit on the mesh."""

  mesh: Mesh
  num_workers: int

  @property
  def worker_axis_size(self) -> int:
    return self.mesh.shape[WORKER]

  @property
  def data_axis_size(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def workers_per_device(self) -> int:
    return self.num_workers // self.worker_axis_size

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
    return self.sharding(P(WORKER))

  @property
  def batch(self) -> NamedSharding:
    """Sharding of a [K, B / K, T + 1] batch."""
    return self.sharding(P(WORKER, DATA))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def make_layout(num_workers: int, num_devices: int | None = None,
                devices: list | None = None) -> Layout:
  """Builds the `('worker', 'data')` mesh for `num_workers` workers.

  `num_devices` limits the mesh to the first devices (None: all of `jax.devices()`). Works across
  processes: `jax.devices()` is the global list after `jax.distributed.initialize()`.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is not None and num_devices > 0:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are visible "
                       f"({devices[0].platform}).")
    devices = devices[:num_devices]
  n = len(devices)
  if num_workers < 1:
    raise ValueError(f"num_workers must be at least 1, got {num_workers}.")
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
  # Workers outermost: on multi-host systems consecutive devices share a host, so the 'data'
  # axis stays inside a host or slice and the 'worker' axis crosses the slow links.
  mesh = Mesh(np.asarray(devices, dtype=object).reshape(shape), (WORKER, DATA))
  return Layout(mesh=mesh, num_workers=num_workers)


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


def describe(layout: Layout) -> str:
  m = layout.mesh
  kind = m.devices.flat[0].platform
  return (f"mesh {dict(m.shape)} on {m.size} {kind} device(s), {layout.num_workers} workers, "
          f"{layout.workers_per_device} per device-group, {layout.data_axis_size} device(s) per "
          f"worker; {jax.process_count()} process(es)")


def global_size(tree) -> int:
  """Number of elements in a pytree of arrays."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

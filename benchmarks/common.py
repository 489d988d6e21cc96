"""What the benchmarks share: a local SGD or DDP run on a mesh, ready to time."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from lsgd_jax import local_sgd, mesh


@dataclasses.dataclass
class MeshRun:
  """`run(n, sync_every=None)`: n train steps from the current state (an outer sync every
  `sync_every` steps), waiting for the devices at the end. `state` holds the latest state."""

  step: Callable
  sync: Callable | None
  batch: jax.Array
  state: Any
  round: Callable | None = None  # scanned_round's program: H steps and the sync in one call
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


def mesh_run(layout: mesh.Layout, algorithm: str, init, loss, tx, outer, tokens) -> MeshRun:
  """`tokens` [K, B/K, T+1] on the layout's devices, a fresh state, the jitted step and sync."""
  state = local_sgd.init_state(layout, algorithm, init, tx,
                               outer if algorithm == "local_sgd" else None, jax.random.key(0))
  return MeshRun(step=local_sgd.make_train_step(layout, algorithm, loss, tx),
                 sync=(local_sgd.make_outer_sync(layout, outer) if algorithm == "local_sgd"
                       else None),
                 batch=mesh.put_global(tokens, layout.batch), state=state)


def scanned_round(run: MeshRun, sync_every: int) -> MeshRun:
  """The same run with each round (H inner steps, then the outer sync) one compiled program: a
  `lax.scan` over the steps, so the host dispatches once per round instead of once per step."""
  step, sync = run.step, run.sync

  def one_round(state, batches):
    state, _ = jax.lax.scan(lambda s, b: (step(s, b)[0], None), state, batches)
    return sync(state)[0]

  batches = jax.device_put(jax.numpy.broadcast_to(run.batch, (sync_every,) + run.batch.shape),
                           jax.sharding.NamedSharding(run.batch.sharding.mesh, jax.sharding.
                                                      PartitionSpec(None, *run.batch.sharding.spec)))
  return dataclasses.replace(run, round=jax.jit(one_round, donate_argnums=0), batches=batches)

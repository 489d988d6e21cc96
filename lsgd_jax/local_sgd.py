"""The algorithms: the per-replica training step, local SGD (inner step + outer sync) and DDP.

One code path (DESIGN.md section 3, STYLE.md habit 3 "wrap, don't fork"):

- `replica_step` is the ordinary training step of one model replica: gradients averaged over the
  devices that hold this replica, then the inner optimizer.
- Local SGD lifts it over the `'worker'` mesh axis: `vmap` over the workers a device holds, inside
  `jax.shard_map` with the worker axis mapped. Gradients are averaged over `'data'` only; nothing
  crosses `'worker'` during the H inner steps.
- The outer sync is its own jitted function, called every H steps: pseudo-gradient
  Delta = theta - mean_k theta_k (a collective mean over `'worker'`), theta <- OuterOpt(theta, Delta),
  every worker restarts from the new theta. Inner optimizer states stay with their workers.
- DDP is `replica_step` with gradients averaged over `('worker', 'data')`, one replicated model.

State layout (see mesh.py): per-worker leaves carry a leading axis of size K sharded over
`'worker'`; global leaves are replicated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from lsgd_jax.mesh import DATA, WORKER, Layout

PyTree = Any
LossFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, batch [B, T + 1]) -> scalar loss
ALGORITHMS = ("local_sgd", "ddp")


class TrainState(NamedTuple):
  """Everything that changes during training (a pytree; checkpointed whole).

  step:            number of inner steps taken (int32 scalar, replicated).
  params:          local SGD: the workers' parameters [K, ...]; DDP: the one replica [...].
  opt_state:       inner optimizer state, laid out like `params` (never averaged).
  outer_params:    local SGD: the global parameters theta (replicated); DDP: ().
  outer_opt_state: local SGD: the outer optimizer state, e.g. Nesterov momentum; DDP: ().
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  outer_params: PyTree
  outer_opt_state: PyTree


def replica_step(params: PyTree, opt_state: PyTree, batch: jax.Array, *, loss_fn: LossFn,
                 tx: optax.GradientTransformation, grad_axes: tuple[str, ...]):
  """One optimizer step of one replica; gradients are averaged over the mesh axes `grad_axes`.

  Under `shard_map` the parameters are invariant over `grad_axes` (every device of the replica
  holds the same copy), so differentiating the mean loss over those axes makes JAX all-reduce the
  gradient itself (the transpose of the implicit broadcast is a psum): one all-reduce of the
  gradients, no explicit `pmean` of them (which would reduce twice).
  """

  def replica_loss(p):
    local = loss_fn(p, batch)
    return lax.pmean(local, grad_axes) if grad_axes else local

  loss, grads = jax.value_and_grad(replica_loss)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def _nontrivial(layout: Layout, *axes: str) -> tuple[str, ...]:
  return tuple(a for a in axes if layout.mesh.shape[a] > 1)


def _check_algorithm(algorithm: str) -> None:
  if algorithm not in ALGORITHMS:
    raise ValueError(f"Unknown algorithm {algorithm!r}; allowed: {', '.join(ALGORITHMS)}.")


# ---------------------------------------------------------------------------------------------
# State creation (shape first: eval_shape -> shardings -> jit(init, out_shardings)).


def state_shardings(layout: Layout, state: TrainState) -> TrainState:
  """The NamedSharding of every leaf of a (possibly abstract) state."""
  per_worker = lambda tree: jax.tree.map(lambda _: layout.per_worker, tree)
  replicated = lambda tree: jax.tree.map(lambda _: layout.replicated, tree)
  stacked = state.outer_params != ()  # local SGD states carry outer parameters
  return TrainState(
      step=layout.replicated,
      params=per_worker(state.params) if stacked else replicated(state.params),
      opt_state=per_worker(state.opt_state) if stacked else replicated(state.opt_state),
      outer_params=replicated(state.outer_params),
      outer_opt_state=replicated(state.outer_opt_state))


def init_state(layout: Layout, algorithm: str, init_params: Callable[[jax.Array], PyTree],
               tx: optax.GradientTransformation,
               outer_tx: optax.GradientTransformation | None, rng: jax.Array) -> TrainState:
  """Creates the sharded training state directly on the mesh (no host copy of K replicas)."""
  _check_algorithm(algorithm)
  k = layout.num_workers

  def init(rng):
    params = init_params(rng)
    if algorithm == "ddp":
      return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), (), ())
    workers = jax.tree.map(lambda p: jnp.broadcast_to(p, (k,) + p.shape), params)
    return TrainState(jnp.zeros((), jnp.int32), workers, jax.vmap(tx.init)(workers), params,
                      outer_tx.init(params))

  abstract = jax.eval_shape(init, rng)
  return jax.jit(init, out_shardings=state_shardings(layout, abstract))(rng)


def global_params(state: TrainState) -> PyTree:
  """The model to evaluate or export: theta for local SGD, the one replica for DDP."""
  return state.outer_params if state.outer_params != () else state.params


# ---------------------------------------------------------------------------------------------
# Steps.


def make_train_step(layout: Layout, algorithm: str, loss_fn: LossFn,
                    tx: optax.GradientTransformation):
  """Jitted `step(state, batch [K, B/K, T+1]) -> (state, metrics)`; the state is donated.

  Metrics (left on device; the host reads them one step late): `worker_loss` [K] and
  `grad_norm` [K] for local SGD (one entry per worker, sharded over 'worker', so that the step has
  no collective over 'worker'); DDP returns the same keys with one entry.
  """
  _check_algorithm(algorithm)
  # Mesh axes of size 1 are left out of the specs and of the gradient mean: a collective over
  # them would still be compiled and run.
  data_spec = DATA if layout.data_axis_size > 1 else None
  worker_spec = WORKER if layout.worker_axis_size > 1 else None
  if algorithm == "local_sgd":
    step = functools.partial(replica_step, loss_fn=loss_fn, tx=tx,
                             grad_axes=_nontrivial(layout, DATA))

    def per_device(params, opt_state, batch):  # local: [K / |worker|, ...]
      return jax.vmap(step)(params, opt_state, batch)

    specs = (P(WORKER), P(WORKER), P(WORKER, data_spec))
    out_specs = (P(WORKER), P(WORKER), P(WORKER))
  else:
    step = functools.partial(replica_step, loss_fn=loss_fn, tx=tx,
                             grad_axes=_nontrivial(layout, WORKER, DATA))

    def per_device(params, opt_state, batch):  # local batch: [K / |worker|, b, T + 1]
      params, opt_state, m = step(params, opt_state, batch.reshape(-1, batch.shape[-1]))
      return params, opt_state, jax.tree.map(lambda x: x[None], m)

    specs = (P(), P(), P(worker_spec, data_spec))
    out_specs = (P(), P(), P())
  lifted = jax.shard_map(per_device, mesh=layout.mesh, in_specs=specs, out_specs=out_specs)

  def train_step(state: TrainState, batch: jax.Array):
    params, opt_state, m = lifted(state.params, state.opt_state, batch)
    state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"worker_loss": m["loss"], "grad_norm": m["grad_norm"]}
    # Steps skipped for non-finite gradients (inner optimizer wrapped in optax.apply_if_finite).
    skipped = optax.tree_utils.tree_get(opt_state, "total_notfinite", None)
    if skipped is not None:
      metrics["skipped_steps"] = skipped
    return state, metrics

  return jax.jit(train_step, donate_argnums=0)


def _sum_sq(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def make_outer_sync(layout: Layout, outer_tx: optax.GradientTransformation,
                    exact_cosine: bool = False, skip_nonfinite: bool = False):
  """Jitted `sync(state, weights [K] = ones) -> (state, diagnostics)`; the state is donated.

  The mean is weighted: mean = sum_k w_k theta_k / sum_k w_k over the workers with w_k > 0. All
  ones is plain local SGD; a failed or dropped worker has weight 0 (it is left out and rejoins
  from the new global parameters, like every worker); weights proportional to the inner steps done
  give the step-weighted mean of heterogeneous workers. With no contributing worker the outer
  update is skipped. With `skip_nonfinite`, a round whose pseudo-gradient is not finite (a
  diverged worker) is skipped too: theta and the outer state are kept and every worker restarts
  from theta.

  Cross-worker traffic: one all-reduce of the parameters plus a handful of scalars.
  `exact_cosine=True` adds a second parameter-sized all-reduce for the exact mean pairwise cosine
  of the workers' deltas d_k = theta - theta_k; by default `delta_cosine` is the weighted mean
  sum_{i != j} w_i w_j <d_i, d_j> / sum_{i != j} w_i w_j |d_i| |d_j|, which needs scalars only
  and equals the plain mean when the deltas have equal norms and weights.

  Diagnostics: `pseudo_grad_norm` |Delta|, `outer_update_norm` |theta_new - theta|,
  `delta_cosine`, `worker_delta_norm` (mean |d_k| over contributing workers),
  `contributing_workers`, `outer_skipped` (1.0 if the update was skipped).
  """

  def per_device(theta, outer_state, workers, weights):  # workers, weights: [K_local, ...]
    w = weights.astype(jnp.float32)
    member = w > 0
    bcast = lambda v, x: v.reshape((-1,) + (1,) * (x.ndim - 1))
    w_sum = lax.psum(jnp.sum(w), WORKER)
    mean = jax.tree.map(
        lambda x: lax.psum(jnp.sum(jnp.where(bcast(member, x), bcast(w, x) * x, 0), 0), WORKER)
        / w_sum, workers)
    delta = jax.tree.map(jnp.subtract, theta, mean)  # pseudo-gradient: positive means "go down"
    updates, new_state = outer_tx.update(delta, outer_state, theta)
    delta_sq = _sum_sq(delta)
    ok = w_sum > 0
    if skip_nonfinite:
      ok = ok & jnp.isfinite(delta_sq)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_theta = keep(optax.apply_updates(theta, updates), theta)
    new_state = keep(new_state, outer_state)

    deltas = jax.tree.map(lambda t, x: t[None] - x, theta, workers)
    sq = sum(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)))
             for d in jax.tree.leaves(deltas))  # [K_local] = |d_k|^2
    sq = jnp.where(member, sq, 0.0)
    norms = jnp.sqrt(sq)
    w_sq, w_norm, count = lax.psum((jnp.sum(w * w * sq), jnp.sum(w * norms),
                                    jnp.sum(member.astype(jnp.float32))), WORKER)
    if exact_cosine:
      unit = jax.tree.map(lambda d: jnp.where(bcast(member, d), d / bcast(
          jnp.maximum(norms, 1e-30), d), 0), deltas)
      u_sum = jax.tree.map(lambda u: lax.psum(jnp.sum(u, axis=0), WORKER), unit)
      pairs = count * (count - 1)
      cos = jnp.where(pairs > 0, (_sum_sq(u_sum) - count) / jnp.maximum(pairs, 1.0), 1.0)
    else:
      cross = w_sum * w_sum * delta_sq - w_sq        # sum_{i != j} w_i w_j <d_i, d_j>
      cross_norm = w_norm * w_norm - w_sq            # sum_{i != j} w_i w_j |d_i| |d_j|
      cos = jnp.where(cross_norm > 0, cross / jnp.where(cross_norm > 0, cross_norm, 1.0), 1.0)
    diag = {"pseudo_grad_norm": jnp.sqrt(delta_sq),
            "outer_update_norm": jnp.sqrt(jnp.where(ok, _sum_sq(updates), 0.0)),
            "delta_cosine": cos,
            "worker_delta_norm": lax.psum(jnp.sum(norms), WORKER) / jnp.maximum(count, 1.0),
            "contributing_workers": count,
            "outer_skipped": 1.0 - ok.astype(jnp.float32)}
    local_k = w.shape[0]
    new_workers = jax.tree.map(lambda t: jnp.broadcast_to(t, (local_k,) + t.shape), new_theta)
    return new_theta, new_state, new_workers, diag

  lifted = jax.shard_map(per_device, mesh=layout.mesh, in_specs=(P(), P(), P(WORKER), P(WORKER)),
                         out_specs=(P(), P(), P(WORKER), P()))

  def outer_sync(state: TrainState, weights: jax.Array | None = None):
    if weights is None:
      weights = jnp.ones((layout.num_workers,), jnp.float32)
    theta, outer_state, workers, diag = lifted(state.outer_params, state.outer_opt_state,
                                               state.params, weights)
    return state._replace(params=workers, outer_params=theta, outer_opt_state=outer_state), diag

  return jax.jit(outer_sync, donate_argnums=0)


def uniform_weights(layout: Layout) -> jax.Array:
  """All workers contribute equally: the weights of plain local SGD, on the mesh."""
  return jax.device_put(jnp.ones((layout.num_workers,), jnp.float32), layout.per_worker)


def make_eval_step(layout: Layout, loss_fn: LossFn):
  """Jitted `eval(params, batch [K, b, T + 1]) -> mean loss`, data-parallel over all devices."""

  def evaluate(params, batch):
    return loss_fn(params, batch.reshape(-1, batch.shape[-1]))

  return jax.jit(evaluate, in_shardings=(layout.replicated, layout.batch))

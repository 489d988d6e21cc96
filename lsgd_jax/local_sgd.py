"""The algorithms: the per-replica training step, local SGD (inner step + outer sync) and DDP.

One code path ("wrap, don't fork"):

- `replica_step` is the ordinary training step of one model replica: gradients averaged over the
  devices that hold this replica, then the inner optimizer.
- Local SGD lifts it over the `'worker'` mesh axis: `vmap` over the workers a device holds, inside
  `jax.shard_map` with the worker axis mapped. Gradients are averaged over `'data'` only; nothing
  crosses `'worker'` during the H inner steps.
- The outer sync is its own jitted function, called every H steps: pseudo-gradient
  Delta = theta - mean_k theta_k (a collective mean over `'worker'`), theta <- OuterOpt(theta, Delta),
  every worker restarts from the new theta. Inner optimizer states stay with their workers.
- DDP is `replica_step` with gradients averaged over `('worker', 'data')`, one replicated model.

- Two-stage (`Layout.two_stage`): the devices of a worker hold the same
  replica, so each averages only its 1/|data| slice over `'worker'`, updates the slice of theta and
  of the outer optimizer state it keeps (sharded over `'data'`), then all-gathers theta over
  `'data'`. Same result as the plain sync for elementwise outer optimizers.
- Sharded outer state (`Layout.shard_outer`, flat mesh, by default only with one worker per
  device): the same over `'worker'`: each device keeps 1/|worker| of theta and of the outer
  optimizer state; at a sync the devices exchange their workers' slices (an all-to-all: device j
  receives every worker's slice j), update the slice they keep, and all-gather theta. With one
  worker per device the bytes of one all-reduce; the same result as the replicated sync up to
  the order of the float additions of the mean.
- Hierarchical (mesh `('cluster', 'worker', 'data')`): `make_cluster_sync` is the outer sync
  inside every cluster (every H1 steps, per-cluster theta_c and optimizer); `make_outer_sync` is
  then the global step over the clusters' theta_c (every H2 steps, after a cluster sync).

State layout (see mesh.py): per-worker leaves carry a leading axis of size K sharded over
`Layout.worker_axes`; global leaves are replicated (two-stage / `shard_outer`: flattened, sharded
over 'data' / 'worker').
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from lsgd_jax.mesh import CLUSTER, DATA, WORKER, Layout

PyTree = Any
LossFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, batch [B, T + 1]) -> scalar loss
ALGORITHMS = ("local_sgd", "ddp")


class TrainState(NamedTuple):
  """Everything that changes during training (a pytree; checkpointed whole).

  step:              number of inner steps taken (int32 scalar, replicated).
  params:            local SGD: the workers' parameters [K, ...]; DDP: the one replica [...].
  opt_state:         inner optimizer state, laid out like `params` (never averaged).
  outer_params:      local SGD: the global parameters theta (replicated; two-stage: each leaf
                     flattened, zero-padded to a multiple of |data| and sharded over 'data';
                     `shard_outer`: the same over 'worker');
                     DDP: (). `global_params(state)` gives the model in its normal shapes.
  outer_opt_state:   local SGD: the outer optimizer state, e.g. Nesterov momentum, laid out like
                     `outer_params`; DDP: ().
  cluster_params:    hierarchical local SGD: each cluster's parameters theta_c [C, ...] (the
                     leaves of `outer_params` with a leading cluster axis, sharded over
                     'cluster'); otherwise ().
  cluster_opt_state: hierarchical: the cluster-level outer optimizer state [C, ...]; otherwise ().
  in_flight:         eager updates with overlap (lsgd_jax/streaming.py): each worker's own
                     eager point of the fragment in flight, laid out like `params`; otherwise ().
  residual:          quantized outer wire with error feedback: each worker's quantization
                     residual, laid out like `params`; otherwise ().
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  outer_params: PyTree
  outer_opt_state: PyTree
  cluster_params: PyTree = ()
  cluster_opt_state: PyTree = ()
  in_flight: PyTree = ()
  residual: PyTree = ()


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
  return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def _nontrivial(layout: Layout, *axes: str) -> tuple[str, ...]:
  return tuple(a for a in axes if layout.mesh.shape.get(a, 1) > 1)


def _check_algorithm(algorithm: str) -> None:
  if algorithm not in ALGORITHMS:
    raise ValueError(f"Unknown algorithm {algorithm!r}; allowed: {', '.join(ALGORITHMS)}.")


# ---------------------------------------------------------------------------------------------
# State creation (shape first: eval_shape -> shardings -> jit(init, out_shardings)).
#
# Two-stage layout of the global (outer) state (`Layout.two_stage`): every leaf is stored
# flattened and zero-padded to a multiple of |data| = D, sharded over 'data', so a device keeps
# 1/D of theta and of the outer optimizer state. The padding is zero in theta, in every worker's
# slice and hence in the pseudo-gradient; elementwise outer optimizers (SGD, Nesterov, averaging,
# Adam, Lion, ...) keep it zero and give exactly the plain result. An optimizer that needs global
# statistics of a leaf (e.g. a per-tensor norm, as in LAMB/LARS) would see only a slice and differ.


def _padded(n: int, d: int) -> int:
  return -(-n // d) * d


def to_outer_layout(layout: Layout, params: PyTree) -> PyTree:
  """Normal-shaped global parameters -> the stored outer layout (identity unless sharded)."""
  if layout.outer_axis is None:
    return params
  d = layout.outer_shards
  return jax.tree.map(
      lambda p: jnp.pad(jnp.ravel(p), (0, _padded(math.prod(p.shape), d) - math.prod(p.shape))),
      params)


def _unflatten(stored: PyTree, like: PyTree) -> PyTree:
  """Stored outer leaves -> the shapes of `like` (a tree of arrays or shapes of one replica)."""
  return jax.tree.map(lambda o, p: o[:math.prod(p.shape)].reshape(p.shape), stored, like)


def _outer_spec(layout: Layout, x) -> P:
  return P(layout.outer_axis) if layout.outer_axis and x.ndim == 1 else P()


def _cluster_spec(layout: Layout, x) -> P:
  return P(CLUSTER, DATA) if layout.two_stage and x.ndim == 2 else P(CLUSTER)


def state_shardings(layout: Layout, state: TrainState) -> TrainState:
  """The NamedSharding of every leaf of a (possibly abstract) state."""
  per_worker = lambda tree: jax.tree.map(lambda _: layout.per_worker, tree)
  replicated = lambda tree: jax.tree.map(lambda _: layout.replicated, tree)
  specs = lambda tree, fn: jax.tree.map(lambda x: layout.sharding(fn(layout, x)), tree)
  stacked = state.outer_params != ()  # local SGD states carry outer parameters
  return TrainState(
      step=layout.replicated,
      params=per_worker(state.params) if stacked else replicated(state.params),
      opt_state=per_worker(state.opt_state) if stacked else replicated(state.opt_state),
      outer_params=specs(state.outer_params, _outer_spec),
      outer_opt_state=specs(state.outer_opt_state, _outer_spec),
      cluster_params=specs(state.cluster_params, _cluster_spec),
      cluster_opt_state=specs(state.cluster_opt_state, _cluster_spec),
      in_flight=per_worker(state.in_flight), residual=per_worker(state.residual))


def init_state(layout: Layout, algorithm: str, init_params: Callable[[jax.Array], PyTree],
               tx: optax.GradientTransformation,
               outer_tx: optax.GradientTransformation | None, rng: jax.Array,
               cluster_tx: optax.GradientTransformation | None = None,
               streaming=None) -> TrainState:
  """Creates the sharded training state on the mesh: the model initialised once on the default
  device, then the K replicas and optimizer states made on the mesh (no host copy).

  A hierarchical layout needs `cluster_tx`, the optimizer of the in-cluster outer syncs.
  `streaming` (a `streaming.Streaming`, local SGD only): per-fragment outer optimizer states and
  the in-flight and residual buffers its variant needs.
  """
  _check_algorithm(algorithm)
  k = layout.num_workers
  if algorithm == "local_sgd" and layout.hierarchical and cluster_tx is None:
    raise ValueError("A hierarchical layout (num_clusters given) needs cluster_tx, the outer "
                     "optimizer of the in-cluster syncs.")

  def init(params):
    if algorithm == "ddp":
      return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), (), ())
    workers = jax.tree.map(lambda p: jnp.broadcast_to(p, (k,) + p.shape), params)
    outer = to_outer_layout(layout, params)
    state = TrainState(jnp.zeros((), jnp.int32), workers, jax.vmap(tx.init)(workers), outer,
                       outer_tx.init(outer))
    if streaming is not None and not streaming.plain:
      state = _streaming_state(state, outer_tx, streaming)
    if layout.hierarchical:
      c = layout.num_clusters
      clusters = jax.tree.map(lambda o: jnp.broadcast_to(o, (c,) + o.shape), outer)
      state = state._replace(cluster_params=clusters,
                             cluster_opt_state=jax.vmap(cluster_tx.init)(clusters))
    return state

  # The model's initialisation is its own program: it depends on the model alone, so one compile
  # (or one read of the persistent compilation cache) serves every layout and algorithm, and the
  # random draws, the slowest part to compile, are not compiled again into each state's program.
  params = jax.jit(init_params)(rng)
  abstract = jax.eval_shape(init, params)
  return jax.jit(init, out_shardings=state_shardings(layout, abstract))(params)


def _streaming_state(state: TrainState, outer_tx, cfg) -> TrainState:
  from lsgd_jax import streaming as streaming_lib  # pylint: disable=import-outside-toplevel
  sizes = [math.prod(x.shape[1:]) for x in jax.tree.leaves(state.params)]
  fragments = streaming_lib.partition(sizes, cfg.num_fragments)
  zeros = lambda: jax.tree.map(jnp.zeros_like, state.params)
  return state._replace(
      outer_opt_state=streaming_lib.init_outer_opt(outer_tx, state.outer_params, fragments),
      in_flight=zeros() if cfg.eager and cfg.overlap_steps else (),
      residual=zeros() if cfg.error_feedback else ())


def outer_state(layout: Layout, params: PyTree, outer_tx: optax.GradientTransformation):
  """(outer_params, outer_opt_state) for normal-shaped global `params`, laid out and sharded
  for `layout` (e.g. to build a TrainState by hand)."""

  def make(params):
    outer = to_outer_layout(layout, params)
    return outer, outer_tx.init(outer)

  abstract = jax.eval_shape(make, params)
  shard = jax.tree.map(lambda x: layout.sharding(_outer_spec(layout, x)), abstract)
  return jax.jit(make, out_shardings=shard)(params)


@functools.lru_cache(maxsize=None)
def _unflatten_fn(mesh, shapes: tuple[tuple[int, ...], ...]):
  def unflatten(leaves):
    return [o[:math.prod(sh)].reshape(sh) for o, sh in zip(leaves, shapes)]

  return jax.jit(unflatten, out_shardings=jax.sharding.NamedSharding(mesh, P()))


def global_params(state: TrainState) -> PyTree:
  """The model to evaluate or export: theta for local SGD (in its normal shapes; replicated if it
  was sharded), the one replica for DDP."""
  if state.outer_params == ():
    return state.params
  leaves, treedef = jax.tree.flatten(state.outer_params)
  shapes = tuple(tuple(w.shape[1:]) for w in jax.tree.leaves(state.params))
  if all(o.shape == sh for o, sh in zip(leaves, shapes)):
    return state.outer_params  # the plain layout: stored as it is
  return jax.tree.unflatten(treedef, _unflatten_fn(leaves[0].sharding.mesh, shapes)(leaves))


# ---------------------------------------------------------------------------------------------
# Steps.


def make_train_step(layout: Layout, algorithm: str, loss_fn: LossFn,
                    tx: optax.GradientTransformation, masked: bool = False):
  """Jitted `step(state, batch [K, B/K, T+1]) -> (state, metrics)`; the state is donated.

  Metrics (left on device; the host reads them one step late): `worker_loss` [K] and
  `grad_norm` [K] for local SGD (one entry per worker, sharded over 'worker', so that the step has
  no collective over 'worker'); DDP returns the same keys with one entry.

  `masked` (local SGD only): `step(state, batch, active [K])`; a worker whose `active` entry is 0
  keeps its parameters and optimizer state (a slow worker that takes no step now; its loss is
  still computed and reported), except the learning-rate schedule's step count, which follows the
  run's step so that every worker uses the same learning rate at the same time (Adam's bias
  correction still counts the worker's own steps).
  """
  _check_algorithm(algorithm)
  if masked and algorithm != "local_sgd":
    raise ValueError(f"A masked train step needs algorithm 'local_sgd', got {algorithm!r}.")
  # Mesh axes of size 1 are left out of the specs and of the gradient mean: a collective over
  # them would still be compiled and run.
  data_spec = DATA if layout.data_axis_size > 1 else None
  workers = P(layout.worker_axes)
  worker_spec = layout.worker_axes if layout.worker_axis_size > 1 else None
  if algorithm == "local_sgd":
    step = functools.partial(replica_step, loss_fn=loss_fn, tx=tx,
                             grad_axes=_nontrivial(layout, DATA))

    def per_device(params, opt_state, batch, active=None):  # local: [K / |worker|, ...]
      new_params, new_opt, m = jax.vmap(step)(params, opt_state, batch)
      if active is not None:
        keep = lambda new, old: jnp.where(
            active.reshape((-1,) + (1,) * (new.ndim - 1)) > 0, new, old)
        new_params = jax.tree.map(keep, new_params, params)
        new_opt = jax.tree.map(
            lambda new, old: new if _is_schedule(new) else jax.tree.map(keep, new, old),
            new_opt, opt_state, is_leaf=_is_schedule)
      return new_params, new_opt, m

    specs = (workers, workers, P(layout.worker_axes, data_spec)) + ((workers,) if masked else ())
    out_specs = (workers, workers, workers)
  else:
    step = functools.partial(replica_step, loss_fn=loss_fn, tx=tx,
                             grad_axes=_nontrivial(layout, CLUSTER, WORKER, DATA))

    def per_device(params, opt_state, batch):  # local batch: [K / |worker|, b, T + 1]
      params, opt_state, m = step(params, opt_state, batch.reshape(-1, batch.shape[-1]))
      return params, opt_state, jax.tree.map(lambda x: x[None], m)

    specs = (P(), P(), P(worker_spec, data_spec))
    out_specs = (P(), P(), P())
  lifted = jax.shard_map(per_device, mesh=layout.mesh, in_specs=specs, out_specs=out_specs)

  def train_step(state: TrainState, batch: jax.Array, *active):
    params, opt_state, m = lifted(state.params, state.opt_state, batch, *active)
    state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"worker_loss": m["loss"], "grad_norm": m["grad_norm"]}
    # Steps skipped for non-finite gradients (inner optimizer wrapped in optax.apply_if_finite).
    skipped = optax.tree_utils.tree_get(opt_state, "total_notfinite", None)
    if skipped is not None:
      metrics["skipped_steps"] = skipped
    return state, metrics

  return jax.jit(train_step, donate_argnums=0)


def _is_schedule(x) -> bool:
  return isinstance(x, optax.ScaleByScheduleState)


def _sum_sq(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def _outer_round(theta, outer_state, workers, weights, *, outer_tx, reduce_axes, shard_axes,
                 exact_cosine, skip_nonfinite, delta=None):
  """One outer update seen from one device (inside `shard_map`).

  theta, outer_state: this device's part of the global state (all of it, or its slice over
  `shard_axes`); workers: [K_local, *theta.shape] the same part of this device's replicas;
  weights: [K_local] (`shard_outer`: [K, m] and [K], every worker's slice after the all-to-all,
  with no `reduce_axes`). The weighted mean runs over `reduce_axes`; scalar statistics are summed over
  `shard_axes` (the slices of one vector), so every device sees whole-model norms. Returns
  (new theta part, new outer state part, diagnostics). `delta`, if given, is the weighted mean
  of the workers' pseudo-gradients as another wire computed it (streaming.py's quantized mean);
  by default it is theta - the weighted mean of `workers` over `reduce_axes`.
  """
  total = (lambda v: lax.psum(v, shard_axes)) if shard_axes else (lambda v: v)
  w = weights.astype(jnp.float32)
  member = w > 0
  bcast = lambda v, x: v.reshape((-1,) + (1,) * (x.ndim - 1))
  w_sum = lax.psum(jnp.sum(w), reduce_axes)
  any_member = w_sum > 0
  if delta is None:
    mean = jax.tree.map(
        lambda x: lax.psum(jnp.sum(jnp.where(bcast(member, x), bcast(w, x) * x, 0), 0),
                           reduce_axes) / jnp.where(any_member, w_sum, 1.0), workers)
    # pseudo-gradient: positive means "go down"; zero (not 0 / 0) when no worker contributes
    delta = jax.tree.map(lambda t, m: jnp.where(any_member, t - m, 0), theta, mean)
  else:
    delta = jax.tree.map(lambda d: jnp.where(any_member, d, 0), delta)
  updates, new_state = outer_tx.update(delta, outer_state, theta)
  delta_sq = total(_sum_sq(delta))
  ok = any_member
  if skip_nonfinite:
    ok = ok & jnp.isfinite(delta_sq)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_theta = keep(optax.apply_updates(theta, updates), theta)
  new_state = keep(new_state, outer_state)

  deltas = jax.tree.map(lambda t, x: t[None] - x, theta, workers)
  sq = total(sum(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)))
                 for d in jax.tree.leaves(deltas)))  # [K_local] = |d_k|^2
  sq = jnp.where(member, sq, 0.0)
  norms = jnp.sqrt(sq)
  w_sq, w_norm, count = lax.psum((jnp.sum(w * w * sq), jnp.sum(w * norms),
                                  jnp.sum(member.astype(jnp.float32))), reduce_axes)
  if exact_cosine:
    unit = jax.tree.map(lambda d: jnp.where(bcast(member, d), d / bcast(
        jnp.maximum(norms, 1e-30), d), 0), deltas)
    u_sum = jax.tree.map(lambda u: lax.psum(jnp.sum(u, axis=0), reduce_axes), unit)
    pairs = count * (count - 1)
    cos = jnp.where(pairs > 0, (total(_sum_sq(u_sum)) - count) / jnp.maximum(pairs, 1.0), 1.0)
  else:
    cross = w_sum * w_sum * delta_sq - w_sq        # sum_{i != j} w_i w_j <d_i, d_j>
    cross_norm = w_norm * w_norm - w_sq            # sum_{i != j} w_i w_j |d_i| |d_j|
    cos = jnp.where(cross_norm > 0, cross / jnp.where(cross_norm > 0, cross_norm, 1.0), 1.0)
  diag = {"pseudo_grad_norm": jnp.sqrt(delta_sq),
          "outer_update_norm": jnp.sqrt(jnp.where(ok, total(_sum_sq(updates)), 0.0)),
          "delta_cosine": cos,
          "worker_delta_norm": lax.psum(jnp.sum(norms), reduce_axes) / jnp.maximum(count, 1.0),
          "contributing_workers": count,
          "outer_skipped": 1.0 - ok.astype(jnp.float32)}
  return new_theta, new_state, diag


def _my_slice(layout: Layout, workers: PyTree, theta: PyTree) -> PyTree:
  """This device's slice of the replicas' flattened, zero-padded leaves. Two-stage: [K_local, m],
  the 1/|data| slice of its own replicas (every device of a worker holds the whole replica; no
  communication). `shard_outer`: [K, m], slice j of every worker, in the global worker order (an
  all-to-all over 'worker' per leaf: device i sends its workers' slice j to device j).

  One collective per leaf, not one for all leaves side by side: that compiled faster but its
  large buffers raised the trainer's peak memory on a CPU (docs/benchmarks.md)."""
  d = layout.outer_shards

  def take(x, t):
    m = t.shape[0]
    flat = x.reshape(x.shape[0], -1)
    flat = jnp.pad(flat, ((0, 0), (0, m * d - flat.shape[1])))
    if layout.shard_outer:  # [K_local, d, m] -> [d (sender), K_local, m] -> [K, m]
      return lax.all_to_all(flat.reshape(x.shape[0], d, m), WORKER, 1, 0).reshape(-1, m)
    return lax.dynamic_slice_in_dim(flat, lax.axis_index(DATA) * m, m, axis=1)

  return jax.tree.map(take, workers, theta)


def _whole(layout: Layout, theta: PyTree, like: PyTree) -> PyTree:
  """The replica-shaped parameters from this device's part of theta (sharded: an all-gather
  over the outer axis of the slices, then the padding cut off)."""
  if layout.outer_axis is None:
    return theta
  gathered = jax.tree.map(  # invariant over the axis: the same whole on every device
      lambda t: lax.all_gather(t, layout.outer_axis, tiled=True, to="invarying"), theta)
  return _unflatten(gathered, like)


def _sync_kwargs(layout, outer_tx, exact_cosine, skip_nonfinite, reduce_axes):
  # shard_outer: after the all-to-all every device holds all K workers' slices: no reduction
  # over 'worker' is left, only the scalar sums over the slices.
  return dict(outer_tx=outer_tx, reduce_axes=() if layout.shard_outer else reduce_axes,
              shard_axes=(layout.outer_axis,) if layout.outer_axis else (),
              exact_cosine=exact_cosine, skip_nonfinite=skip_nonfinite)


def make_outer_sync(layout: Layout, outer_tx: optax.GradientTransformation,
                    exact_cosine: bool = False, skip_nonfinite: bool = False):
  """Jitted `sync(state, weights = ones) -> (state, diagnostics)`; the state is donated.

  Flat layout, weights [K]: the mean is weighted: mean = sum_k w_k theta_k / sum_k w_k over the
  workers with w_k > 0. All ones is plain local SGD; a failed or dropped worker has weight 0 (it is
  left out and rejoins from the new global parameters, like every worker); weights proportional
  to the inner steps done give the step-weighted mean of heterogeneous workers. With no
  contributing worker the outer update is skipped. With `skip_nonfinite`, a round whose
  pseudo-gradient is not finite (a diverged worker) is skipped too: theta and the outer state are
  kept and every worker restarts from theta.

  Hierarchical layout, weights [C]: the global step over clusters. The clusters' parameters
  theta_c (as the last cluster sync left them: call the cluster sync first) play the workers:
  Delta = theta - mean_c theta_c, theta <- OuterOpt(theta, Delta), then every cluster and every
  worker restarts from theta (cluster optimizer states are kept).

  Plain layout: the parameters cross 'worker' once in one all-reduce. Two-stage layout
  (`Layout.two_stage`): each device averages only its 1/|data| slice over 'worker' (cross-worker
  bytes per device N / |data|), applies the outer optimizer to the slice it keeps, and all-gathers
  the new theta over 'data'. Sharded outer state (`Layout.shard_outer`): each device receives
  slice j of every worker in an all-to-all, updates the slice of theta it keeps and all-gathers
  theta over 'worker' (with one worker per device, the bytes of the plain all-reduce). Either way
  the diagnostics add a handful of scalars.
  `exact_cosine=True` adds a second parameter-sized (or slice-sized; with `shard_outer` only
  scalar sums, since every device already holds all workers' slices) all-reduce for the exact mean
  pairwise cosine of the workers' deltas d_k = theta - theta_k; by default `delta_cosine` is the
  weighted mean sum_{i != j} w_i w_j <d_i, d_j> / sum_{i != j} w_i w_j |d_i| |d_j|, which needs
  scalars only and equals the plain mean when the deltas have equal norms and weights.

  Diagnostics: `pseudo_grad_norm` |Delta|, `outer_update_norm` |theta_new - theta|,
  `delta_cosine`, `worker_delta_norm` (mean |d_k| over contributing workers),
  `contributing_workers`, `outer_skipped` (1.0 if the update was skipped).
  """
  if layout.hierarchical:
    return _make_global_sync(layout, outer_tx, exact_cosine, skip_nonfinite)
  kw = _sync_kwargs(layout, outer_tx, exact_cosine, skip_nonfinite, layout.worker_axes)

  def per_device(theta, outer_state, workers, weights):  # workers, weights: [K_local, ...]
    # (shard_outer: weights [K], every worker's)
    mine = _my_slice(layout, workers, theta) if layout.outer_axis else workers
    new_theta, new_state, diag = _outer_round(theta, outer_state, mine, weights, **kw)
    whole = _whole(layout, new_theta, jax.tree.map(lambda x: x[0], workers))
    local_k = jax.tree.leaves(workers)[0].shape[0]
    new_workers = jax.tree.map(lambda t: jnp.broadcast_to(t, (local_k,) + t.shape), whole)
    return new_theta, new_state, new_workers, diag

  def outer_sync(state: TrainState, weights: jax.Array | None = None):
    if weights is None:
      weights = jnp.ones((layout.num_workers,), jnp.float32)
    outer_specs = lambda tree: jax.tree.map(lambda x: _outer_spec(layout, x), tree)
    theta_specs, state_specs = outer_specs(state.outer_params), outer_specs(state.outer_opt_state)
    workers = P(layout.worker_axes)
    lifted = jax.shard_map(per_device, mesh=layout.mesh,
                           in_specs=(theta_specs, state_specs, workers,
                                     P() if layout.shard_outer else workers),
                           out_specs=(theta_specs, state_specs, workers, P()))
    theta, outer_state, params, diag = lifted(state.outer_params, state.outer_opt_state,
                                              state.params, weights)
    return state._replace(params=params, outer_params=theta, outer_opt_state=outer_state), diag

  return jax.jit(outer_sync, donate_argnums=0)


def _cluster_specs(layout, tree):
  return jax.tree.map(lambda x: _cluster_spec(layout, x), tree)


def make_cluster_sync(layout: Layout, cluster_tx: optax.GradientTransformation,
                      exact_cosine: bool = False, skip_nonfinite: bool = False):
  """Hierarchical local SGD: jitted `sync(state, weights [K] = ones) -> (state, diagnostics)`,
  the in-cluster outer step of every cluster at once (state donated).

  In cluster c: Delta_c = theta_c - mean_{k in c} theta_k (weighted as in `make_outer_sync`),
  theta_c <- ClusterOpt(theta_c, Delta_c), the cluster's workers restart from theta_c. Only the
  'worker' axis (inside a cluster) carries parameters; two-stage: a 1/|data| slice per device.
  Diagnostics: the keys of `make_outer_sync` prefixed `cluster_`, averaged over clusters
  (`cluster_contributing_workers` summed, `cluster_outer_skipped` the fraction skipped).
  """
  if not layout.hierarchical:
    raise ValueError("make_cluster_sync needs a hierarchical layout (make_layout(..., "
                     "num_clusters=C)).")
  kw = _sync_kwargs(layout, cluster_tx, exact_cosine, skip_nonfinite, (WORKER,))

  def per_device(theta_c, cluster_state, workers, weights):  # theta_c etc.: [1, ...] (my cluster)
    theta, cstate = jax.tree.map(lambda x: x[0], (theta_c, cluster_state))
    mine = _my_slice(layout, workers, theta) if layout.two_stage else workers
    new_theta, new_state, diag = _outer_round(theta, cstate, mine, weights, **kw)
    whole = _whole(layout, new_theta, jax.tree.map(lambda x: x[0], workers))
    local_k = weights.shape[0]
    new_workers = jax.tree.map(lambda t: jnp.broadcast_to(t, (local_k,) + t.shape), whole)
    new_theta, new_state, diag = jax.tree.map(lambda x: x[None], (new_theta, new_state, diag))
    return new_theta, new_state, new_workers, diag

  def cluster_sync(state: TrainState, weights: jax.Array | None = None):
    if weights is None:
      weights = jnp.ones((layout.num_workers,), jnp.float32)
    theta_specs = _cluster_specs(layout, state.cluster_params)
    state_specs = _cluster_specs(layout, state.cluster_opt_state)
    workers = P(layout.worker_axes)
    lifted = jax.shard_map(per_device, mesh=layout.mesh,
                           in_specs=(theta_specs, state_specs, workers, workers),
                           out_specs=(theta_specs, state_specs, workers, P(CLUSTER)))
    theta_c, cstate, params, diag = lifted(state.cluster_params, state.cluster_opt_state,
                                           state.params, weights)
    diag = {f"cluster_{k}": (jnp.sum(v) if k == "contributing_workers" else jnp.mean(v))
            for k, v in diag.items()}
    return state._replace(params=params, cluster_params=theta_c, cluster_opt_state=cstate), diag

  return jax.jit(cluster_sync, donate_argnums=0)


def _make_global_sync(layout, outer_tx, exact_cosine, skip_nonfinite):
  """The global step of hierarchical local SGD (see `make_outer_sync`): a mean over 'cluster' of
  the clusters' parameters; with two-stage each device reduces only its 1/|data| slice."""
  kw = _sync_kwargs(layout, outer_tx, exact_cosine, skip_nonfinite, (CLUSTER,))

  def per_device(theta, outer_state, theta_c, workers, weights):  # theta_c: [1, ...]; weights [1]
    new_theta, new_state, diag = _outer_round(theta, outer_state, theta_c, weights, **kw)
    new_c = jax.tree.map(lambda t: t[None], new_theta)
    whole = _whole(layout, new_theta, jax.tree.map(lambda x: x[0], workers))
    local_k = jax.tree.leaves(workers)[0].shape[0]
    new_workers = jax.tree.map(lambda t: jnp.broadcast_to(t, (local_k,) + t.shape), whole)
    return new_theta, new_state, new_c, new_workers, diag

  def global_sync(state: TrainState, weights: jax.Array | None = None):
    if weights is None:
      weights = jnp.ones((layout.num_clusters,), jnp.float32)
    outer_specs = lambda tree: jax.tree.map(lambda x: _outer_spec(layout, x), tree)
    theta_specs, state_specs = outer_specs(state.outer_params), outer_specs(state.outer_opt_state)
    c_specs = _cluster_specs(layout, state.cluster_params)
    workers = P(layout.worker_axes)
    lifted = jax.shard_map(
        per_device, mesh=layout.mesh,
        in_specs=(theta_specs, state_specs, c_specs, workers, P(CLUSTER)),
        out_specs=(theta_specs, state_specs, c_specs, workers, P()))
    theta, outer_state, theta_c, params, diag = lifted(
        state.outer_params, state.outer_opt_state, state.cluster_params, state.params, weights)
    return state._replace(params=params, outer_params=theta, outer_opt_state=outer_state,
                          cluster_params=theta_c), diag

  return jax.jit(global_sync, donate_argnums=0)


def uniform_weights(layout: Layout) -> jax.Array:
  """All workers contribute equally: the weights of plain local SGD, on the mesh."""
  return jax.device_put(jnp.ones((layout.num_workers,), jnp.float32), layout.per_worker)


def make_eval_step(layout: Layout, loss_fn: LossFn):
  """Jitted `eval(params, batch [K, b, T + 1]) -> mean loss`, data-parallel over all devices."""

  def evaluate(params, batch):
    return loss_fn(params, batch.reshape(-1, batch.shape[-1]))

  return jax.jit(evaluate, in_shardings=(layout.replicated, layout.batch))

"""Communication-efficient outer syncs (docs/streaming.md): streaming fragments with overlap,
eager updates and a quantized wire, on the code path of `local_sgd.make_outer_sync`.

- Fragments (`Streaming.num_fragments` = P): the parameter leaves are split into P groups of
  near-equal size (`partition`, largest leaf first into the lightest group). Fragment p is sent
  after n steps when n = offset_p (mod H), offset_p = (p + 1) H // P: staggered, one fragment every
  about H / P steps. Each fragment has its own outer optimizer state (P > 1: `outer_opt_state` is
  a tuple of P states, one per fragment's leaves). P = 1 is today's sync.
- Overlap (`overlap_steps` = tau): "send" at step n computes the fragment's worker mean (the
  collective) and applies the outer optimizer to the fragment of theta and its state at once (the
  server's view); "receive" at n + tau merges the new global fragment into every worker:
  theta_k <- alpha theta_k + (1 - alpha) theta (`merge_alpha`; 0 = overwrite). What is in flight
  is in `TrainState` (the new fragment of theta in `outer_params`, the eager points in
  `in_flight`), and the schedule is a function of the step, so a checkpoint taken mid-flight
  resumes exactly.
- Eager (Kale et al. 2025, arXiv 2502.12996): at the send every worker applies the outer step to
  its own pseudo-gradient (with the fragment's current outer state, not committed) and goes on
  from there; at the receive it swaps its own contribution for the global one:
  theta_k <- theta_k - eager_k + theta_new.
- Quantized wire (`outer_dtype`, `outer_block`): each worker's pseudo-gradient delta_k of a leaf
  (times its weight) is quantized (lsgd_jax/quantize.py), cut into R chunks (R = devices on the
  worker axis), and exchanged by an all-to-all, so each device holds every worker's codes for its
  1/R of the leaf; it dequantizes and sums them in float32, divides by the weight sum, quantizes
  its share of the mean again and all-gathers it. The collectives in the compiled program carry
  the small type (and float32 scales); `comm.py` counts their bytes. With `error_feedback`, each
  worker adds last round's quantization residual to its pseudo-gradient (kept in
  `TrainState.residual`, per worker).

Layouts: the flat layout supports everything; the two-stage layout supports fragments and overlap
in float32 (not eager, not a quantized wire); the hierarchical layout supports none of it. They
refuse with one line (`check_layout`).

Overlap on a device: the send is its own compiled program, run by the host after step n and
before step n + 1. Programs on one device run in order, so the collective runs serialised between
inner steps here, not concurrently with them; the steps while a fragment is in flight are the
plain inner step (no extra work). `clock.py` prices what a system that runs the collective in the
background would pay: max(0, fragment comm - tau x step time). docs/streaming.md shows the HLO.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from lsgd_jax import comm, local_sgd, quantize
from lsgd_jax.mesh import Layout

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Streaming:
  """The outer-sync variant (config keys of the same names in `local_sgd`)."""

  num_fragments: int = 1
  overlap_steps: int = 0
  merge_alpha: float = 0.0
  eager: bool = False
  outer_dtype: str = "float32"
  outer_block: int = 256
  error_feedback: bool = False

  @classmethod
  def of(cls, s) -> "Streaming":
    """From the config's `local_sgd` section."""
    return cls(s.num_fragments, s.overlap_steps, float(s.merge_alpha), bool(s.eager),
               s.outer_dtype, s.outer_block, bool(s.error_feedback))

  @property
  def plain(self) -> bool:
    """Today's outer sync (`local_sgd.make_outer_sync`)."""
    return (self.num_fragments == 1 and self.overlap_steps == 0 and not self.eager
            and self.outer_dtype == "float32" and not self.error_feedback)

  @property
  def quantized(self) -> bool:
    return self.outer_dtype != "float32"

  @property
  def block(self) -> int:
    """Elements per scale (0: one scale per tensor)."""
    return self.outer_block


def validate(s, num_leaves: Callable[[], int] | None = None) -> None:
  """One-line ValueErrors for bad values of the `local_sgd` section's streaming keys.

  `num_leaves` (called only when P > 1) counts the model's parameter leaves.
  """
  p, tau, h, alpha = s.num_fragments, s.overlap_steps, s.sync_every, s.merge_alpha
  if not (isinstance(p, int) and p >= 1):
    raise ValueError(f"local_sgd.num_fragments must be an integer >= 1, got {p!r}.")
  if p > h:
    raise ValueError(f"local_sgd.num_fragments={p} must be at most local_sgd.sync_every (H) = "
                     f"{h}: each fragment needs its own step of the round.")
  if not (isinstance(tau, int) and 0 <= tau < h // p):
    raise ValueError(f"local_sgd.overlap_steps (tau) = {tau!r} must be an integer in [0, H / P) "
                     f"= [0, {h // p}) (H = {h}, P = {p}): a fragment must land before the next "
                     "is sent.")
  if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
    raise ValueError(f"local_sgd.merge_alpha must be in [0, 1] (0: overwrite with the global "
                     f"fragment), got {alpha!r}.")
  if s.eager and alpha != 0:
    raise ValueError(f"local_sgd.eager swaps each worker's own update for the global one and "
                     f"does not mix; set local_sgd.merge_alpha = 0 (got {alpha}).")
  quantize.check_dtype(s.outer_dtype)
  b = s.outer_block
  if not (isinstance(b, int) and b >= 0 and (b % 2 == 0 or s.outer_dtype != "int4")):
    raise ValueError(f"local_sgd.outer_block must be an integer >= 0 (0: one scale per tensor; "
                     f"even for int4), got {b!r}.")
  if s.error_feedback and s.outer_dtype == "float32":
    raise ValueError("local_sgd.error_feedback needs a quantized local_sgd.outer_dtype "
                     f"({', '.join(quantize.OUTER_DTYPES[1:])}); float32 has no residual.")
  if p > 1 and num_leaves is not None and p > num_leaves():
    raise ValueError(f"local_sgd.num_fragments={p} is larger than the model's "
                     f"{num_leaves()} parameter leaves: every fragment needs at least one leaf.")


def check_layout(layout: Layout, cfg: Streaming) -> None:
  """Refuses, in one line, what a layout does not support (module docstring)."""
  if cfg.plain:
    return
  if layout.hierarchical:
    raise ValueError("Streaming fragments, overlap, eager updates and a quantized outer wire are "
                     "not supported in the hierarchical layout (num_clusters > 1); use the flat "
                     "layout.")
  if layout.shard_outer:
    raise ValueError("Streaming fragments, overlap, eager updates and a quantized outer wire keep "
                     "the outer state replicated or two-stage; set local_sgd.shard_outer=False "
                     "(make_layout(..., shard_outer=False)).")
  if layout.two_stage and (cfg.eager or cfg.quantized):
    raise ValueError("Eager updates and a quantized outer wire need the flat layout; set "
                     "local_sgd.two_stage=False (the two-stage layout supports fragments and "
                     "overlap in float32).")


# ---------------------------------------------------------------------------------------------
# Fragments and their schedule (pure Python: the same on every process and after a resume).


def partition(sizes: Sequence[int], p: int) -> tuple[tuple[int, ...], ...]:
  """Leaf indices of P fragments of near-equal total size: the largest leaf first into the
  lightest fragment (ties: lower index). Each fragment lists its leaves in tree order."""
  if not 1 <= p <= len(sizes):
    raise ValueError(f"num_fragments={p} must be in [1, {len(sizes)}] (the parameter leaves).")
  groups: list[list[int]] = [[] for _ in range(p)]
  load = [0] * p
  for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
    g = min(range(p), key=lambda j: (load[j], j))
    groups[g].append(i)
    load[g] += sizes[i]
  return tuple(tuple(sorted(g)) for g in groups)


def offsets(h: int, p: int) -> tuple[int, ...]:
  """Fragment p is sent after n steps when n = offsets[p] (mod H); offsets[P - 1] = H."""
  return tuple((i + 1) * h // p for i in range(p))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """What happens after each step: ("receive", p), then ("send", p) actions."""

  h: int
  p: int
  tau: int

  def _sent_at(self, n: int) -> int | None:
    """The fragment whose send point is n steps (n >= 1), if any."""
    for f, off in enumerate(offsets(self.h, self.p)):
      if n % self.h == off % self.h:
        return f
    return None

  def actions(self, step: int, last: bool) -> list[tuple[str, int]]:
    """Actions after `step` (0-based). With tau = 0 a send includes its receive. The last step
    lands what is in flight and sends every fragment with steps since its last send (received at
    once), so the run ends with one global model."""
    n, out = step + 1, []
    if self.tau and n - self.tau >= 1:
      f = self._sent_at(n - self.tau)
      if f is not None:
        out.append(("receive", f))
    if not last:
      f = self._sent_at(n)
      if f is not None:
        out.append(("send", f))
      return out
    for k in range(1, self.tau):  # sent in the last tau steps, not yet received
      f = self._sent_at(n - k) if n - k >= 1 else None
      if f is not None:
        out.append(("receive", f))
    out += [("sync", f) for f in range(self.p)]  # sent and received at once
    return out

  def fragments_in_flight(self, step: int) -> list[int]:
    """Fragments sent but not received after `step` (0-based) (for reports)."""
    n = step + 1
    return [f for k in range(self.tau) if n - k >= 1
            for f in [self._sent_at(n - k)] if f is not None]


# ---------------------------------------------------------------------------------------------
# State.


def leaf_sizes(params: PyTree) -> list[int]:
  """Elements of each leaf of one replica's parameters (tree order)."""
  return [math.prod(x.shape) for x in jax.tree.leaves(params)]


def init_outer_opt(outer_tx: optax.GradientTransformation, outer: PyTree,
                   fragments: tuple[tuple[int, ...], ...]):
  """The outer optimizer state: over the whole tree for P = 1 (today's layout), else a tuple of
  one state per fragment, over the list of its leaves."""
  if len(fragments) == 1:
    return outer_tx.init(outer)
  leaves = jax.tree.leaves(outer)
  return tuple(outer_tx.init([leaves[i] for i in f]) for f in fragments)


# ---------------------------------------------------------------------------------------------
# The quantized mean of the workers' pseudo-gradients.


def _wire_mean(delta: jax.Array, w: jax.Array, member: jax.Array, w_sum: jax.Array,
               resid: jax.Array | None, *, cfg: Streaming, axes: tuple[str, ...], r: int):
  """One leaf, inside shard_map. delta, resid: [K_local, *shape] (theta - theta_k and the error
  feedback residual); w, member: [K_local]. Returns (the weighted mean of the deltas as the wire
  carries it [*shape], the new residual or None)."""
  dtype, block = cfg.outer_dtype, cfg.block
  k_local, shape = delta.shape[0], delta.shape[1:]
  n = math.prod(shape)
  chunk_unit = quantize.unit(dtype, block)
  m = -(-n // (r * chunk_unit)) * r * chunk_unit  # padded: R chunks of whole blocks
  y = delta.reshape(k_local, n).astype(jnp.float32)
  if resid is not None:
    y = y + resid.reshape(k_local, n)
  wb = w.reshape(k_local, 1)
  x = jnp.where(member.reshape(k_local, 1), wb * y, 0.0)
  x = jnp.pad(x, ((0, 0), (0, m - n))).reshape(k_local, r, m // r)
  amax = None if block else jnp.max(jnp.abs(x), axis=(1, 2))[:, None]  # per tensor: [K_l, 1]
  codes, scales = quantize.quantize(x, dtype, block, amax)
  new_resid = None
  if resid is not None:  # what this worker's codes miss, carried to its next round
    sent = quantize.dequantize(codes, scales, dtype, block).reshape(k_local, m)[:, :n]
    lost = y - sent / jnp.where(member, w, 1.0).reshape(k_local, 1)
    new_resid = jnp.where(member.reshape(k_local, 1), lost, y).reshape(resid.shape)
  if r > 1:  # [K_l, R, c] -> [R, K_l, c]: row j holds device j's codes for my chunk
    swap = lambda a: lax.all_to_all(jnp.swapaxes(a, 0, 1), axes, 0, 0, tiled=False)
  else:
    swap = lambda a: jnp.swapaxes(a, 0, 1)
  codes = quantize.from_wire(swap(quantize.to_wire(codes, dtype)), dtype)
  scales = swap(scales) if scales is not None else None
  mine = quantize.dequantize(codes, scales, dtype, block)  # [R, K_l, c] float32
  share = jnp.sum(mine, axis=(0, 1)) / jnp.where(w_sum > 0, w_sum, 1.0)  # my chunk of the mean
  amax = None
  if not block:  # one scale for the whole mean: the largest over every device's chunk
    amax = jnp.max(jnp.abs(share))
    amax = lax.pmax(amax, axes) if r > 1 else amax
  codes, scales = quantize.quantize(share, dtype, block, amax)
  if r > 1:
    codes = quantize.from_wire(lax.all_gather(quantize.to_wire(codes, dtype), axes, tiled=True,
                                               to="invarying"), dtype)
    if scales is not None and block:
      scales = lax.all_gather(scales, axes, tiled=True, to="invarying")
  mean = quantize.dequantize(codes, scales, dtype, block)[:n].reshape(shape)
  return mean, new_resid


# ---------------------------------------------------------------------------------------------
# The programs of one fragment.


@dataclasses.dataclass(frozen=True)
class FragmentSync:
  """Jitted programs of one fragment (the state is donated):
  `send(state, weights) -> (state, diagnostics)` (with tau = 0 it also merges: a whole sync), and
  for tau > 0 `receive(state) -> state`."""

  fragment: int
  leaves: tuple[int, ...]
  send: Callable
  receive: Callable | None


def _merge(local: jax.Array, glob: jax.Array, alpha: float) -> jax.Array:
  """alpha theta_k + (1 - alpha) theta; alpha = 0 is the global value itself (also over NaN)."""
  if alpha == 0:
    return jnp.broadcast_to(glob, local.shape)
  return alpha * local + (1 - alpha) * glob


def make_fragment_sync(layout: Layout, outer_tx: optax.GradientTransformation, cfg: Streaming,
                       fragments: tuple[tuple[int, ...], ...], f: int, treedef,
                       exact_cosine: bool = False, skip_nonfinite: bool = False) -> FragmentSync:
  """The send (and receive) of fragment `f` of `fragments` (leaf indices into the tree
  `treedef` of the parameters). See the module docstring."""
  check_layout(layout, cfg)
  leaves_f, whole_tree = fragments[f], len(fragments) == 1
  axes = layout.worker_axes
  r = layout.worker_axis_size
  kw = local_sgd._sync_kwargs(layout, outer_tx, exact_cosine, skip_nonfinite, axes)
  alpha, tau = cfg.merge_alpha, cfg.overlap_steps
  pick = lambda tree: [jax.tree.leaves(tree)[i] for i in leaves_f]
  as_tree = (lambda xs: jax.tree.unflatten(treedef, xs)) if whole_tree else list

  def put(tree, new_leaves):
    leaves = list(jax.tree.leaves(tree))
    for i, x in zip(leaves_f, new_leaves):
      leaves[i] = x
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)

  def get_state(state):
    return state.outer_opt_state if whole_tree else state.outer_opt_state[f]

  def set_state(state, new):
    if whole_tree:
      return new
    return tuple(new if i == f else s for i, s in enumerate(state.outer_opt_state))

  def per_device_send(theta, ostate, workers, weights, in_flight, resid):
    # theta, workers, in_flight, resid: trees of this fragment (as_tree); workers [K_local, ...]
    mine = local_sgd._my_slice(layout, workers, theta) if layout.two_stage else workers
    delta, new_resid = None, resid
    if cfg.quantized:
      w = weights.astype(jnp.float32)
      member = w > 0
      w_sum = lax.psum(jnp.sum(w), axes)
      own = jax.tree.map(lambda t, x: t[None] - x, theta, mine)
      res_leaves = jax.tree.leaves(resid) if cfg.error_feedback else [None] * len(
          jax.tree.leaves(own))
      outs = [_wire_mean(d, w, member, w_sum, e, cfg=cfg, axes=axes, r=r)
              for d, e in zip(jax.tree.leaves(own), res_leaves)]
      tdef = jax.tree.structure(theta)
      delta = jax.tree.unflatten(tdef, [o[0] for o in outs])
      if cfg.error_feedback:
        new_resid = jax.tree.unflatten(tdef, [o[1] for o in outs])
    new_theta, new_state, diag = local_sgd._outer_round(theta, ostate, mine, weights, delta=delta,
                                                        **kw)
    like = jax.tree.map(lambda x: x[0], workers)
    whole = local_sgd._whole(layout, new_theta, like)
    if cfg.eager and tau:
      own = jax.tree.map(lambda t, x: t[None] - x, theta, mine)
      upd = jax.vmap(lambda d: outer_tx.update(d, ostate, theta)[0])(own)
      eager = jax.tree.map(lambda t, u: (t[None] + u).astype(t.dtype), theta, upd)
      return new_theta, new_state, eager, eager, new_resid, diag
    if tau:
      return new_theta, new_state, workers, in_flight, new_resid, diag
    merged = jax.tree.map(lambda x, t: _merge(x, t[None], alpha), workers, whole)
    return new_theta, new_state, merged, in_flight, new_resid, diag

  def specs(state):
    theta_specs = jax.tree.map(lambda x: local_sgd._outer_spec(layout, x),
                               as_tree(pick(state.outer_params)))
    state_specs = jax.tree.map(lambda x: local_sgd._outer_spec(layout, x), get_state(state))
    return theta_specs, state_specs

  workers_spec = P(layout.worker_axes)
  keep_in_flight = cfg.eager and tau > 0

  def send(state, weights=None):
    if weights is None:
      weights = jnp.ones((layout.num_workers,), jnp.float32)
    theta_specs, state_specs = specs(state)
    wf = as_tree(pick(state.params))
    fl = as_tree(pick(state.in_flight)) if keep_in_flight else ()
    rs = as_tree(pick(state.residual)) if cfg.error_feedback else ()
    lifted = jax.shard_map(
        per_device_send, mesh=layout.mesh,
        in_specs=(theta_specs, state_specs, workers_spec, workers_spec, workers_spec,
                  workers_spec),
        out_specs=(theta_specs, state_specs, workers_spec, workers_spec, workers_spec, P()))
    theta, ostate, workers, fl, rs, diag = lifted(as_tree(pick(state.outer_params)),
                                                  get_state(state), wf, weights, fl, rs)
    leaves = lambda t: jax.tree.leaves(t)
    state = state._replace(outer_params=put(state.outer_params, leaves(theta)),
                           outer_opt_state=set_state(state, ostate),
                           params=put(state.params, leaves(workers)))
    if keep_in_flight:
      state = state._replace(in_flight=put(state.in_flight, leaves(fl)))
    if cfg.error_feedback:
      state = state._replace(residual=put(state.residual, leaves(rs)))
    return state, diag

  def per_device_receive(theta, workers, in_flight):
    like = jax.tree.map(lambda x: x[0], workers)
    whole = local_sgd._whole(layout, theta, like)
    if keep_in_flight:  # swap the worker's own eager update for the global one
      return jax.tree.map(lambda x, e, t: x - e + t[None], workers, in_flight, whole)
    return jax.tree.map(lambda x, t: _merge(x, t[None], alpha), workers, whole)

  def receive(state):
    theta_specs, _ = specs(state)
    fl = as_tree(pick(state.in_flight)) if keep_in_flight else ()
    lifted = jax.shard_map(per_device_receive, mesh=layout.mesh,
                           in_specs=(theta_specs, workers_spec, workers_spec),
                           out_specs=workers_spec)
    workers = lifted(as_tree(pick(state.outer_params)), as_tree(pick(state.params)), fl)
    return state._replace(params=put(state.params, jax.tree.leaves(workers)))

  return FragmentSync(f, leaves_f, jax.jit(send, donate_argnums=0),
                      jax.jit(receive, donate_argnums=0) if tau else None)


def make_syncs(layout: Layout, outer_tx: optax.GradientTransformation, cfg: Streaming,
               params: PyTree, exact_cosine: bool = False,
               skip_nonfinite: bool = False) -> list[FragmentSync]:
  """The programs of every fragment; `params` are the workers' parameters [K, ...] (or their
  shapes)."""
  sizes = [math.prod(x.shape[1:]) for x in jax.tree.leaves(params)]
  fragments = partition(sizes, cfg.num_fragments)
  treedef = jax.tree.structure(params)
  return [make_fragment_sync(layout, outer_tx, cfg, fragments, f, treedef, exact_cosine,
                             skip_nonfinite) for f in range(cfg.num_fragments)]


@dataclasses.dataclass(frozen=True)
class Factory:
  """What `train.build` keeps in place of a jitted outer sync for a streaming run: the pieces
  `rounds.Programs` compiles into `Programs` once it has a state to lower with."""

  layout: Layout
  outer_tx: Any
  cfg: Streaming
  h: int
  exact_cosine: bool = False
  skip_nonfinite: bool = False

  def programs(self, state, weights) -> "Programs":
    return Programs(self.layout, self.outer_tx, self.cfg, self.h, state, weights,
                    self.exact_cosine, self.skip_nonfinite)


def make(layout: Layout, outer_tx, cfg: Streaming, h: int, exact_cosine: bool = False,
         skip_nonfinite: bool = False):
  """The outer sync of a run: `local_sgd.make_outer_sync` for today's sync (`cfg.plain`), else a
  `Factory` of the fragment programs."""
  if cfg.plain:
    return local_sgd.make_outer_sync(layout, outer_tx, exact_cosine, skip_nonfinite)
  check_layout(layout, cfg)
  return Factory(layout, outer_tx, cfg, h, exact_cosine, skip_nonfinite)


class Programs:
  """The compiled fragment programs of a run and the hook the loop calls after every step
  (`rounds.Programs.outer_syncs` delegates to `outer_syncs`)."""

  def __init__(self, layout: Layout, outer_tx, cfg: Streaming, h: int, state, weights,
               exact_cosine: bool = False, skip_nonfinite: bool = False):
    self.cfg, self.schedule = cfg, Schedule(h, cfg.num_fragments, cfg.overlap_steps)
    syncs = make_syncs(layout, outer_tx, cfg, state.params, exact_cosine, skip_nonfinite)
    self.fragments = tuple(s.leaves for s in syncs)
    stats = lambda fn: comm.CommStats.of(comm.collectives(fn, layout.mesh))
    self.send = [s.send.lower(state, weights).compile() for s in syncs]
    self.send_comm = [stats(fn) for fn in self.send]
    self.receive = [s.receive.lower(state).compile() if s.receive is not None else None
                    for s in syncs]
    if cfg.overlap_steps:  # a sync at the end lands at once: send, then receive
      self.sync = [_then(a, b) for a, b in zip(self.send, self.receive)]
    else:
      self.sync = self.send
    self.sync_comm = comm.CommStats(
        sum(c.payload_bytes for c in self.send_comm),
        float(sum(c.wire_bytes for c in self.send_comm)), {})  # all fragments: one full sync

  def outer_syncs(self, state, step: int, last: bool, weights: Callable[[int], Any]):
    """(state, diagnostics or None, number of fragments sent, bytes moved per device)."""
    diag, sent, moved = None, 0, 0.0
    for kind, f in self.schedule.actions(step, last):
      if kind == "receive":
        state = self.receive[f](state)
        continue
      fn = self.send[f] if kind == "send" else self.sync[f]
      state, d = fn(state, weights(step))
      diag = d if diag is None else diag
      sent += 1
      moved += self.send_comm[f].wire_bytes
    return state, diag, sent, moved


def _then(send, receive):
  def run(state, weights):
    state, diag = send(state, weights)
    return receive(state), diag
  return run

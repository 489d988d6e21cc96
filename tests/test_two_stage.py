"""Two-stage outer sync (lsgd_jax/local_sgd.py): same results as the plain sync, 1/|data| of the
cross-worker bytes and of the outer state per device, read from the compiled program and the
arrays' shards."""

import functools

import jax
import numpy as np
import pytest

from lsgd_jax import comm, local_sgd, mesh, model, optim

VOCAB, SEQ = 32, 16
CFG = model.model_config("cpu-micro", vocab_size=VOCAB, max_seq_len=SEQ)
LOSS = functools.partial(model.loss_fn, CFG)
INIT = functools.partial(model.init_params, CFG)
TX = optim.inner_optimizer("adamw", learning_rate=3e-3, total_steps=8, warmup_steps=1)


def _run(layout, outer, rounds=3, h=2, weights=None, exact_cosine=False):
  state = local_sgd.init_state(layout, "local_sgd", INIT, TX, outer, jax.random.key(0))
  step = local_sgd.make_train_step(layout, "local_sgd", LOSS, TX)
  sync = local_sgd.make_outer_sync(layout, outer, exact_cosine=exact_cosine)
  rng = np.random.default_rng(0)
  k = layout.num_workers
  diags = []
  for r in range(rounds):
    for _ in range(h):
      batch = rng.integers(0, VOCAB, (k, 2 * layout.data_axis_size, SEQ + 1)).astype(np.int32)
      state, _ = step(state, jax.device_put(batch, layout.batch))
    w = None if weights is None else jax.device_put(weights[r], layout.per_worker)
    state, diag = sync(state, w)
    diags.append(jax.device_get(diag))
  return state, diags


def _close(a, b, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.mark.xla_default
@pytest.mark.parametrize("workers,outer_name", [(4, "nesterov"), (2, "adam")])
def test_two_stage_equals_plain_sync(workers, outer_name):
  """4 workers x 2 data (Nesterov, a failed worker, exact cosine) and 2 x 4 (outer Adam)."""
  outer = optim.outer_optimizer(outer_name, 0.7 if outer_name == "nesterov" else 0.1, 0.9)
  weights = None
  if workers == 4:  # worker 2 fails in round 1; step-weighted in round 2
    weights = [np.ones(4, np.float32), np.array([1, 1, 0, 1], np.float32),
               np.array([1, 2, 3, 4], np.float32)]
  plain_layout = mesh.make_layout(workers, two_stage=False)
  staged_layout = mesh.make_layout(workers)  # "auto": two-stage, since |data| > 1
  assert staged_layout.two_stage and not plain_layout.two_stage
  assert staged_layout.data_axis_size == 8 // workers
  plain, d_plain = _run(plain_layout, outer, weights=weights, exact_cosine=workers == 4)
  staged, d_staged = _run(staged_layout, outer, weights=weights, exact_cosine=workers == 4)
  _close(local_sgd.global_params(staged), plain.outer_params)
  _close(staged.params, plain.params)
  _close(staged.opt_state, plain.opt_state)
  # The outer optimizer state, cut back to the parameter shapes, is the plain one.
  shapes = jax.tree.map(lambda x: x[0], plain.params)
  unflat = lambda tree: [leaf[:np.prod(s.shape)].reshape(s.shape)
                         for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shapes))]
  moments = (lambda st: [x for x in jax.tree.leaves(st) if x.ndim > 0])
  staged_m, plain_m = moments(staged.outer_opt_state), moments(plain.outer_opt_state)
  n = len(jax.tree.leaves(shapes))
  for i in range(0, len(plain_m), n):
    _close(unflat(staged_m[i:i + n]), plain_m[i:i + n])
  for a, b in zip(d_plain, d_staged):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
  if weights is not None:
    assert d_staged[1]["contributing_workers"] == 3
  # the model to evaluate comes back in its normal shapes, replicated
  g = local_sgd.global_params(staged)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(g))
  batch = np.random.default_rng(1).integers(0, VOCAB, (workers, 8 // workers, SEQ + 1))
  ev = local_sgd.make_eval_step(staged_layout, LOSS)
  np.testing.assert_allclose(float(ev(g, jax.device_put(batch.astype(np.int32),
                                                        staged_layout.batch))),
                             float(ev(plain.outer_params, jax.device_put(
                                 batch.astype(np.int32), plain_layout.batch))), rtol=1e-5)


def _shard_bytes(tree) -> int:
  """Bytes one device holds of the (vector) leaves of `tree`."""
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if x.ndim)


@pytest.mark.parametrize("workers", [4, 2])
def test_two_stage_moves_and_keeps_one_data_shard_per_device(workers):
  outer = optim.outer_optimizer("nesterov")
  d = 8 // workers
  measured = {}
  for two_stage in (False, True):
    layout = mesh.make_layout(workers, two_stage=two_stage)
    state = local_sgd.init_state(layout, "local_sgd", INIT, TX, outer, jax.random.key(0))
    n_bytes = 4 * mesh.global_size(jax.tree.map(lambda x: x[0], state.params))
    n_leaves = len(jax.tree.leaves(state.params))
    sync = local_sgd.make_outer_sync(layout, outer)
    stats = comm.CommStats.of(comm.collectives(sync.lower(state).compile(), layout.mesh))
    worker_bytes = stats.by_axis_payload["worker"]
    outer_bytes = _shard_bytes(state.outer_params) + _shard_bytes(state.outer_opt_state)
    measured[two_stage] = (worker_bytes, outer_bytes)
    pad = 4 * n_leaves * (d - 1)  # each leaf is zero-padded to a multiple of |data|
    scalars = 64 * d
    if two_stage:
      # cross-worker: N / |data| per device (plus padding and a few scalars)
      assert n_bytes / d <= worker_bytes <= (n_bytes + pad) / d + scalars
      # outer parameters + Nesterov momentum: 2 N / |data| per device
      assert 2 * n_bytes / d <= outer_bytes <= 2 * (n_bytes + pad) / d
      # the slices come back over 'data' in one all-gather of the parameters
      gathered = sum(c.payload_bytes for c in comm.collectives(sync.lower(state).compile(),
                                                                layout.mesh)
                     if c.op == "all-gather" and c.axes == {"data"})
      assert n_bytes <= gathered <= n_bytes + pad
    else:
      assert n_bytes <= worker_bytes <= n_bytes + scalars
      assert outer_bytes == 2 * n_bytes
  print(f"\n{workers} workers x {d} data, N = {n_bytes // 4:,} params: cross-worker bytes per "
        f"device plain {measured[False][0]:,} vs two-stage {measured[True][0]:,}; outer state "
        f"bytes per device plain {measured[False][1]:,} vs two-stage {measured[True][1]:,}")


def test_two_stage_layout_choice_and_errors():
  assert not mesh.make_layout(8).two_stage  # one device per worker: nothing to split
  assert mesh.make_layout(8, two_stage=True).two_stage  # allowed, and the same as plain
  assert not mesh.make_layout(2, two_stage=False).two_stage
  with pytest.raises(ValueError, match=r"two_stage must be 'auto', True or False, got 'yes'"):
    mesh.make_layout(2, two_stage="yes")


# --- The outer state sharded over 'worker' (Layout.shard_outer): flat mesh, one device per
# device group; the sync exchanges the workers' slices (all-to-all) and all-gathers theta.


@pytest.mark.parametrize("devices, outer_name", [(8, "nesterov"), (2, "nesterov")])
def test_sharded_outer_state_equals_replicated_sync(devices, outer_name):
  """8 workers on 8 devices (auto) and on 2 (4 per device, asked for explicitly): a failed worker and step-weighted rounds, the exact cosine; the same parameters, inner
  and outer states and diagnostics as the replicated outer state, up to float reassociation in
  the mean."""
  outer = optim.outer_optimizer(outer_name, 0.7 if outer_name == "nesterov" else 0.1, 0.9)
  weights = [np.ones(8, np.float32), np.array([1, 1, 0, 1, 1, 1, 1, 1], np.float32),
             np.arange(1, 9, dtype=np.float32)]
  plain_layout = mesh.make_layout(8, num_devices=devices)
  sharded_layout = mesh.make_layout(8, num_devices=devices,
                                    shard_outer="auto" if devices == 8 else True)
  assert sharded_layout.shard_outer and not plain_layout.shard_outer
  assert sharded_layout.outer_axis == "worker" and sharded_layout.outer_shards == devices
  plain, d_plain = _run(plain_layout, outer, weights=weights, exact_cosine=True)
  sharded, d_sharded = _run(sharded_layout, outer, weights=weights, exact_cosine=True)
  assert all(x.ndim == 1 and x.sharding.spec == jax.sharding.PartitionSpec("worker")
             for x in jax.tree.leaves(sharded.outer_params))
  # The mean adds the workers in another order (locally, not in the all-reduce). (Outer Adam,
  # which divides by the root of its second moment, turns a last-bit difference of a near-zero
  # pseudo-gradient element into a relative one of its update: up to 3.5e-4 after 3 rounds of
  # this test, so it is not compared here.)
  close = functools.partial(_close, atol=2e-6)
  close(local_sgd.global_params(sharded), plain.outer_params)
  close(sharded.params, plain.params)
  close(sharded.opt_state, plain.opt_state)
  # the outer optimizer's moments, cut back to the parameter shapes, are the replicated ones
  shapes = jax.tree.leaves(jax.tree.map(lambda x: x[0], plain.params))
  moments = lambda st: [x for x in jax.tree.leaves(st) if x.ndim > 0]
  mine, theirs = moments(sharded.outer_opt_state), moments(plain.outer_opt_state)
  assert len(mine) == len(theirs) >= len(shapes)
  for i, (a, b) in enumerate(zip(mine, theirs)):
    shape = shapes[i % len(shapes)].shape
    close(np.asarray(a)[:np.prod(shape)].reshape(shape), b)
  for a, b in zip(d_plain, d_sharded):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert d_sharded[1]["contributing_workers"] == 7


def test_sharded_outer_state_moves_an_allreduce_and_keeps_one_slice_per_device():
  outer = optim.outer_optimizer("nesterov")
  measured = {}
  for shard in (False, True):
    layout = mesh.make_layout(8, shard_outer=shard)
    state = local_sgd.init_state(layout, "local_sgd", INIT, TX, outer, jax.random.key(0))
    n_bytes = 4 * mesh.global_size(jax.tree.map(lambda x: x[0], state.params))
    pad = 4 * len(jax.tree.leaves(state.params)) * 7
    colls = comm.collectives(local_sgd.make_outer_sync(layout, outer).lower(state).compile(),
                             layout.mesh)
    wire = sum(c.wire_bytes for c in colls if "worker" in c.axes)
    outer_bytes = _shard_bytes(state.outer_params) + _shard_bytes(state.outer_opt_state)
    measured[shard] = wire
    if shard:  # an all-to-all of the workers' slices and an all-gather of theta
      assert {c.op for c in colls if c.payload_bytes > 1024} == {"all-to-all", "all-gather"}
      assert 2 * n_bytes / 8 <= outer_bytes <= 2 * (n_bytes + pad) / 8
    else:
      assert outer_bytes == 2 * n_bytes
  # the same bytes on the wire as the ring all-reduce (2 (R - 1) / R N), within the padding
  assert measured[True] == pytest.approx(measured[False], rel=0.01)
  # 4 workers per device (2 devices, asked for): the all-to-all carries all 4 workers' halves
  # (4 x N / 2) and the all-gather N / 2, 2.5x the all-reduce of the local sum (N): why "auto"
  # shards only with one worker per device
  wire = {}
  for shard in (False, True):
    layout = mesh.make_layout(8, num_devices=2, shard_outer=shard)
    state = local_sgd.init_state(layout, "local_sgd", INIT, TX, outer, jax.random.key(0))
    colls = comm.collectives(local_sgd.make_outer_sync(layout, outer).lower(state).compile(),
                             layout.mesh)
    wire[shard] = sum(c.wire_bytes for c in colls if "worker" in c.axes)
  assert wire[True] / wire[False] == pytest.approx(2.5, rel=0.02)


def test_shard_outer_choice_and_errors():
  assert mesh.make_layout(8, shard_outer="auto").shard_outer
  # 2 workers per device: the all-to-all would carry both workers' slices (2x the bytes of the
  # all-reduce that sums them first), so auto leaves it off; asked for, it is allowed
  assert not mesh.make_layout(16, shard_outer="auto").shard_outer
  assert mesh.make_layout(16, shard_outer=True).shard_outer
  assert not mesh.make_layout(4, shard_outer="auto").shard_outer  # two-stage over 'data'
  assert not mesh.make_layout(8, num_devices=1, shard_outer="auto").shard_outer  # one device
  assert not mesh.make_layout(8, num_clusters=2, shard_outer="auto").shard_outer
  assert not mesh.make_layout(8).shard_outer  # the library default: replicated
  with pytest.raises(ValueError, match=r"shard_outer=True .* needs a flat mesh.*'data': 2"):
    mesh.make_layout(4, shard_outer=True)
  with pytest.raises(ValueError, match=r"shard_outer must be 'auto', True or False, got 'yes'"):
    mesh.make_layout(8, shard_outer="yes")

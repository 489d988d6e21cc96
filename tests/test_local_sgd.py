"""The algorithms: equivalences, a hand-computed outer step, compiled communication, layouts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsgd_jax import comm, local_sgd, mesh, model, optim

VOCAB, SEQ = 32, 16
CFG = model.model_config("cpu-micro", vocab_size=VOCAB, max_seq_len=SEQ)
LOSS = functools.partial(model.loss_fn, CFG)
INIT = functools.partial(model.init_params, CFG)


def _batches(steps, k, b, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, (k, b, SEQ + 1)).astype(np.int32) for _ in range(steps)]


def _run(layout, algorithm, tx, outer_tx, batches, sync_every):
  state = local_sgd.init_state(layout, algorithm, INIT, tx, outer_tx, jax.random.key(0))
  step = local_sgd.make_train_step(layout, algorithm, LOSS, tx)
  sync = local_sgd.make_outer_sync(layout, outer_tx) if algorithm == "local_sgd" else None
  history = []
  for i, b in enumerate(batches):
    state, m = step(state, jax.device_put(b, layout.batch))
    if sync is not None and (i + 1) % sync_every == 0:
      state, _ = sync(state)
    history.append(np.asarray(m["worker_loss"]))
  return state, history


def _plain_loop(tx, batches):
  """A plain single-replica optax loop, no mesh: the reference."""
  params = INIT(jax.random.key(0))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(LOSS)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  history = []
  for b in batches:
    params, opt_state, loss = step(params, opt_state, b.reshape(-1, SEQ + 1))
    history.append(float(loss))
  return params, history


def _assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_one_worker_plain_averaging_equals_plain_training():
  tx = optim.inner_optimizer("adamw", learning_rate=3e-3, total_steps=12, warmup_steps=2)
  batches = _batches(12, 1, 4)
  layout = mesh.make_layout(1, num_devices=1)
  state, hist = _run(layout, "local_sgd", tx, optim.outer_optimizer("average"), batches, 4)
  ref_params, ref_hist = _plain_loop(tx, batches)
  np.testing.assert_allclose([h[0] for h in hist], ref_hist, rtol=1e-6)
  _assert_trees_close(state.outer_params, ref_params, atol=1e-6)
  _assert_trees_close(jax.tree.map(lambda x: x[0], state.params), ref_params, atol=1e-6)


def test_h1_sgd_plain_averaging_equals_ddp():
  tx = optim.inner_optimizer("sgd", learning_rate=0.5, total_steps=6, grad_clip_norm=None)
  batches = _batches(6, 8, 2)
  layout = mesh.make_layout(8)
  lsgd, _ = _run(layout, "local_sgd", tx, optim.outer_optimizer("average"), batches, 1)
  ddp, _ = _run(layout, "ddp", tx, None, batches, 1)
  _assert_trees_close(lsgd.outer_params, ddp.params, atol=2e-6)
  # and it moved: not a trivially equal pair of untrained models
  init = INIT(jax.random.key(0))
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(init), jax.tree.leaves(ddp.params))) > 1e-2


def test_golden_nesterov_outer_steps_by_hand():
  """Two parameters, two workers, three rounds of outer Nesterov (lr 0.7, momentum 0.9)."""
  layout = mesh.make_layout(2)
  outer = optim.outer_optimizer("nesterov", 0.7, 0.9)
  sync = local_sgd.make_outer_sync(layout, outer)
  theta = np.array([1.0, -2.0])
  state = local_sgd.TrainState(
      jnp.zeros((), jnp.int32), {"w": jnp.zeros((2, 2))}, (),
      *local_sgd.outer_state(layout, {"w": jnp.asarray(theta, jnp.float32)}, outer))
  # What the workers reach after their inner steps in each round (set by hand).
  moves = [([0.5, -1.5], [0.7, -2.5]), ([0.2, 0.0], [0.4, 0.4]), ([-1.0, 1.0], [1.0, 3.0])]
  m = np.zeros(2)
  for w0_delta, w1_delta in moves:
    w0, w1 = theta - np.array(w0_delta), theta - np.array(w1_delta)  # theta_k = theta - delta_k
    state = state._replace(params={"w": jax.device_put(np.stack([w0, w1]).astype(np.float32),
                                                       layout.per_worker)})
    state, diag = sync(state)
    # by hand: Delta = theta - mean_k theta_k; m = Delta + 0.9 m; theta -= 0.7 (Delta + 0.9 m)
    delta = theta - (w0 + w1) / 2
    m = delta + 0.9 * m
    update = -0.7 * (delta + 0.9 * m)
    theta = theta + update
    np.testing.assert_allclose(np.asarray(local_sgd.global_params(state)["w"]), theta,
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.params["w"]), [theta, theta], rtol=1e-6)
    d0, d1 = np.array(w0_delta), np.array(w1_delta)
    np.testing.assert_allclose(float(diag["pseudo_grad_norm"]), np.linalg.norm(delta), rtol=1e-5)
    np.testing.assert_allclose(float(diag["outer_update_norm"]), np.linalg.norm(update),
                               rtol=1e-5)
    cos = d0 @ d1 / (np.linalg.norm(d0) * np.linalg.norm(d1))  # with two workers: exact
    np.testing.assert_allclose(float(diag["delta_cosine"]), cos, rtol=1e-5, atol=1e-6)
  # round 1 by hand, as a check on the loop above: Delta = (0.6, 0), m = Delta,
  # update = -0.7 * 1.9 * 0.6 = -0.798 -> theta = (0.202, -2.0)


def test_exact_cosine_matches_numpy_for_unequal_norms():
  layout = mesh.make_layout(4)
  outer = optim.outer_optimizer("average")
  rng = np.random.default_rng(3)
  theta = rng.normal(size=5).astype(np.float32)
  deltas = rng.normal(size=(4, 5)) * np.array([[0.1], [1.0], [3.0], [10.0]])
  workers = (theta[None] - deltas).astype(np.float32)
  cos = [deltas[i] @ deltas[j] / np.linalg.norm(deltas[i]) / np.linalg.norm(deltas[j])
         for i in range(4) for j in range(4) if i != j]
  for exact in (True, False):
    state = local_sgd.TrainState(jnp.zeros((), jnp.int32),
                                 {"w": jax.device_put(workers, layout.per_worker)}, (),
                                 *local_sgd.outer_state(layout, {"w": jnp.asarray(theta)}, outer))
    _, diag = local_sgd.make_outer_sync(layout, outer, exact_cosine=exact)(state)
    if exact:
      np.testing.assert_allclose(float(diag["delta_cosine"]), np.mean(cos), rtol=1e-4)
    else:  # norm-weighted mean
      n = np.linalg.norm(deltas, axis=1)
      w = [n[i] * n[j] for i in range(4) for j in range(4) if i != j]
      np.testing.assert_allclose(float(diag["delta_cosine"]), np.average(cos, weights=w),
                                 rtol=1e-4)


@pytest.mark.parametrize("workers", [8, 4])
def test_compiled_inner_step_has_no_worker_collective(workers):
  layout = mesh.make_layout(workers)  # 4 workers: 2 devices each on 'data'
  tx = optim.inner_optimizer("adamw", learning_rate=1e-3, total_steps=10)
  outer = optim.outer_optimizer("nesterov")
  state = local_sgd.init_state(layout, "local_sgd", INIT, tx, outer, jax.random.key(0))
  batch = jax.device_put(_batches(1, workers, 16 // workers)[0], layout.batch)
  step = local_sgd.make_train_step(layout, "local_sgd", LOSS, tx)
  colls = comm.collectives(step.lower(state, batch).compile(), layout.mesh)
  assert all("worker" not in c.axes for c in colls)
  n_bytes = 4 * mesh.global_size(local_sgd.global_params(state))
  if layout.data_axis_size > 1:  # gradients are averaged over 'data' inside a worker
    grad_bytes = sum(c.payload_bytes for c in colls if c.op == "all-reduce")
    assert n_bytes <= grad_bytes <= n_bytes + 64
  else:
    assert colls == []
  sync = local_sgd.make_outer_sync(layout, outer)
  stats = comm.CommStats.of(comm.collectives(sync.lower(state).compile(), layout.mesh))
  # The parameters cross 'worker' once (two-stage: 1/|data| of them, the default for 4 workers);
  # the diagnostics add a few scalars. tests/test_two_stage.py checks the two-stage layout.
  shard = n_bytes / layout.data_axis_size
  assert shard <= stats.by_axis_payload["worker"] <= shard + 64 * layout.data_axis_size


def test_ddp_step_all_reduces_the_gradients_once():
  layout = mesh.make_layout(8)
  tx = optim.inner_optimizer("adamw", learning_rate=1e-3, total_steps=10)
  state = local_sgd.init_state(layout, "ddp", INIT, tx, None, jax.random.key(0))
  batch = jax.device_put(_batches(1, 8, 2)[0], layout.batch)
  step = local_sgd.make_train_step(layout, "ddp", LOSS, tx)
  stats = comm.measure(step, state, batch, mesh=layout.mesh)
  n_bytes = 4 * mesh.global_size(state.params)
  assert n_bytes <= stats.by_axis_payload["worker"] <= n_bytes + 64
  assert stats.wire_bytes == pytest.approx(2 * 7 / 8 * stats.payload_bytes)


def test_sharded_run_equals_vmapped_run_on_one_device():
  tx = optim.inner_optimizer("adamw", learning_rate=3e-3, total_steps=6, warmup_steps=1)
  outer = optim.outer_optimizer("nesterov")
  batches = _batches(6, 8, 2, seed=1)
  spread, h1 = _run(mesh.make_layout(8), "local_sgd", tx, outer, batches, 3)
  packed_layout = mesh.make_layout(8, num_devices=1)
  assert packed_layout.workers_per_device == 8
  packed, h2 = _run(packed_layout, "local_sgd", tx, outer, batches, 3)
  np.testing.assert_allclose(np.stack(h1), np.stack(h2), rtol=1e-5)
  _assert_trees_close(spread.outer_params, packed.outer_params, atol=1e-5)
  _assert_trees_close(spread.outer_opt_state, packed.outer_opt_state, atol=1e-5)


def test_layout_errors_name_the_value_and_the_choices():
  with pytest.raises(ValueError, match=r"num_workers=3 does not divide the device count 8.*"
                                       r"\[1, 2, 4, 8\]"):
    mesh.make_layout(3)
  with pytest.raises(ValueError, match=r"num_workers=12 is neither a divisor nor a multiple"):
    mesh.make_layout(12)
  with pytest.raises(ValueError, match=r"num_workers must be at least 1"):
    mesh.make_layout(0)
  with pytest.raises(ValueError, match=r"num_devices=16 but only 8 devices"):
    mesh.make_layout(2, num_devices=16)
  assert mesh.make_layout(16).workers_per_device == 2
  with pytest.raises(ValueError, match=r"Global batch size 12 is not divisible by num_workers x "
                                       r"data devices = 4 x 2 = 8"):
    mesh.check_batch(mesh.make_layout(4), 12)


def test_optimizer_errors():
  with pytest.raises(ValueError, match=r"Unknown inner optimizer 'lamb'"):
    optim.inner_optimizer("lamb", learning_rate=1e-3, total_steps=10)
  with pytest.raises(ValueError, match=r"Unknown outer optimizer 'nesterof'"):
    optim.outer_optimizer("nesterof")
  with pytest.raises(ValueError, match=r"optax.adam rejected its arguments"):
    optim.outer_optimizer("adam", 0.1, kwargs={"bogus": 1})
  with pytest.raises(ValueError, match=r"Outer momentum must be in \[0, 1\)"):
    optim.outer_optimizer("nesterov", 0.7, 1.5)
  assert isinstance(optim.outer_optimizer("adam", 0.1, kwargs={"b1": 0.5}),
                    optax.GradientTransformation)


def _hand_state(layout, outer, theta, workers):
  return local_sgd.TrainState(
      jnp.zeros((), jnp.int32), {"w": jax.device_put(np.asarray(workers, np.float32),
                                                     layout.per_worker)}, (),
      *local_sgd.outer_state(layout, {"w": jnp.asarray(theta, jnp.float32)}, outer))


def test_weighted_mean_leaves_out_failed_workers_and_they_rejoin():
  layout = mesh.make_layout(4)
  outer = optim.outer_optimizer("average")
  theta = np.array([0.0, 0.0])
  workers = np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, np.nan], [5.0, 0.0]])  # worker 2 failed
  sync = local_sgd.make_outer_sync(layout, outer)
  weights = jax.device_put(np.array([1.0, 1.0, 0.0, 2.0], np.float32), layout.per_worker)
  state, diag = sync(_hand_state(layout, outer, theta, workers), weights)
  expected = (workers[0] + workers[1] + 2 * workers[3]) / 4  # weighted mean of the survivors
  np.testing.assert_allclose(np.asarray(local_sgd.global_params(state)["w"]), expected,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.params["w"]), np.tile(expected, (4, 1)), rtol=1e-6)
  assert float(diag["contributing_workers"]) == 3 and float(diag["outer_skipped"]) == 0
  # Nobody contributes: the update is skipped, every worker restarts from theta.
  state, diag = sync(_hand_state(layout, outer, theta, workers),
                     jax.device_put(np.zeros(4, np.float32), layout.per_worker))
  np.testing.assert_array_equal(np.asarray(local_sgd.global_params(state)["w"]), theta)
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.zeros((4, 2)))
  assert float(diag["outer_skipped"]) == 1


def test_nonfinite_round_is_skipped_only_under_the_skip_policy():
  layout = mesh.make_layout(2)
  outer = optim.outer_optimizer("nesterov")
  theta = np.array([1.0, 1.0])
  workers = np.array([[0.5, 0.5], [np.inf, 0.0]])
  state, diag = local_sgd.make_outer_sync(layout, outer, skip_nonfinite=True)(
      _hand_state(layout, outer, theta, workers))
  np.testing.assert_array_equal(np.asarray(local_sgd.global_params(state)["w"]), theta)
  np.testing.assert_array_equal(np.asarray(state.outer_opt_state[0].trace["w"]), [0.0] * 4)
  np.testing.assert_array_equal(np.asarray(state.params["w"]), [theta, theta])
  assert float(diag["outer_skipped"]) == 1
  state, diag = local_sgd.make_outer_sync(layout, outer)(_hand_state(layout, outer, theta,
                                                                     workers))
  assert not np.all(np.isfinite(np.asarray(local_sgd.global_params(state)["w"])))  # "stop" policy: visible

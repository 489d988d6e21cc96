"""Hierarchical local SGD on the ('cluster', 'worker', 'data') mesh: flat local SGD is its
one-cluster (and one-worker-per-cluster) case, two-stage and packed layouts agree, the compiled
syncs cross only the axes they should, bad layouts fail clearly, and a run logs sim_time."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from lsgd_jax import comm, config as config_lib, local_sgd, mesh, model, optim, train

VOCAB, SEQ = 32, 16
CFG = model.model_config("cpu-micro", vocab_size=VOCAB, max_seq_len=SEQ)
LOSS = functools.partial(model.loss_fn, CFG)
INIT = functools.partial(model.init_params, CFG)
TX = optim.inner_optimizer("adamw", learning_rate=3e-3, total_steps=8, warmup_steps=1)
NESTEROV = optim.outer_optimizer("nesterov", 0.7, 0.9)
AVERAGE = optim.outer_optimizer("average")


def _batches(steps, k, b):
  rng = np.random.default_rng(0)
  return [rng.integers(0, VOCAB, (k, b, SEQ + 1)).astype(np.int32) for _ in range(steps)]


def _flat(layout, outer, h, batches):
  state = local_sgd.init_state(layout, "local_sgd", INIT, TX, outer, jax.random.key(0))
  step = local_sgd.make_train_step(layout, "local_sgd", LOSS, TX)
  sync = local_sgd.make_outer_sync(layout, outer)
  for i, b in enumerate(batches):
    state, _ = step(state, jax.device_put(b, layout.batch))
    if (i + 1) % h == 0:
      state, _ = sync(state)
  return state


def _hier(layout, outer, cluster_tx, h1, h2, batches):
  state = local_sgd.init_state(layout, "local_sgd", INIT, TX, outer, jax.random.key(0),
                               cluster_tx=cluster_tx)
  step = local_sgd.make_train_step(layout, "local_sgd", LOSS, TX)
  csync = local_sgd.make_cluster_sync(layout, cluster_tx)
  gsync = local_sgd.make_outer_sync(layout, outer)
  diags = []
  for i, b in enumerate(batches):
    state, _ = step(state, jax.device_put(b, layout.batch))
    if (i + 1) % h1 == 0:
      state, d = csync(state)
      diags.append(d)
    if (i + 1) % h2 == 0:
      state, d = gsync(state)
      diags.append(d)
  return state, jax.device_get(diags)


def _close(a, b, atol=3e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def test_one_cluster_equals_flat_local_sgd():
  """num_clusters=1: the cluster level is the flat outer sync every H1 (here Nesterov), the global
  level over one cluster with plain averaging changes nothing."""
  batches = _batches(8, 4, 2)
  flat = _flat(mesh.make_layout(4), NESTEROV, 2, batches)
  layout = mesh.make_layout(4, num_clusters=1)
  assert layout.mesh.axis_names == ("cluster", "worker", "data") and layout.two_stage
  hier, _ = _hier(layout, AVERAGE, NESTEROV, 2, 4, batches)
  _close(local_sgd.global_params(hier), local_sgd.global_params(flat))
  _close(hier.params, flat.params)


def test_one_worker_per_cluster_equals_flat_local_sgd():
  """C = K: averaging over a cluster of one worker is a no-op; the global level is flat local SGD
  with H = H2."""
  batches = _batches(8, 8, 1)
  flat = _flat(mesh.make_layout(8), NESTEROV, 4, batches)
  hier, _ = _hier(mesh.make_layout(8, num_clusters=8), NESTEROV, AVERAGE, 2, 4, batches)
  _close(local_sgd.global_params(hier), local_sgd.global_params(flat))
  _close(hier.params, flat.params)


def test_two_clusters_spread_two_stage_equals_packed():
  """2 clusters x 2 workers: (2, 2, 2) mesh with two-stage syncs = 2 devices, 2 workers each."""
  batches = _batches(6, 4, 2)  # ends with a cluster sync: the clusters differ
  spread_layout = mesh.make_layout(4, num_clusters=2)
  packed_layout = mesh.make_layout(4, num_devices=2, num_clusters=2)
  assert dict(spread_layout.mesh.shape) == {"cluster": 2, "worker": 2, "data": 2}
  assert packed_layout.workers_per_device == 2 and not packed_layout.two_stage
  spread, d1 = _hier(spread_layout, NESTEROV, NESTEROV, 2, 4, batches)
  packed, d2 = _hier(packed_layout, NESTEROV, NESTEROV, 2, 4, batches)
  _close(local_sgd.global_params(spread), local_sgd.global_params(packed), atol=1e-5)
  _close(spread.params, packed.params, atol=1e-5)
  for a, b in zip(d1, d2):
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert d1[0]["cluster_contributing_workers"] == 4 and d1[2]["contributing_workers"] == 2
  c = np.asarray(jax.tree.leaves(spread.cluster_params)[0])
  assert np.abs(c[0] - c[1]).max() > 1e-4  # the clusters moved apart since the global sync


def test_compiled_syncs_cross_only_their_axes():
  layout = mesh.make_layout(4, num_clusters=2)  # (2, 2, 2), two-stage
  state = local_sgd.init_state(layout, "local_sgd", INIT, TX, NESTEROV, jax.random.key(0),
                               cluster_tx=NESTEROV)
  n_bytes = 4 * mesh.global_size(local_sgd.global_params(state))
  csync = local_sgd.make_cluster_sync(layout, NESTEROV)
  gsync = local_sgd.make_outer_sync(layout, NESTEROV)
  cstats = comm.CommStats.of(comm.collectives(csync.lower(state).compile(), layout.mesh))
  gstats = comm.CommStats.of(comm.collectives(gsync.lower(state).compile(), layout.mesh))
  # in-cluster syncs never move parameters across clusters (only the diagnostics' mean over
  # clusters: a few scalars)
  assert cstats.by_axis_payload.get("cluster", 0) <= 64
  # each device averages its 1/|data| slice: N / 2 bytes (+ padding, scalars)
  assert n_bytes / 2 <= cstats.by_axis_payload["worker"] <= n_bytes / 2 + 2048
  assert "worker" not in gstats.by_axis_payload  # the clusters' parameters are already averaged
  assert n_bytes / 2 <= gstats.by_axis_payload["cluster"] <= n_bytes / 2 + 2048
  # per-cluster outer state sharded over 'cluster' and 'data': 2 N / |data| per device
  held = sum(x.addressable_shards[0].data.nbytes
             for x in jax.tree.leaves((state.cluster_params, state.cluster_opt_state)) if x.ndim)
  assert n_bytes <= held <= n_bytes + 2048
  print(f"\nN = {n_bytes // 4:,}: cluster sync {cstats.by_axis_payload['worker']:,} bytes over "
        f"'worker', global sync {gstats.by_axis_payload['cluster']:,} over 'cluster' per device")


def test_bad_hierarchies_are_rejected_clearly():
  with pytest.raises(ValueError, match=r"num_clusters=3 must divide num_workers=4"):
    mesh.make_layout(4, num_clusters=3)
  with pytest.raises(ValueError, match=r"clusters x workers x data = 4 x 4 x 1: num_clusters=4 "
                                       r"must divide the 2 device groups"):
    mesh.make_layout(16, num_devices=2, num_clusters=4)
  c = config_lib.base_config()
  c.local_sgd.num_clusters, c.local_sgd.sync_every, c.local_sgd.cluster_sync_every = 2, 10, 4
  with pytest.raises(ValueError, match=r"sync_every \(H2\) = 10 must be a multiple of "
                                       r"local_sgd.cluster_sync_every \(H1\) = 4"):
    config_lib.validate(c)
  c.local_sgd.cluster_sync_every, c.local_sgd.num_clusters = 5, 3
  with pytest.raises(ValueError, match=r"num_clusters=3 must divide local_sgd.num_workers=8"):
    config_lib.validate(c)
  c.local_sgd.num_clusters, c.clock.inter_link = 2, "carrier-pigeon"
  with pytest.raises(ValueError, match=r"Unknown link preset 'carrier-pigeon'"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match=r"needs cluster_tx"):
    local_sgd.init_state(mesh.make_layout(4, num_clusters=2), "local_sgd", INIT, TX, NESTEROV,
                         jax.random.key(0))


def test_hierarchical_run_logs_sim_time_and_cluster_syncs(tmp_path):
  c = config_lib.base_config()
  c.train.steps, c.train.global_batch, c.train.log_every = 8, 8, 2
  c.train.eval_every, c.train.eval_batches, c.train.eval_batch = 0, 1, 8
  c.data.seq_len, c.optim.warmup_steps = 16, 2
  c.local_sgd.num_workers, c.local_sgd.num_clusters = 4, 2
  c.local_sgd.cluster_sync_every, c.local_sgd.sync_every = 2, 4
  c.checkpoint.every_minutes = 0
  res = train.train_and_evaluate(c, str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  times = [r["sim_time"] for r in records if "sim_time" in r]
  assert len(times) == 4 and all(b > a > 0 for a, b in zip(times, times[1:]))
  assert res["sim_time"] == pytest.approx(times[-1])
  # steps 2 and 6 end with a cluster sync only, steps 4 and 8 with a global one too
  by_step = {r["step"]: r for r in records}
  assert "cluster_pseudo_grad_norm" in by_step[2] and "pseudo_grad_norm" not in by_step[2]
  assert "pseudo_grad_norm" in by_step[4] and "cluster_pseudo_grad_norm" in by_step[4]
  assert os.path.exists(tmp_path / "export")

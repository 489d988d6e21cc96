"""Edge scenarios: heterogeneous speeds (wait / budget), drop-outs, priced runs, memory verdicts,
the report binary, and their bad inputs."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from lsgd_jax import clock, edge, faults, local_sgd, mesh, model, optim, train
from lsgd_jax import rounds as rounds_lib
from conftest import small_config, xla_env
from lsgd_jax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("tokens_per_sec",)
SPEEDS = "1,1,0.5,0.25"


def _config(steps=20, **kw):
  kw = {"local_sgd__sync_every": 8, "clock__device": "phone", "clock__inter_link": "edge-uplink",
        **kw}
  return small_config(steps, **kw)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE} for l in f]


# --- speeds and the clock, by hand --------------------------------------------------------------


def test_parse_speeds_and_budget_steps():
  np.testing.assert_array_equal(faults.parse_speeds("", 3), [1, 1, 1])
  np.testing.assert_array_equal(faults.parse_speeds("1, 0.5,0.25", 3), [1, 0.5, 0.25])
  r = faults.parse_speeds("random:0.25", 8, seed=3)
  assert np.all((r >= 0.25) & (r <= 1)) and len(set(r)) == 8
  np.testing.assert_array_equal(r, faults.parse_speeds("random:0.25", 8, seed=3))  # repeatable
  assert not np.array_equal(r, faults.parse_speeds("random:0.25", 8, seed=4))
  # floor(H v / max v): 10, 5, 2.5 -> 2, 0.5 -> 0
  np.testing.assert_array_equal(faults.budget_steps(np.array([1, 0.5, 0.25, 0.05]), 10),
                                [10, 5, 2, 0])
  np.testing.assert_array_equal(faults.budget_steps(np.array([0.5, 0.25]), 8), [8, 4])


@pytest.mark.parametrize("spec, match", [
    ("1,1,0.5", r"gives 3 speeds for 4 workers"),
    ("1,1,0,1", r"every speed must be a finite number > 0"),
    ("1,1,fast,1", r"expected 4 comma-separated numbers"),
    ("random:0", r"'random:LO' needs 0 < LO <= 1"),
    ("random:x", r"'random:LO' needs 0 < LO <= 1"),
])
def test_bad_speeds_are_rejected(spec, match):
  with pytest.raises(ValueError, match=match):
    faults.parse_speeds(spec, 4)


def _run(algorithm="local_sgd", h=10):
  return clock.Run(algorithm, params=1e6, flops_per_token=6e6, tokens_per_step=1000.0, workers=4,
                   clusters=4, sync_every=h if algorithm != "ddp" else 1)


def test_clock_prices_stragglers_by_hand():
  net = clock.Network.for_device("phone")
  plain = clock.Clock(_run(), "phone", net)
  step_s = 1000 * 6e6 / (4e12 * 0.25)  # tokens x FLOPs per token / achieved FLOP/s = 6 ms
  assert plain.step_compute_s == pytest.approx(step_s)
  speeds = [1, 1, 0.5, 0.25]
  wait = clock.Clock(_run(), "phone", net, speeds=speeds)
  assert wait.step_compute_s == pytest.approx(step_s / 0.25)
  assert wait.busy == pytest.approx(np.mean([0.25, 0.25, 0.5, 1.0]))  # min v / v_k
  budget = clock.Clock(_run(), "phone", net, speeds=speeds, policy="budget")
  assert budget.step_compute_s == pytest.approx(step_s)  # the fastest worker sets the pace
  # H = 10: steps 10, 10, 5, 2 taking 10, 10, 10, 8 step_s of a 10 step_s round
  assert budget.busy == pytest.approx((10 + 10 + 10 + 8) / 40)
  ddp = clock.Clock(_run("ddp"), "phone", net, speeds=speeds, policy="budget")
  assert ddp.step_compute_s == pytest.approx(step_s / 0.25)  # DDP always waits
  for c in (plain, wait):
    for _ in range(10):
      c.step()
    c.sync()
  assert wait.seconds - plain.seconds == pytest.approx(10 * step_s * (4 - 1))
  assert wait.compute_seconds == pytest.approx(10 * step_s * 4 * wait.busy)


def test_clock_state_round_trips():
  net = clock.Network.for_device("phone")
  a = clock.Clock(_run(), "phone", net)
  a.step(7)
  a.sync()
  b = clock.Clock(_run(), "phone", net)
  b.load_state_dict(json.loads(json.dumps(a.state_dict())))
  assert b.metrics() == a.metrics() and b.steps == 7 and b.syncs == 1


def test_straggler_table_by_hand():
  (row,) = edge.straggler_table([0.5], workers=8, sync_every=50, step_s=1.0, sync_s=10.0)
  # wait: the round is 50 / 0.5 + 10 = 110 s; busy 7 x 50 + 100 s
  assert row["wait_round_s"] == pytest.approx(110)
  assert row["wait_utilisation"] == pytest.approx(450 / (8 * 110))
  # budget: 60 s rounds; the slow worker does 25 steps in 50 s
  assert row["budget_round_s"] == pytest.approx(60) and row["budget_slowest_steps"] == 25
  assert row["budget_utilisation"] == pytest.approx(400 / (8 * 60))


def test_cluster_table_h_is_the_smallest_that_reaches_the_target():
  rows = edge.cluster_table([1e9], [1.0, 10.0], target=0.9)
  for r in rows:
    h = int(np.ceil(r["h_needed"]))
    net = clock.Network.for_device("h100", clock.Link(r["inter_gbit"] * 1e9 / 8, 20e-3, "inter"))
    kw = dict(params=1e9, flops_per_token=6e9, tokens_per_step=16384, devices_per_worker=8,
              workers=4, clusters=4, layout="two_stage")
    assert clock.utilisation(clock.Run("local_sgd", sync_every=h, **kw), "h100", net) >= 0.9
    assert clock.utilisation(clock.Run("local_sgd", sync_every=h - 1, **kw), "h100", net) < 0.9
  assert rows[0]["h_needed"] > rows[1]["h_needed"]  # less bandwidth, longer rounds
  assert rows[0]["bandwidth_ratio"] == pytest.approx(450e9 / (1e9 / 8))


def test_memory_table_verdicts():
  rows = {r["size"]: r for r in edge.memory_table(["25M", "800M"], ["phone", "h100"],
                                                  seq_len=2048, tokens_per_step=2048)}
  assert rows["25M"]["phone"]["fits"] and rows["25M"]["h100"]["fits"]
  assert not rows["800M"]["phone"]["fits"] and rows["800M"]["h100"]["fits"]
  m = model.model_config("25M", 32_000)
  acts = clock.activation_bytes(m.num_layers, m.d_model, m.num_heads, 2048, 2048)
  assert rows["25M"]["phone"]["gb"] == pytest.approx((24 * model.total_params(m) + acts) / 1e9)


def test_curve_time_to_interpolates():
  cv = edge.Curve("x", np.array([0.0, 10.0, 20.0]), np.array([5.0, 4.0, 3.0]), {})
  assert cv.time_to(3.5) == pytest.approx(15.0)
  assert cv.time_to(5.0) == 0.0 and cv.time_to(2.0) == float("inf")


# --- the masked step and whole runs -------------------------------------------------------------


@pytest.mark.xla_default
@pytest.mark.parametrize("num_devices", [8, 2])  # 1 worker per device group; 2 per device
def test_masked_step_freezes_inactive_workers_exactly(num_devices):
  layout = mesh.make_layout(4, num_devices)
  cfg = model.model_config("cpu-micro", vocab_size=32, max_seq_len=16)
  loss = lambda p, b: model.loss_fn(cfg, p, b)
  tx = optim.inner_optimizer("adamw", learning_rate=1e-2, total_steps=10, warmup_steps=2)
  init = lambda rng: model.init_params(cfg, rng)
  state0 = lambda: local_sgd.init_state(layout, "local_sgd", init, tx,
                                        optim.outer_optimizer("nesterov"), jax.random.key(0))
  batch = mesh.put_global(np.random.default_rng(0).integers(0, 32, (4, 2, 9), np.int32),
                          layout.batch)
  plain = local_sgd.make_train_step(layout, "local_sgd", loss, tx)
  masked = local_sgd.make_train_step(layout, "local_sgd", loss, tx, masked=True)
  active = mesh.put_global(np.array([1, 0, 1, 0], np.float32), layout.per_worker)
  before = jax.device_get(state0())
  a, _ = plain(state0(), batch)
  b, _ = masked(state0(), batch, active)
  a, b = jax.device_get(a), jax.device_get(b)
  is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
  sched = lambda st: [x for x in jax.tree.leaves(st.opt_state, is_leaf=is_sched) if is_sched(x)]
  rest = lambda st: jax.tree.leaves(jax.tree.map(
      lambda x: None if is_sched(x) else x, st.opt_state, is_leaf=is_sched)) + jax.tree.leaves(
          st.params)
  leaves = list(zip(rest(before), rest(a), rest(b)))
  assert len(leaves) > 10
  for x0, xa, xb in leaves:
    np.testing.assert_array_equal(xb[[0, 2]], xa[[0, 2]])  # active: the plain step
    np.testing.assert_array_equal(xb[[1, 3]], x0[[1, 3]])  # inactive: untouched
  # ... except the learning-rate schedule's count, which follows the run for every worker
  (s0,), (sa,), (sb,) = sched(before), sched(a), sched(b)
  np.testing.assert_array_equal(sb.count, sa.count)
  np.testing.assert_array_equal(sb.count, s0.count + 1)
  with pytest.raises(ValueError, match=r"masked train step needs algorithm 'local_sgd'"):
    local_sgd.make_train_step(layout, "ddp", loss, tx, masked=True)


def test_rounds_spread_steps_and_weight_the_mean_by_steps_done():
  c = _config(edge__speeds=SPEEDS, edge__policy="budget")
  rounds = rounds_lib.Rounds(c, mesh.make_layout(4), 8)
  masks = np.array([np.asarray(jax.device_get(rounds.step_args(s)[0])) for s in range(20)])
  # speed 0.5 steps every second step, 0.25 every fourth: spread through the round
  np.testing.assert_array_equal(masks[:8, 2], [0, 1, 0, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(masks[:8, 3], [0, 0, 0, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(masks[:8].sum(0), [8, 8, 4, 2])
  np.testing.assert_array_equal(rounds.host_weights(7), [8, 8, 4, 2])
  np.testing.assert_array_equal(rounds.host_weights(15), [8, 8, 4, 2])
  # the last round has 4 steps (16..19): only the steps that time allowed
  np.testing.assert_array_equal(rounds.host_weights(19), [4, 4, 2, 1])
  np.testing.assert_array_equal(masks[16:].sum(0), [4, 4, 2, 1])
  # with failures too: a failed worker weighs 0 whatever it did
  failing = rounds_lib.Rounds(_config(edge__speeds=SPEEDS, edge__policy="budget",
                                 faults__fail_schedule="1:2"), mesh.make_layout(4), 8)
  np.testing.assert_array_equal(failing.host_weights(15), [8, 8, 0, 2])


def test_cluster_weights_sum_the_workers_of_each_cluster():
  layout = mesh.make_layout(4, num_clusters=2)
  ones = mesh.put_global(np.ones(2, np.float32),
                         layout.sharding(jax.sharding.PartitionSpec("cluster")))
  slow = rounds_lib.Rounds(_config(edge__speeds="1,1,0.1,0.1", edge__policy="budget"), layout, 2,
                      global_steps=4)
  # 2 cluster rounds of [2, 2, 0, 0] steps: cluster 0 did 8 steps, cluster 1 none
  np.testing.assert_array_equal(jax.device_get(slow.cluster_weights(3, ones)), [8, 0])
  plain = rounds_lib.Rounds(_config(), layout, 2, global_steps=4)
  assert plain.cluster_weights(3, ones) is ones


def test_worker_too_slow_to_step_equals_a_worker_failing_every_round(tmp_path):
  # Speed 0.1 with H = 8: floor(0.8) = 0 steps per round, weight 0 in every outer mean: the global
  # model is the one of a run where that worker fails every round.
  slow = train.train_and_evaluate(_config(edge__speeds="1,1,1,0.1", edge__policy="budget"),
                                  str(tmp_path / "slow"))
  failed = train.train_and_evaluate(
      _config(faults__fail_schedule="0:3,1:3,2:3"), str(tmp_path / "failed"))
  assert slow["eval_loss"] == pytest.approx(failed["eval_loss"], rel=1e-5)
  evals = lambda d: [r["eval_loss"] for r in _records(str(tmp_path / d)) if "eval_loss" in r]
  np.testing.assert_allclose(evals("slow"), evals("failed"), rtol=1e-5)


def test_budget_run_resumes_exactly_and_is_repeatable(tmp_path):
  c = _config(edge__speeds=SPEEDS, edge__policy="budget", checkpoint__every_steps=13)
  full = str(tmp_path / "full")
  res = train.train_and_evaluate(c, full)
  assert np.isfinite(res["eval_loss"]) and res["sim_time"] > 0
  cut = str(tmp_path / "cut")
  shutil.copytree(full, cut)
  os.remove(os.path.join(cut, "results.json"))
  shutil.rmtree(os.path.join(cut, "export"))
  for d in glob.glob(os.path.join(cut, "checkpoints", "*")):
    if os.path.basename(d).isdigit() and int(os.path.basename(d)) > 13:  # inside round 2
      shutil.rmtree(d)
  again = train.train_and_evaluate(c, cut)
  assert again["resumed_from"] == 13
  assert _records(cut) == _records(full)  # losses, sim_time and sim_utilisation included
  assert again["sim_time"] == res["sim_time"] and again["sim_comm_time"] == res["sim_comm_time"]


def test_runs_price_stragglers_uplinks_and_memory(tmp_path):
  # 20 steps, H = 8 as in the other tests of this file, so that the runs share their programs
  base = train.train_and_evaluate(_config(), str(tmp_path / "base"))
  wait = train.train_and_evaluate(_config(edge__speeds=SPEEDS), str(tmp_path / "wait"))
  assert base["eval_loss"] == wait["eval_loss"]  # waiting changes the clock, not the training
  s = train.build(_config())
  step_s = clock.compute_time(16 * 32 / 4 / 2, model.train_flops_per_token(s.model_cfg, 32),
                              "phone")
  assert wait["sim_time"] - base["sim_time"] == pytest.approx(20 * step_s * 3, rel=1e-6)
  slow = train.train_and_evaluate(_config(clock__inter_bandwidth=5.0), str(tmp_path / "slow"))
  # 3 outer syncs (steps 8, 16, 20); the ring moves 2 (4 - 1) / 4 of the 4-byte parameters per
  # device, 1/2 of them per device of a 2-device worker (two-stage)
  nbytes = 3 * 2 * 3 / 4 * 4 * model.total_params(s.model_cfg) / 2
  assert slow["sim_time"] - base["sim_time"] == pytest.approx(
      nbytes * (1 / (5e6 / 8) - 1 / (20e6 / 8)), rel=1e-6)
  budget = train.train_and_evaluate(_config(edge__speeds=SPEEDS, edge__policy="budget"),
                                    str(tmp_path / "budget"))
  # the fastest worker sets the pace; in a round of 8 steps, 8, 8, 4, 2 steps at speeds 1, 1,
  # 0.5, 0.25 keep all busy
  assert budget["sim_time"] == pytest.approx(base["sim_time"], rel=1e-9)
  assert budget["sim_utilisation"] == pytest.approx(base["sim_utilisation"], rel=1e-9)
  assert budget["eval_loss"] != base["eval_loss"]  # but slow workers trained less
  big = train.train_and_evaluate(_config(clock__model_size="800M",
                                         clock__tokens_per_step=16384), str(tmp_path / "big"))
  m = model.model_config("800M", 257)
  acts = clock.activation_bytes(m.num_layers, m.d_model, m.num_heads, 32, 16384)
  # 16 B / parameter (weights, grads, AdamW) + 8 B of outer state split over the worker's 2
  # devices by the two-stage sync + activations
  assert big["memory_gb"] == pytest.approx((20 * model.total_params(m) + acts) / 1e9)
  assert not big["memory_fits"]  # an 800M worker does not fit a phone's 8 GB
  assert base["memory_fits"]


@pytest.mark.parametrize("overrides, match", [
    ({"edge__speeds": "1,1"}, r"edge.speeds='1,1' gives 2 speeds for 4 workers"),
    ({"edge__policy": "fastest"}, r"Unknown edge.policy 'fastest'; allowed: wait, budget"),
    ({"clock__model_size": "7B"}, r"Unknown clock.model_size '7B'"),
    ({"clock__tokens_per_step": -1}, r"clock.tokens_per_step must be an integer >= 0"),
    ({"clock__inter_bandwidth": -5.0}, r"clock.inter_bandwidth must be a finite number"),
])
def test_bad_edge_settings_are_rejected(overrides, match):
  with pytest.raises(ValueError, match=match):
    train.build(_config(**overrides))


def test_unknown_scenario_is_rejected():
  with pytest.raises(ValueError, match=r"Unknown scenario 'lan'; allowed: ddp, local_sgd"):
    edge.scenario_config(base_config(), "lan")


def test_edge_binary_trains_scenarios_and_writes_the_report(tmp_path):
  env = xla_env()
  cmd = [sys.executable, "-m", "experiments.edge", "--config=configs/edge.py",
         f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path / 'report'}",
         "--scenarios=ddp,stragglers_budget", "--config.train.steps=10",
         "--config.local_sgd.sync_every=5", "--config.train.eval_every=5",
         "--config.optim.warmup_steps=2", "--config.model.size=cpu-micro"]
  res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  out = tmp_path / "report"
  for f in ("README.md", "scenarios.png", "multi_cluster.png", "stragglers.png", "summary.json"):
    assert (out / f).exists(), f
  summary = json.loads((out / "summary.json").read_text())
  rows = {r["scenario"]: r for r in summary["scenarios"]}
  assert set(rows) == {"ddp", "stragglers_budget"}
  # DDP all-reduces every step, local SGD every 5 steps
  assert rows["ddp"]["sim_hours"] > rows["stragglers_budget"]["sim_hours"] > 0
  assert "| stragglers_budget |" in (out / "README.md").read_text()
  # A bad --scenarios: test_unknown_scenario_is_rejected (the message) and test_bad_input.py (every
  # binary's one-line boundary).

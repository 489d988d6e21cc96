"""The network and device model against hand-computed cases (pure Python, fast)."""

import dataclasses
import math
import os

import pytest

from lsgd_jax import clock

N, B = 1_000_000, 4.0  # elements, bytes per element


def _net(w_worker=100e9, w_cluster=10e9, w_inter=1e9, lat=(0.0, 0.0, 0.0)):
  return clock.Network(clock.Link(w_worker, lat[0]), clock.Link(w_cluster, lat[1]),
                       clock.Link(w_inter, lat[2]))


def _run(algorithm="local_sgd", **kw):
  base = dict(params=N, flops_per_token=6 * N, tokens_per_step=4096, bytes_per_element=B)
  base.update(kw)
  return clock.Run(algorithm, **base)


def test_ring_allreduce_moves_2n_1_minus_1_over_r_and_time_with_latency():
  assert clock.ring_allreduce_bytes(N, 4) == pytest.approx(2 * N * (1 - 1 / 4))
  assert clock.ring_allreduce_bytes(N, 1) == 0
  # 4 nodes, 1000 bytes, 100 B/s, 0.5 s latency: 2*3*0.5 + 1500/100 = 3 + 15.
  assert clock.ring_allreduce_time(1000, 4, clock.Link(100.0, 0.5)) == pytest.approx(18.0)
  # Flat local SGD over 8 workers in one cluster: every device sends 2N(1 - 1/8) elements.
  net = _net(lat=(0, 1e-3, 0))
  comm = clock.sync_comm(_run(workers=8), net)
  assert comm.bytes == {"cluster": pytest.approx(2 * N * B * 7 / 8)}
  assert comm.time(net) == pytest.approx(14 * 1e-3 + 2 * N * B * 7 / 8 / 10e9)


def test_flat_ring_over_levels_is_as_slow_as_the_slowest_level():
  net = _net(lat=(1e-6, 1e-5, 1e-2))
  run = _run("ddp", devices_per_worker=4, workers=4, clusters=2)  # 16 devices
  comm = clock.step_comm(run, net)
  assert comm.bytes == {"inter": pytest.approx(2 * N * B * 15 / 16)}
  assert comm.latency == pytest.approx(30 * 1e-2)


def test_two_stage_moves_n_over_group_across_the_slow_level():
  lat = (1e-6, 1e-5, 1e-2)
  net = _net(lat=lat)
  run = _run(devices_per_worker=8, workers=4, clusters=4, layout="two_stage")
  comm = clock.sync_comm(run, net)
  # Slice of N/8 all-reduced over 4 clusters; identical copies: no reduce-scatter, one all-gather.
  assert comm.bytes["inter"] == pytest.approx(2 * (3 / 4) * N / 8 * B)
  assert comm.bytes["worker"] == pytest.approx(7 / 8 * N * B)
  assert comm.latency == pytest.approx(7 * lat[0] + 6 * lat[2])
  # Generic two-stage (gradients differ, so reduce-scatter too): 4 groups of 8 devices.
  fast, slow = clock.Link(100.0, 0.1), clock.Link(10.0, 1.0)
  hand = 2 * (7 * 0.1 + 7 / 8 * 800 / 100) + (2 * 3 * 1.0 + 2 * 3 / 4 * 100 / 10)
  assert clock.two_stage_allreduce_time(800, 8, fast, 4, slow) == pytest.approx(hand)
  flat = clock.sync_comm(_run(devices_per_worker=8, workers=4, clusters=4), net)
  assert flat.bytes["inter"] == pytest.approx(8 * comm.bytes["inter"])


CASES = [
    _run("ddp", devices_per_worker=8, workers=4, clusters=2),
    _run("ddp", devices_per_worker=8, workers=4, clusters=2, layout="two_stage"),
    _run(sync_every=50, devices_per_worker=8, workers=4, clusters=2),
    _run(sync_every=50, devices_per_worker=8, workers=4, clusters=2, layout="two_stage"),
    _run("hierarchical", sync_every=10, global_sync_every=100, devices_per_worker=2, workers=8,
         clusters=2, layout="two_stage"),
]


@pytest.mark.parametrize("run", CASES)
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_bandwidth_needed_inverts_utilisation(run, target):
  run = _replace(run, tokens_per_step=1e6)  # 15 ms of compute per step on an H100
  net = _net(w_worker=1e13, lat=(1e-8, 1e-7, 1e-6))
  dev = "h100"
  w = clock.bandwidth_needed(target, run, dev, net)
  assert math.isfinite(w) and w > 0
  assert clock.utilisation(run, dev, net.with_bandwidth("inter", w)) == pytest.approx(target)
  w_ov = clock.bandwidth_needed(target, run, dev, net, overlap=True)
  assert w_ov <= w * (1 + 1e-9)
  u = clock.utilisation(run, dev, net.with_bandwidth("inter", w_ov), overlap=True)
  assert u == pytest.approx(target, rel=1e-6)


def test_bandwidth_needed_closed_form_and_unreachable():
  net, dev = _net(lat=(0, 0, 0.5)), "h100"
  run = _run(sync_every=100, workers=8, clusters=8, tokens_per_step=1e8)
  t_c = clock.compute_time(1e8, 6 * N, dev)
  x = 2 * N * B * 7 / 8
  # u = T_c / (T_c + (14 * 0.5 + x / W) / H)  =>  W = x / (H T_c (1/u - 1) - 7).
  want = x / (100 * t_c * (1 / 0.5 - 1) - 7.0)
  assert clock.bandwidth_needed(0.5, run, dev, net) == pytest.approx(want)
  # DDP pays 7 s of latency every step: no bandwidth reaches 50%.
  ddp = _run("ddp", workers=8, clusters=8, tokens_per_step=1e8)
  assert clock.bandwidth_needed(0.5, ddp, dev, net) == math.inf


def test_sync_every_needed_inverts_utilisation():
  net, dev = _net(lat=(1e-8, 1e-7, 1e-4)), "h100"
  for run in CASES[2:]:
    run = _replace(run, tokens_per_step=1e6)
    for target in (0.5, 0.9, 0.99):
      h = clock.sync_every_needed(target, run, dev, net)
      if run.algorithm == "local_sgd":
        h_int = math.ceil(h)
        up = clock.utilisation(_replace(run, sync_every=h_int), dev, net)
        assert up >= target
        if h_int > 1:
          assert clock.utilisation(_replace(run, sync_every=h_int - 1), dev, net) < target
      else:  # H2, a multiple of H1 = 10
        h2 = 10 * math.ceil(h / 10)
        assert clock.utilisation(_replace(run, global_sync_every=h2), dev, net) >= target
        if h2 > 10:
          assert clock.utilisation(_replace(run, global_sync_every=h2 - 10), dev, net) < target
  with pytest.raises(ValueError, match="algorithm"):
    clock.sync_every_needed(0.9, CASES[0], dev, net)


def _replace(run, **kw):
  return dataclasses.replace(run, **kw)


def test_diloco_condition_h_equals_w0_over_w1():
  # Inner all-reduce over R0 devices on W0 every step; outer over R1 workers on W1 every H steps.
  w0, w1 = 400e9, 2e9
  net = _net(w_worker=w0, w_inter=w1)
  run = _run(devices_per_worker=8, workers=8, clusters=8)
  h = clock.sync_every_for_comm_share(run, net)
  assert h == pytest.approx(w0 / w1)  # equal (1 - 1/R) factors, no latency
  run_h = _replace(run, sync_every=round(h))
  outer = clock.sync_comm(run_h, net).time(net) / round(h)
  assert outer == pytest.approx(clock.step_comm(run_h, net).time(net))  # exactly half
  # R0 = 8, R1 = 2: H = (W0 / W1) * (2 (1/2) N) / (2 (7/8) N).
  run2 = _run(devices_per_worker=8, workers=2, clusters=2)
  assert clock.sync_every_for_comm_share(run2, net) == pytest.approx(w0 / w1 * 0.5 / 0.875)
  # Outer syncs at most a quarter of communication: H three times as large.
  assert clock.sync_every_for_comm_share(run, net, 0.25) == pytest.approx(3 * w0 / w1)


def test_clock_matches_simulate_and_sim_times():
  net, dev = _net(lat=(1e-6, 1e-5, 1e-2)), "h100"
  run = _run("hierarchical", sync_every=5, global_sync_every=20, devices_per_worker=2, workers=4,
             clusters=2)
  c = clock.Clock(run, dev, net)
  for s in range(1, 51):
    c.step()
    if s % 20 == 0:
      c.sync()
    elif s % 5 == 0:
      c.sync("cluster")
  t = clock.simulate(run, dev, net, steps=50)
  assert c.seconds == pytest.approx(t.total_s)
  assert c.comm_seconds == pytest.approx(t.comm_s)
  assert c.syncs == t.syncs == 2 + 8
  assert c.metrics()["sim_utilisation"] == pytest.approx(t.utilisation)
  times = clock.sim_times([(10, 0), (20, 1), (50, 2)], run, dev, net)
  assert times[-1] == pytest.approx(c.seconds)
  # No overlap: wall clock = compute + communication.
  assert t.total_s == pytest.approx(t.compute_s + t.comm_s)


def test_overlap_hides_communication_behind_compute():
  net, dev = _net(), "h100"
  run = _run(sync_every=100, workers=2, clusters=2, tokens_per_step=1e6)
  t = clock.simulate(run, dev, net, overlap=True)
  assert t.comm_s < t.compute_s and t.utilisation == pytest.approx(1.0)
  assert clock.simulate(run, dev, net).utilisation < 1.0


def test_heterogeneous_speeds_wait_and_budget():
  r = clock.heterogeneous_round([1.0, 0.5, 2.0], 10, 1.0, sync_s=3.0, policy="wait")
  assert r.seconds == pytest.approx(23.0)  # slowest: 10 / 0.5 + 3
  assert r.steps == (10, 10, 10) and r.busy == pytest.approx((10.0, 20.0, 5.0))
  assert r.utilisation == pytest.approx(35 / (3 * 23))
  r = clock.heterogeneous_round([1.0, 0.5, 2.0], 10, 1.0, sync_s=3.0, policy="budget")
  assert r.seconds == pytest.approx(13.0) and r.steps == (10, 5, 20)
  r = clock.heterogeneous_round([1.0, 0.3], 10, 1.0, policy="budget", budget_s=7.0)
  assert r.steps == (7, 2)


def test_memory_check_verdicts():
  ok = clock.memory_check(1e9, "h100", activations=10e9)
  assert ok.breakdown == {"params": 4e9, "grads": 4e9, "optimizer": 8e9, "outer": 8e9,
                          "activations": 10e9}
  assert ok.fits and ok.verdict.startswith("fits: 34.00 GB of 80.00 GB")
  bad = clock.memory_check(10e9, "h100")
  assert not bad.fits and "does not fit" in bad.verdict and "short by 160.00 GB" in bad.verdict
  assert clock.memory_check(1e9, "h100", outer_shards=8).breakdown["outer"] == 1e9
  assert not clock.memory_check(1e9, "phone").fits
  # Korthikanti et al.: 34 d + 5 a s bytes per layer and token.
  assert clock.activation_bytes(2, 64, 4, 128, 10) == 2 * 10 * (34 * 64 + 5 * 4 * 128)


@pytest.mark.parametrize("make, match", [
    (lambda: clock.Link(0.0), r"bandwidth = 0\.0 .*bytes/s > 0"),
    (lambda: clock.Link(-5.0), r"bandwidth = -5\.0"),
    (lambda: clock.Link(1.0, -1.0), r"latency = -1\.0 .*>= 0"),
    (lambda: _run(sync_every=0), r"H \(sync_every\) = 0 .*integer >= 1"),
    (lambda: _run("hierarchical", sync_every=10, global_sync_every=15),
     r"H2 \(global_sync_every\) = 15 .*multiple of H1 \(sync_every\) = 10"),
    (lambda: clock.device("a100"), r"Unknown device preset 'a100'; allowed: h100, tpu-v5e"),
    (lambda: clock.link("wifi"), r"Unknown link preset 'wifi'; allowed: nvlink4"),
    (lambda: _run("fedavg"), r"algorithm = 'fedavg' .*one of"),
    (lambda: _run(workers=3, clusters=2), r"workers = 3 .*multiple of clusters = 2"),
    (lambda: clock.heterogeneous_round([1.0], 10, 1.0, policy="drop"), r"policy = 'drop'"),
    (lambda: clock.heterogeneous_round([0.0], 10, 1.0), r"speed = 0\.0"),
    (lambda: clock.bandwidth_needed(1.5, CASES[0], "h100", _net()), r"utilisation = 1\.5"),
    (lambda: _run(comm_buckets=-1), r"comm_buckets = -1 .*integer >= 0"),
])
def test_bad_input_raises_value_error_naming_value_and_allowed(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_streaming_fragment_hides_behind_tau_steps_and_backward_share():
  """P fragments of 1/P the bytes each; a fragment exposes max(0, T / P - (tau + f) T_c)."""
  net = _net()
  plain = clock.Clock(_run(workers=4, sync_every=8), "h100", net)
  t_c, t_sync = plain.step_compute_s, plain.sync_time["global"]
  for p, tau, f in [(2, 0, 0.0), (4, 1, 0.0), (4, 1, 2 / 3), (8, 0, 0.5)]:
    run = _run(workers=4, sync_every=8, fragments=p, overlap_steps=tau, comm_overlap=f)
    clk = clock.Clock(run, "h100", net)
    assert clk.sync_time["global"] == pytest.approx(t_sync / p)
    clk.sync()
    assert clk.seconds == pytest.approx(max(0.0, t_sync / p - (tau + f) * t_c))
    timing = clock.simulate(run, "h100", net)  # one period: H steps and P fragment syncs
    assert timing.syncs == p
    assert timing.total_s == pytest.approx(8 * t_c + p * max(0.0, t_sync / p - (tau + f) * t_c))
  # DDP: the gradient all-reduce hides behind f of the step
  ddp = clock.Clock(_run("ddp", workers=4, comm_overlap=0.5), "h100", net)
  ddp.step()
  assert ddp.seconds == pytest.approx(ddp.step_compute_s + max(
      0.0, ddp.step_comm_s - 0.5 * ddp.step_compute_s))
  # a quantized wire: the outer sync's bytes scale with the bytes per element
  q = clock.Clock(_run(workers=4, sync_every=8, outer_bytes_per_element=0.5), "h100", net)
  assert q.sync_time["global"] == pytest.approx(t_sync / 8)
  with pytest.raises(ValueError, match="overlap_steps"):
    _run(workers=4, sync_every=8, fragments=4, overlap_steps=2)


def test_bucketed_overlap_exposes_the_last_bucket_or_the_comm_the_backward_pass_cannot_hide():
  """Hand-worked: backward 0.5 s of a 1 s step over 4 layers (a bucket ready every 0.125 s)."""
  run = _run("ddp", workers=4, comm_overlap=0.5, comm_buckets=4)
  # 1 s of comm: buckets of 0.25 s go 0.125-0.375, -0.625, -0.875, -1.125; backward ends at 0.5
  assert run.exposed(1.0, 1.0) == pytest.approx(0.625)
  # 0.2 s: buckets of 0.05 s each keep up; the last leaves at 0.5 and lands at 0.55
  assert run.exposed(0.2, 1.0) == pytest.approx(0.05)
  assert run.exposed(0.2, 1.0, window_s=0.01) == pytest.approx(0.04)  # streaming's tau steps
  # one bucket: nothing leaves before the backward pass ends; 0 buckets: the fine-grained limit
  assert _run("ddp", comm_overlap=0.5, comm_buckets=1).exposed(1.0, 1.0) == pytest.approx(1.0)
  assert _run("ddp", comm_overlap=0.5).exposed(1.0, 1.0) == pytest.approx(0.5)
  assert _run("ddp", comm_overlap=0.5).exposed(0.2, 1.0) == 0.0


def test_duplex_links_halve_the_bytes_of_every_all_reduce():
  net = _net()
  for algorithm, kw in (("ddp", {}), ("local_sgd", dict(sync_every=8))):
    one, two = (_run(algorithm, workers=4, duplex=d, **kw) for d in (False, True))
    for fn in (clock.step_comm, clock.sync_comm):
      a, b = fn(one, net), fn(two, net)
      assert a.latency == b.latency
      assert {k: v / 2 for k, v in a.bytes.items()} == pytest.approx(b.bytes)


def test_diloco_scaling_laws_preset_matches_the_published_table():
  """Every cell of the published table (arXiv 2503.09799, Table 6) within 1.5x, and its order
  (DP above H = 100 above H = 300) at every utilisation."""
  # A process of its own: the binary's flags (e.g. --seq_len) would clash with those of modules
  # other test files import (benchmarks.gpu_mfu).
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "experiments.bandwidth",
                         "--preset=diloco-scaling-laws"], cwd=root, capture_output=True,
                        text=True, timeout=300, check=True)
  out = proc.stdout
  ours, against = out.split("Against the published table")
  rows = {l.split("|")[1].strip(): [float(x.replace(",", "")) for x in l.split("|")[2:-1]]
          for l in ours.splitlines() if l.startswith("| DDP") or l.startswith("| local SGD H=")}
  ddp, h100, h300 = rows["DDP"], rows["local SGD H=100"], rows["local SGD H=300"]
  assert all(a > b > c for a, b, c in zip(ddp, h100, h300))
  # the published cells, copied from the paper here so that a change to the binary's copy shows
  published = {"DDP": [104.8, 184.2, 222.3, 222.3, 390.7],
               "local SGD H=100": [1.4, 6.2, 13.3, 23.3, 86.8],
               "local SGD H=300": [0.5, 2.0, 4.3, 9.1, 41.0]}
  for name, cells in published.items():
    line = next(l for l in against.splitlines() if l.startswith(f"| {name} |"))
    assert [float(c.split("/")[0]) for c in line.split("|")[2:-1]] == cells
    for p, w in zip(cells, rows[name]):
      assert 1 / 1.5 <= w / p <= 1.5, (name, p, w)
  assert "order DDP > H=100 > H=300 at every utilisation: kept" in out

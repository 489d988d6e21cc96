"""Multi-process runs: two processes of 4 CPU devices each (gloo collectives over localhost) train
exactly what one process of 8 devices trains.

The reference runs in this pytest process (8 fake devices, conftest.py); the two processes are
`experiments.train` subprocesses with their own XLA_FLAGS (4 devices each), joined through
`--coordinator_address/--num_processes/--process_id`. Every subprocess is bounded by a timeout
and killed (its whole process group) if anything fails.

Tolerance: until the first outer sync every number is bit-identical (each worker's arithmetic
runs on one device either way). The sync's mean over 'worker' is one all-reduce inside one
process but a gloo all-reduce across two, which adds the 8 float32 terms in another order: about
1 ulp (~6e-8 relative) per sync, measured. rtol = 1e-5 leaves room for that to grow over a few
syncs and is still far below any real bug (a wrong worker's data or a missed worker changes the
loss in the second or third digit).
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from lsgd_jax import checkpoint, distributed, mesh as mesh_lib, train
from conftest import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240
RTOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _overrides(data_dir, steps=12, **extra):
  flat = {"model.size": "cpu-micro", "train.steps": steps, "train.log_every": 1,
          "train.eval_every": 6, "data.data_dir": str(data_dir), **extra}
  return flat


def _config(overrides, algorithm):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(algorithm)
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _launch_two_processes(workdir, overrides, algorithm):
  """Runs experiments.train as 2 processes x 4 CPU devices; returns their stdout texts."""
  env = xla_env(4, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  port = _free_port()
  cmd = [sys.executable, "-m", "experiments.train", f"--config=configs/tiny.py:{algorithm}",
         f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  procs, logs = [], []
  try:
    for i in range(2):
      log = open(os.path.join(os.path.dirname(workdir), f"process{i}.log"), "w+")
      logs.append(log)
      procs.append(subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  finally:
    for p in procs:
      if p.poll() is None:  # a timeout or a failure elsewhere: end the child and its children
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{outputs[i][-3000:]}"
  return outputs


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _assert_same_run(single_dir, multi_dir):
  single, multi = _records(single_dir / "metrics.jsonl"), _records(multi_dir / "metrics.jsonl")
  assert [r["step"] for r in multi] == [r["step"] for r in single]
  for a, b in zip(single, multi):
    assert set(a) == set(b), a["step"]
    for key in a:
      if key in ("tokens_per_sec",):  # timing
        continue
      np.testing.assert_allclose(b[key], a[key], rtol=RTOL, err_msg=f"{key} at step {a['step']}")
  evals = [r["eval_loss"] for r in multi if "eval_loss" in r]
  assert len(evals) == 3 and evals[-1] < evals[0]
  # The final global model, exported collectively by both processes, equals the reference's.
  _, want, _ = checkpoint.load_model(str(single_dir / "export"))
  _, got, _ = checkpoint.load_model(str(multi_dir / "export"))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=RTOL, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_two_processes_match_one_process_local_sgd(tmp_path):
  """8 workers on 2 processes x 4 devices: workers 0-3 on process 0, 4-7 on process 1."""
  overrides = _overrides(tmp_path / "tfds")
  # The two processes start on an empty data_dir: process 0 builds the corpus, then process 1
  # reads it (distributed.process_zero_first); the reference reads it too.
  out = _launch_two_processes(str(tmp_path / "multi"), overrides, "local_sgd")
  train.train_and_evaluate(_config(overrides, "local_sgd"), str(tmp_path / "single"))
  assert "2 process(es); process 0 holds workers 0-3" in out[0]
  assert "2 process(es); process 1 holds workers 4-7" in out[1]
  _assert_same_run(tmp_path / "single", tmp_path / "multi")
  assert (tmp_path / "multi" / "results.json").exists()  # written once, by process 0


@pytest.mark.slow
def test_two_processes_ddp_two_workers_and_collective_resume(tmp_path):
  """DDP with 2 workers of 4 'data' devices: each worker inside one process, the every-step
  gradient all-reduce across the two. Then both processes restore the step-6 checkpoint together
  and finish again: the same run. (About 2 min on 2 shared cores: marked slow.)"""
  overrides = _overrides(tmp_path / "tfds", **{"local_sgd.num_workers": 2,
                                               "checkpoint.every_steps": 6,
                                               "checkpoint.every_minutes": 0})
  train.train_and_evaluate(_config(overrides, "ddp"), str(tmp_path / "single"))
  multi = tmp_path / "multi"
  out = _launch_two_processes(str(multi), overrides, "ddp")
  assert "process 0 holds worker 0" in out[0] and "process 1 holds worker 1" in out[1]
  _assert_same_run(tmp_path / "single", multi)
  shutil.rmtree(multi / "checkpoints" / "12")  # as if stopped after the step-6 save
  shutil.rmtree(multi / "export")
  os.remove(multi / "results.json")
  out = _launch_two_processes(str(multi), overrides, "ddp")
  assert "resumed from the checkpoint at step 6" in out[0]
  assert os.path.isdir(multi / "checkpoints" / "12")
  _assert_same_run(tmp_path / "single", multi)


# --- pieces that need no second process ---


def _fake_devices(num_processes, per_process, interleave):
  devs = [types.SimpleNamespace(id=p * 100 + i, process_index=p)
          for p in range(num_processes) for i in range(per_process)]
  if interleave:  # as a runtime might list them: round-robin over hosts
    devs = [devs[p * per_process + i] for i in range(per_process) for p in range(num_processes)]
  return devs


@pytest.mark.parametrize("interleave", [False, True])
def test_order_devices_groups_each_process(interleave):
  ordered = mesh_lib.order_devices(_fake_devices(2, 4, interleave))
  assert [d.process_index for d in ordered] == [0] * 4 + [1] * 4
  assert [d.id for d in ordered] == [0, 1, 2, 3, 100, 101, 102, 103]
  # The mesh reshapes this list row-major into (worker, data):
  grid = np.asarray([d.process_index for d in ordered]).reshape(8, 1)  # 8 workers
  assert grid[:4].tolist() == [[0]] * 4 and grid[4:].tolist() == [[1]] * 4
  grid = np.asarray([d.process_index for d in ordered]).reshape(2, 4)  # 2 workers x 4 data
  assert grid.tolist() == [[0] * 4, [1] * 4]


def test_order_devices_puts_slices_outermost():
  devs = [types.SimpleNamespace(id=i, process_index=i // 2, slice_index=1 - i // 4)
          for i in range(8)]
  assert [d.id for d in mesh_lib.order_devices(devs)] == [4, 5, 6, 7, 0, 1, 2, 3]


def test_put_global_and_local_workers_single_process():
  layout = mesh_lib.make_layout(8)
  batch = np.arange(8 * 4 * 5, dtype=np.int32).reshape(8, 4, 5)
  arr = mesh_lib.put_global(batch, layout.batch)
  assert arr.sharding == layout.batch
  np.testing.assert_array_equal(np.asarray(arr), batch)
  assert mesh_lib.local_workers(layout) == range(8)
  assert mesh_lib.process_slice(layout.batch, batch.shape) == (slice(0, 8), slice(0, 4),
                                                               slice(0, 5))
  assert mesh_lib.fetch({"x": arr})["x"].shape == batch.shape


@pytest.mark.parametrize("kwargs, env, expected", [
    ({}, {}, (None, None, None)),
    ({}, {"LSGD_COORDINATOR": "h:1", "LSGD_NUM_PROCESSES": "4", "LSGD_PROCESS_ID": "3"},
     ("h:1", 4, 3)),
    ({"coordinator_address": "a:2", "num_processes": 2, "process_id": 0},
     {"LSGD_COORDINATOR": "h:1", "LSGD_NUM_PROCESSES": "4", "LSGD_PROCESS_ID": "3"},
     ("a:2", 2, 0)),  # arguments (flags) win over the environment
])
def test_distributed_settings_resolve(kwargs, env, expected):
  assert distributed.resolve(**kwargs, env=env) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"},
     r"process_id=2 must be below num_processes=2"),
    ({"num_processes": 2, "process_id": 0}, r"needs a coordinator address"),
    ({"coordinator_address": "localhost"}, r"must be host:port"),
    ({"num_processes": 0}, r"num_processes must be at least 1"),
])
def test_distributed_settings_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(**kwargs, env={})


@pytest.mark.parametrize("env, detected", [
    ({}, False), ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, True), ({"OMPI_COMM_WORLD_SIZE": "4"}, True)])
def test_launchers_are_detected(env, detected):
  assert distributed._launcher_detected(env) is detected  # pylint: disable=protected-access


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  monkeypatch.setattr(distributed, "_on_cloud_tpu", lambda: False)
  for key in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
              distributed.ENV_PROCESS_ID, "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(key, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False


def test_initialize_says_whom_it_waits_for_and_checks_the_process_count(monkeypatch, capsys):
  """A process given another --num_processes than the coordinator's joined silently (and
  trained as if it were alone, or both aborted later); now one line names the mismatch. The
  join itself is announced, since a missing coordinator is minutes of silence."""
  joined = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: joined.append(kw))
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # what the coordinator runs
  monkeypatch.setattr(distributed, "_cpu_collectives", lambda: None)
  with pytest.raises(ValueError, match=r"--num_processes=3 here, but the coordinator at "
                     r"127.0.0.1:1234 runs 2 processes"):
    distributed.initialize("127.0.0.1:1234", 3, 1, initialization_timeout=60)
  assert joined and joined[0]["num_processes"] == 3
  assert ("process 1 of 3: joining the coordinator at 127.0.0.1:1234, waiting up to 60 s"
          in capsys.readouterr().out)
  assert distributed.initialize("127.0.0.1:1234", 2, 1) is True

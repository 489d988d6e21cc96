"""End to end: config files load, the tiny config trains, the binary writes its files, bad
configs fail with clear messages."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from lsgd_jax import config as config_lib
from lsgd_jax import train
from conftest import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_and_validates(path):
  c = _load(path)
  config_lib.validate(c)
  assert c.algorithm in ("local_sgd", "ddp")
  assert _load(path).to_dict() == c.to_dict()  # deterministic


def _tiny(**overrides):
  c = _load(os.path.join(ROOT, "configs", "tiny.py"))
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """configs/tiny.py as it stands (local SGD, 60 steps): (results, workdir)."""
  workdir = tmp_path_factory.mktemp("tiny")
  return train.train_and_evaluate(_tiny(), str(workdir)), workdir


def test_tiny_config_trains_and_loss_falls(tiny_run):
  res, tmp_path = tiny_run
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert records[0]["step"] == 0 and records[0]["eval_loss"] > 5.0  # untrained: ~log(256)
  for key in ("step", "train_loss", "tokens", "tokens_per_sec", "comm_bytes"):
    assert all(key in r for r in records[1:]), key
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == 3 and evals[0] > evals[1] > evals[2]
  assert records[1]["train_loss"] > res["final_train_loss"] and res["eval_loss"] < 3.6
  syncs = [r for r in records if "pseudo_grad_norm" in r]
  assert syncs and all(k in syncs[0] for k in ("outer_update_norm", "delta_cosine",
                                               "worker_loss_std"))
  assert records[-1]["comm_bytes"] == pytest.approx(res["comm_bytes"])
  assert json.load(open(tmp_path / "config.json"))["local_sgd"]["num_workers"] == 8


def test_ddp_moves_h_times_the_bytes_of_local_sgd(tiny_run, tmp_path):
  lsgd, _ = tiny_run  # 60 steps, H = 10: 6 outer syncs
  c = _tiny(train__eval_batches=0)  # evaluation moves no bytes
  c.algorithm = "ddp"
  ddp = train.train_and_evaluate(c, str(tmp_path / "d"))
  assert ddp["comm_bytes"] / lsgd["comm_bytes"] == pytest.approx(10, rel=0.01)


@pytest.mark.parametrize("overrides, message", [
    ({"local_sgd__num_workers": 3}, r"num_workers=3 does not divide the device count 8"),
    ({"local_sgd__sync_every": 0}, r"sync_every \(H\) must be at least 1, got 0"),
    ({"train__global_batch": 20}, r"Global batch size 20 is not divisible by num_workers x data "
                                  r"devices = 8 x 1 = 8"),
    ({"model__size": "3M"}, r"Unknown model size '3M'; allowed: "),
    ({"model__attention": "flash"}, r"Unknown model.attention 'flash'; allowed: auto, xla, cudnn"),
    ({"model__attention_chunks": -2}, r"model.attention_chunks must be 0 \(auto\).*got -2"),
    ({"local_sgd__shard_outer": "maybe"},
     r"local_sgd.shard_outer must be 'auto', True or False, got 'maybe'"),
    ({"local_sgd__shard_outer": "True", "local_sgd__outer_optimizer": "lamb"},
     r"local_sgd.shard_outer=True cannot apply: outer_optimizer='lamb' does not act element"),
    ({"local_sgd__shard_outer": "true", "local_sgd__num_workers": 4},
     r"shard_outer=True shards the outer state over 'worker' and needs a flat mesh"),
    ({"optim__name": "adagrad"}, r"Unknown inner optimizer 'adagrad'; allowed: adamw, sgd"),
    ({"local_sgd__outer_optimizer": "nesterow"}, r"Unknown outer optimizer 'nesterow'"),
    ({"data__seq_len": 512}, r"data.seq_len=512 must be in \[1, model.max_seq_len=256\]"),
    ({"optim__ddp_lr": -1.0}, r"optim.ddp_lr=-1.0: allowed 0 \(DDP uses optim.lr\)"),
])
def test_bad_config_values_raise_clear_errors(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.build(_tiny(**overrides))


def test_outer_state_is_sharded_over_the_workers_where_it_applies():
  assert train.build(_tiny()).layout.shard_outer  # 8 workers, 8 devices: 1/8 each
  assert not train.build(_tiny(local_sgd__shard_outer="False")).layout.shard_outer
  assert not train.build(_tiny(local_sgd__outer_optimizer="lamb")).layout.shard_outer
  assert not train.build(_tiny(local_sgd__num_fragments=2)).layout.shard_outer  # streaming
  ddp = _tiny(local_sgd__shard_outer="True")  # the comparison binary runs DDP on the same config
  ddp.algorithm = "ddp"
  assert not train.build(ddp).layout.shard_outer


def test_unknown_algorithm_is_rejected():
  c = _tiny()
  c.algorithm = "fedavg"
  with pytest.raises(ValueError, match=r"Unknown algorithm 'fedavg'; allowed: local_sgd, ddp"):
    train.build(c)


def test_train_binary_writes_config_and_metrics(tmp_path):
  env = xla_env()
  cmd = [sys.executable, "-m", "experiments.train", "--config=configs/tiny.py:ddp",
         f"--workdir={tmp_path}", "--config.train.steps=6", "--config.train.log_every=3",
         "--config.train.eval_batches=1", "--config.model.size=cpu-micro"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "[ddp] done: eval loss" in out.stdout
  assert json.load(open(tmp_path / "config.json"))["algorithm"] == "ddp"
  steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
  assert steps == [0, 3, 6]  # step 0: the untrained model's eval loss
  # A bad value: tests/test_bad_input.py runs the binaries' one-line error boundary (cli.py) and
  # test_bad_config_values_raise_clear_errors this message.


def test_eval_period_rounds_local_sgd_up_to_a_sync_boundary():
  from lsgd_jax import periodic
  assert periodic.eval_period(50, 20, local_sgd=True) == 60   # configs/default.py before v2
  assert periodic.eval_period(40, 20, local_sgd=True) == 40
  assert periodic.eval_period(5, 20, local_sgd=True) == 20
  assert periodic.eval_period(0, 20, local_sgd=True) == 0     # only at the end
  assert periodic.eval_period(50, 20, local_sgd=False) == 50  # DDP: every step is current


def test_local_sgd_evaluations_fall_on_sync_boundaries(tmp_path):
  """eval_every=5 with H=4: evaluations at 0, 8, 16 and the end (20), each right after a sync."""
  from conftest import small_config  # pylint: disable=import-outside-toplevel
  c = small_config(steps=20, train__eval_every=5, local_sgd__sync_every=4)
  res = train.train_and_evaluate(c, str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [r["step"] for r in records if "eval_loss" in r]
  assert evals == [0, 8, 16, 20]
  syncs = {r["step"] for r in records if "pseudo_grad_norm" in r}
  assert {8, 16, 20} <= syncs
  assert res["eval_every"] == 8 and res["eval_params"].startswith("global parameters")


def test_ddp_lr_sets_ddps_own_learning_rate_and_nothing_else():
  """optim.ddp_lr=X gives DDP the inner optimizer of optim.lr=X; local SGD keeps optim.lr. The
  optimizer compared is the run's own (`Setup.tx`, the one its train step applies), on a fixed
  gradient at step 1 (no warm-up: the peak lr), so no model is compiled."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  def first_update(algorithm, **overrides):
    c = _tiny(train__steps=20, optim__warmup_steps=0, **overrides)
    c.algorithm = algorithm
    tx = train.build(c).tx
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    updates, _ = tx.update({"w": jnp.linspace(0.5, -0.3, 5)}, tx.init(params), params)
    return np.asarray(updates["w"])

  own = first_update("ddp", optim__lr=1e-3, optim__ddp_lr=2e-2)
  np.testing.assert_array_equal(own, first_update("ddp", optim__lr=2e-2))
  assert not np.array_equal(own, first_update("ddp", optim__lr=1e-3))
  np.testing.assert_array_equal(first_update("local_sgd", optim__lr=1e-3, optim__ddp_lr=2e-2),
                                first_update("local_sgd", optim__lr=1e-3))


def test_default_config_is_the_studys_cpu3_point_for_both_methods():
  """configs/default.py trains exactly the v2 study's tuned seed-0 runs at cpu-3 (so the numbers
  its docstring quotes are those of docs/scaling_cpu_v2/results.csv): every setting that
  reaches training is equal."""
  from lsgd_jax import sweep  # pylint: disable=import-outside-toplevel
  study = _load(os.path.join(ROOT, "configs", "scaling_cpu_v2.py"), "part2")

  def effective(c):
    c = c.copy_and_resolve_references()
    if c.algorithm == "ddp":  # DDP trains at ddp_lr when set; it has no outer optimizer
      c.optim.lr = c.optim.ddp_lr or c.optim.lr
      c.local_sgd.outer_lr = c.local_sgd.outer_momentum = 0.0
    c.optim.ddp_lr = 0.0
    return c.to_dict()

  for alg, lr in (("ddp", 8e-3), ("local_sgd", 1.6e-2)):
    run = next(r for r in sweep.plan(study) if r.size == "cpu-3" and r.algorithm == alg
               and r.seed == 0 and r.lr == lr)
    assert effective(sweep.run_config(study, run)) == effective(
        _load(os.path.join(ROOT, "configs", "default.py"), alg))

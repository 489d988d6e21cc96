"""Sweeps: the plan (names, deduplication, lr tuning, budgets), a tiny sweep end to end with an
interruption and a resume, results.csv / report / plots, divergence handling, the sweep configs."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from lsgd_jax import model, report, sweep, train, verdict
from lsgd_jax.config import base_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name, arg=None):
  path = os.path.join(ROOT, "configs", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, (module.get_config() if arg is None else module.get_config(arg))


def _tiny_sweep():
  """Two sizes x {DDP, local SGD}, 3 steps of 8 x 16 byte tokens, 2 workers on 1 device."""
  c = base_config()
  c.model.max_seq_len, c.data.seq_len = 32, 16
  c.train.steps, c.train.global_batch, c.train.log_every = 3, 8, 0
  c.train.eval_every, c.train.eval_batches, c.train.eval_batch = 1, 1, 8
  c.optim.warmup_steps = 1
  c.local_sgd.num_workers, c.local_sgd.sync_every = 2, 2
  c.mesh.num_devices = 1  # both workers on one device: the least to compile
  c.checkpoint.every_minutes, c.checkpoint.async_save = 0, False  # one save, at the end
  s = c.sweep = sweep.sweep_section()
  s.sizes = ["cpu-1", "cpu-2"]
  s.algorithms = ["ddp", "local_sgd"]
  s.sync_every, s.num_workers, s.lrs = [2], [2], [3e-3]
  s.n_boot = 30
  return c


class _Killed(Exception):
  """Stands for the sweep process dying mid-way."""


def test_tiny_sweep_end_to_end_resumes_without_retraining_and_reports(tmp_path):
  c, out = _tiny_sweep(), str(tmp_path / "sweep")
  names = [r.name() for r in sweep.plan(c)]
  assert names == ["size=cpu-1,alg=ddp,K=2,lr=3e-3,steps=3,seed=0",
                   "size=cpu-1,alg=local_sgd,H=2,K=2,outer=nesterov-0.7-0.9,lr=3e-3,steps=3,seed=0",
                   "size=cpu-2,alg=ddp,K=2,lr=3e-3,steps=3,seed=0",
                   "size=cpu-2,alg=local_sgd,H=2,K=2,outer=nesterov-0.7-0.9,lr=3e-3,steps=3,seed=0"]
  calls = []

  def dies_at_third(cfg, workdir):
    calls.append(os.path.basename(workdir))
    if len(calls) == 3:
      raise _Killed
    return train.train_and_evaluate(cfg, workdir)

  with pytest.raises(_Killed):
    sweep.run_sweep(c, out, train_fn=dies_at_third, log=lambda s: None)
  assert calls == names[:3]
  rows = sweep.read_csv(os.path.join(out, "results.csv"))
  assert [r["workdir"] for r in rows] == names[:2]  # complete for the finished runs
  mtimes = {n: os.path.getmtime(os.path.join(out, n, "results.json")) for n in names[:2]}

  calls.clear()
  sweep.run_sweep(c, out, train_fn=lambda cfg, wd: (calls.append(os.path.basename(wd)),
                                                    train.train_and_evaluate(cfg, wd))[1],
                  log=lambda s: None)
  assert calls == names[2:]  # the finished runs were skipped, not retrained
  assert all(os.path.getmtime(os.path.join(out, n, "results.json")) == t
             for n, t in mtimes.items())
  rows = sweep.read_csv(os.path.join(out, "results.csv"))
  assert [r["workdir"] for r in rows] == names
  for r in rows:
    assert r["status"] == "done" and r["grid"] == "main" and 3.0 < float(r["eval_loss"]) < 6.5
    assert int(r["tokens"]) == 3 * 8 * 16 and float(r["flops"]) > 0
  assert {r["algorithm"] for r in rows} == {"ddp", "local_sgd"}
  assert int(rows[0]["non_embedding_params"]) == 23_712
  assert set(STUDY_COLUMNS) <= set(rows[0])  # what docs/scaling_cpu_v2 needs
  assert all(float(r["wall_seconds"]) > 0 for r in rows)
  # eval_every=1 with H=2: DDP is scored every step, local SGD only right after its syncs
  evals = {n: [json.loads(l)["step"] for l in open(os.path.join(out, n, "metrics.jsonl"))
               if "eval_loss" in json.loads(l)] for n in names[:2]}
  assert evals == {names[0]: [0, 1, 2, 3], names[1]: [0, 2, 3]}

  cols = report.read_results(os.path.join(out, "results.csv"))  # what experiments/fit.py reads
  assert set(report.REQUIRED_COLUMNS) <= set(cols)
  for name in ("report.md", "loss_vs_params.png", "loss_vs_compute.png",
               "local_sgd_minus_ddp.png"):
    assert os.path.getsize(os.path.join(out, "report", name)) > 0, name
  assert "## Grid `main`" in open(os.path.join(out, "summary.md")).read()


STUDY_COLUMNS = ("algorithm", "num_workers", "sync_every", "non_embedding_params", "tokens",
                 "flops", "eval_loss", "lr", "outer_lr", "outer_momentum", "seed")


def _fake_train(losses, diverge=(), bonus=lambda cfg: 0.0):
  """A stand-in for train.train_and_evaluate: loss from the lr (+ `bonus(config)`),
  FloatingPointError for some."""
  calls = []

  def fn(cfg, workdir):
    calls.append(os.path.basename(workdir))
    if cfg.optim.lr in diverge:
      raise FloatingPointError("training loss is nan at step 2")
    res = {"eval_loss": losses[cfg.optim.lr] + (0.1 if cfg.algorithm == "local_sgd" else 0.0)
                        + bonus(cfg),
           "non_embedding_params": 1000, "tokens": 10, "flops": 1e6, "final_train_loss": 1.0,
           "train_seconds": 0.1, "tokens_per_sec": 100.0, "comm_bytes": 1.0}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(res, f)
    return res
  return fn, calls


def test_local_sgd_gets_ddps_best_lr_and_diverged_runs_are_recorded(tmp_path):
  c = _tiny_sweep()
  c.sweep.sizes, c.sweep.lrs, c.sweep.reports = ["cpu-1"], [1e-3, 1e-2, 1e-1], {}
  runs = sweep.plan(c)
  assert [(r.algorithm, r.lr) for r in runs] == [("ddp", 1e-3), ("ddp", 1e-2), ("ddp", 1e-1),
                                                 ("local_sgd", None)]
  fn, calls = _fake_train({1e-3: 3.0, 1e-2: 2.5}, diverge=(1e-1,))
  rows = sweep.run_sweep(c, str(tmp_path), train_fn=fn, log=lambda s: None)
  assert calls[-1].startswith("size=cpu-1,alg=local_sgd") and "lr=1e-2" in calls[-1]
  assert [r["status"] for r in rows] == ["done", "done", "failed", "done"]
  assert math.isnan(rows[2]["eval_loss"])
  assert os.path.exists(tmp_path / runs[2].name() / "failed.json")
  csv_rows = sweep.read_csv(str(tmp_path / "results.csv"))
  assert csv_rows[2]["eval_loss"] == "nan" and float(csv_rows[3]["lr"]) == 1e-2

  calls.clear()  # a re-run skips diverged runs too, unless asked to retry them
  sweep.run_sweep(c, str(tmp_path), train_fn=fn, log=lambda s: None)
  assert calls == []
  sweep.run_sweep(c, str(tmp_path), train_fn=fn, log=lambda s: None, retry_failed=True)
  assert calls == [runs[2].name()]


def test_tuning_extends_an_edge_grid_and_transfers_the_tuned_settings(tmp_path):
  """Each method tunes its own lr (local SGD also its outer optimizer); a best lr at the edge of
  the grid gets the next lr beyond it until the best is interior; seeds 1 and 2 train at the
  tuned settings only."""
  c = _tiny_sweep()
  s = c.sweep
  s.sizes, s.lrs, s.reports, s.tune_lr_on, s.extend_lr_grid = ["cpu-1"], [1e-3, 2e-3, 4e-3], {}, "", 3
  s.outer = ["nesterov:0.7:0.9", "average"]
  s.grids.seeds = {"seeds": [1, 2], "lrs": ["tuned"], "outer": ["tuned"]}
  runs = sweep.plan(c)
  assert [(r.algorithm, r.lr, r.seed) for r in runs if r.transfer] == [
      ("ddp", None, 1), ("ddp", None, 2), ("local_sgd", None, 1), ("local_sgd", None, 2)]
  # DDP: loss falls up to 8e-3, so the grid extends to 8e-3 then 1.6e-2 (worse): best 8e-3,
  # interior. Local SGD (+0.1, fake): the same lrs; averaging is made better than Nesterov.
  losses = {1e-3: 3.0, 2e-3: 2.8, 4e-3: 2.6, 8e-3: 2.5, 1.6e-2: 2.7, 5e-4: 3.5}
  fake, calls = _fake_train(losses, bonus=lambda cfg: -0.05 * (
      cfg.algorithm == "local_sgd" and cfg.local_sgd.outer_optimizer == "average"))
  rows = sweep.run_sweep(c, str(tmp_path), train_fn=fake, log=lambda s: None)
  ddp = [(float(r["lr"]), int(r["lr_extended"])) for r in rows
         if r["algorithm"] == "ddp" and r["seed"] == 0]
  assert ddp == [(1e-3, 0), (2e-3, 0), (4e-3, 0), (8e-3, 1), (1.6e-2, 1)]
  for r in rows:
    if r["seed"] in (1, 2):
      assert r["transferred"] == ("lr" if r["algorithm"] == "ddp" else "lr+outer")
      assert float(r["lr"]) == 8e-3
      assert r["algorithm"] == "ddp" or r["outer_optimizer"] == "average"
  assert sorted((r["algorithm"], r["seed"]) for r in rows if r["seed"]) == [
      ("ddp", 1), ("ddp", 2), ("local_sgd", 1), ("local_sgd", 2)]
  assert len(calls) == len(rows) == 5 + 2 * 5 + 4

  calls.clear()  # a resume retrains nothing, extensions included
  again = sweep.run_sweep(c, str(tmp_path), train_fn=fake, log=lambda s: None)
  assert calls == [] and [r["workdir"] for r in again] == [r["workdir"] for r in rows]

  # collect_only: a run not finished (its results.json gone) is left out, nothing trains
  os.remove(tmp_path / rows[-1]["workdir"] / "results.json")
  some = sweep.run_sweep(c, str(tmp_path), train_fn=fake, log=lambda s: None, collect_only=True)
  assert calls == [] and [r["workdir"] for r in some] == [r["workdir"] for r in rows[:-1]]
  assert len(sweep.read_csv(str(tmp_path / "results.csv"))) == len(rows) - 1


def test_plan_deduplicates_grids_and_sets_budgets():
  c = _tiny_sweep()
  s = c.sweep
  s.sizes, s.lrs = ["cpu-1", "cpu-3"], [1e-3, 2e-3]
  s.sync_every, s.budget, s.budgets = [2, 4], "tokens_per_param", [2.0]
  s.warmup_fraction = 0.1
  s.grids.outer = {"sizes": ["cpu-1"], "algorithms": ["local_sgd", "ddp"],
                   "outer": ["average", "sgd:0.5:0.8"]}
  runs = sweep.plan(c)
  ddp = [r for r in runs if r.algorithm == "ddp"]
  assert len(ddp) == 4 and all(r.lr is not None and r.outer is None for r in ddp)
  assert all(r.grids == (("main", "outer") if r.size == "cpu-1" else ("main",)) for r in ddp)
  lsgd = [r for r in runs if r.algorithm == "local_sgd"]
  assert len(lsgd) == 2 * 2 + 2 * 2 and all(r.lr is None for r in lsgd)  # H x outer per grid
  assert {r.outer for r in lsgd if "outer" in r.grids} == {("average", 1.0, 0.0),
                                                            ("sgd", 0.5, 0.8)}
  n1 = model.non_embedding_params(model.model_config("cpu-1", 257))
  assert runs[0].steps == round(2.0 * n1 / (8 * 16))  # D = 2 N tokens at 128 tokens a step
  assert [r.size for r in runs] == sorted((r.size for r in runs), key=["cpu-1", "cpu-3"].index)
  cfg = sweep.run_config(c, lsgd[0], 2e-3)
  assert (cfg.local_sgd.sync_every, cfg.optim.lr, cfg.train.steps) == (2, 2e-3, runs[0].steps)
  assert cfg.optim.warmup_steps == round(0.1 * runs[0].steps) and "sweep" not in cfg
  validate(cfg)


@pytest.mark.parametrize("change, message", [
    (lambda s: setattr(s, "algorithms", ["local_sgd"]), r"tuned on 'ddp' runs .* has none"),
    (lambda s: s.grids.update({"bad": {"size": ["cpu-1"]}}), r"sweep.grids.bad: unknown keys size"),
    (lambda s: setattr(s, "budget", "hours"), r"Unknown sweep.budget 'hours'"),
    (lambda s: setattr(s, "sizes", ["3M"]), r"Unknown model size '3M'"),
    (lambda s: s.per_size.update({"cpu-1": {"train": {"stepz": 3}}}), r"no config key 'train.st"),
])
def test_plan_rejects_bad_sweeps(change, message):
  c = _tiny_sweep()
  c.sweep.lrs = [1e-3, 2e-3]
  change(c.sweep)
  with pytest.raises(ValueError, match=message):
    sweep.plan(c)


def test_report_grid_selection():
  cols = {"grid": np.array(["main", "main+H", "outer"]), "eval_loss": np.array([1.0, 2.0, 3.0])}
  assert report.select_grids(cols, ["H"])["eval_loss"].tolist() == [2.0]
  assert report.select_grids(cols, ["main"])["eval_loss"].tolist() == [1.0, 2.0]
  with pytest.raises(ValueError, match="present: H, main, outer"):
    report.select_grids(cols, ["workers"])


def test_scaling_cpu_config_is_the_documented_grid():
  _, c = _load_config("scaling_cpu.py")
  runs = sweep.plan(c)
  assert len(runs) == 29
  n = {r.size: sweep.size_stats(sweep.training_config(c, r.size))[0] for r in runs}
  assert len(n) == 5 and max(n.values()) / min(n.values()) >= 30
  main = [r for r in runs if "main" in r.grids]
  assert {(r.algorithm, r.num_workers, r.sync_every) for r in main} == {("ddp", 8, 1),
                                                                         ("local_sgd", 8, 10)}
  assert len({r.steps for r in runs}) == 1  # equal tokens and compute for every run of a size
  abl = [r for r in runs if r.size == "cpu-3" and r.algorithm == "local_sgd"]
  assert {r.sync_every for r in abl} == {10, 50, 200} and {r.num_workers for r in abl} == {2, 4, 8}
  assert {r.outer[0] for r in abl} == {"nesterov", "average"}
  assert {r.size for r in runs if r.outer == ("average", 1.0, 0.0)} == set(n)  # 2nd local SGD law
  assert len(sweep.plan(_load_config("scaling_cpu.py", "smoke")[1])) == 4


def test_study_configs_cover_the_eight_sizes_with_costs():
  study, _ = _load_config("study.py")
  for size in model.STUDY_SIZES:
    c = study.get_config(size)
    validate(c)
    p = study.size_plan(size)
    assert c.data.name == "c4" and c.train.steps * c.train.global_batch * 2048 == p["tokens"]
    assert p["tokens"] >= 20 * p["N"] and c.train.global_batch % 8 == 0
  validate(study.get_config("cpu"))
  _, c = _load_config("study_sweep.py")
  runs = sweep.plan(c)
  assert len(runs) == 38 and {r.size for r in runs} == set(model.STUDY_SIZES)
  text = sweep.describe(c, runs, "8xH100", 0.4)
  assert "38 runs, 4.93e+20 training FLOPs" in text and "43.3 hours" in text


def test_a_rerun_keeps_failed_runs_failed_and_refuses_changed_settings(tmp_path):
  """A run that learned nothing has results.json and failed.json: a re-run of the sweep keeps
  it failed (it must not feed the tuning and the fits as done). A finished run whose settings
  the sweep has since changed (here data.seq_len) is refused, before any file is rewritten;
  a sweep axis can be replaced from the command line (a tuple field)."""
  c = _tiny_sweep()
  c.sweep.sizes, c.sweep.algorithms, c.sweep.reports = ["cpu-1"], ["ddp"], {}
  assert isinstance(c.sweep.seeds, tuple)  # what --config.sweep.seeds="(0, 1)" needs

  def learned_nothing(cfg, workdir):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort())
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"eval_loss": 5.5, "non_embedding_params": 1000, "tokens": 10, "flops": 1e6,
                 "final_train_loss": 5.5, "train_seconds": 0.1, "tokens_per_sec": 100.0,
                 "comm_bytes": 1.0, "failed_to_learn": True}, f)
    raise verdict.FailedToLearn("failed to learn: no better than chance")

  def not_called(cfg, workdir):
    raise AssertionError(f"{workdir} was trained again")

  rows = sweep.run_sweep(c, str(tmp_path), train_fn=learned_nothing, log=lambda s: None)
  assert [r["status"] for r in rows] == ["failed"]
  again = sweep.run_sweep(c, str(tmp_path), train_fn=not_called, log=lambda s: None)
  assert [r["status"] for r in again] == ["failed"]
  retried = sweep.run_sweep(c, str(tmp_path), train_fn=learned_nothing, log=lambda s: None,
                            retry_failed=True)  # trained again (and fails again), not "done"
  assert [r["status"] for r in retried] == ["failed"]
  # killed between the run's results.json and the sweep's failed.json: still failed
  (failed,) = [p for p in tmp_path.glob("*/failed.json")]
  failed.unlink()
  again = sweep.run_sweep(c, str(tmp_path), train_fn=not_called, log=lambda s: None)
  assert [r["status"] for r in again] == ["failed"] and failed.exists()

  c.data.seq_len = 8
  with pytest.raises(ValueError, match=r"finished with other settings than this sweep gives it "
                     r"\(data\.seq_len: 16 -> 8\)"):
    sweep.run_sweep(c, str(tmp_path), train_fn=not_called, log=lambda s: None)
  with open(tmp_path / "sweep_config.json") as f:
    assert json.load(f)["data"]["seq_len"] == 16


def test_a_grid_that_tunes_the_outer_optimizer_alone_runs(tmp_path):
  """Runs that take the tuned outer optimizer at a given lr: their names are known only once
  the tuning runs are done (the finished-run check must wait for them)."""
  c = _tiny_sweep()
  s = c.sweep
  s.sizes, s.algorithms, s.lrs, s.reports = ["cpu-1"], ["local_sgd"], [1e-3], {}
  s.outer = ["nesterov:0.7:0.9", "average"]
  s.grids.seeds = {"seeds": [1], "outer": ["tuned"]}
  fake, calls = _fake_train({1e-3: 3.0}, bonus=lambda cfg: -0.05 * (
      cfg.local_sgd.outer_optimizer == "average"))
  rows = sweep.run_sweep(c, str(tmp_path), train_fn=fake, log=lambda s: None)
  assert len(calls) == len(rows) == 3
  assert [r["outer_optimizer"] for r in rows if r["seed"] == 1] == ["average"]

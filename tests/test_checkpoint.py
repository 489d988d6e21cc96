"""Checkpoints lose nothing: exact resume anywhere, preemption, damaged checkpoints, unsafe
config changes, divergence policies, worker failures, export."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lsgd_jax import checkpoint, train
from conftest import small_config, xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("tokens_per_sec",)  # wall-clock figures differ between any two runs


def _config(steps=30, **kw):
  return small_config(steps, **kw)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE} for l in f]


def _params(workdir):
  _, params, _ = checkpoint.load_model(os.path.join(workdir, "export"))
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A run that saves every step, so any step can serve as the cut point."""
  workdir = str(tmp_path_factory.mktemp("full"))
  train.train_and_evaluate(_config(checkpoint__every_steps=1, checkpoint__max_to_keep=40),
                           workdir)
  return workdir


@pytest.mark.parametrize("cut", [15, 20, 21])  # inside a round, at a sync, just after it
def test_resume_equals_uninterrupted_bitwise(uninterrupted, tmp_path, cut):
  workdir = str(tmp_path / "resumed")
  shutil.copytree(uninterrupted, workdir)
  os.remove(os.path.join(workdir, "results.json"))
  shutil.rmtree(os.path.join(workdir, "export"))
  for d in glob.glob(os.path.join(workdir, "checkpoints", "*")):
    if os.path.basename(d).isdigit() and int(os.path.basename(d)) > cut:
      shutil.rmtree(d)
  res = train.train_and_evaluate(_config(checkpoint__every_steps=1, checkpoint__max_to_keep=40),
                                 workdir)
  assert res["resumed_from"] == cut
  assert _records(workdir) == _records(uninterrupted)
  for a, b in zip(_params(workdir), _params(uninterrupted)):
    np.testing.assert_array_equal(a, b)


def test_finished_run_is_not_retrained(uninterrupted, capsys):
  before = os.path.getmtime(os.path.join(uninterrupted, "results.json"))
  res = train.train_and_evaluate(_config(checkpoint__every_steps=1, checkpoint__max_to_keep=40),
                                 uninterrupted)
  assert "already finished" in capsys.readouterr().out
  assert os.path.getmtime(os.path.join(uninterrupted, "results.json")) == before
  assert res["steps"] == 30


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  ref = train.train_and_evaluate(_config(checkpoint__every_steps=10), workdir)
  ref_records = _records(workdir)
  shown = [l.split(" | ")[0] for l in capsys.readouterr().out.splitlines() if " | loss " in l]
  # every logged step has its progress line, those with a checkpoint too (log_every 5)
  assert shown == [f"[local_sgd] step {s}/30" for s in range(5, 31, 5)], shown
  os.remove(os.path.join(workdir, "results.json"))
  latest = os.path.join(workdir, "checkpoints", "30", "state")
  for path in glob.glob(os.path.join(latest, "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  res = train.train_and_evaluate(_config(checkpoint__every_steps=10), workdir)
  out = capsys.readouterr().out
  assert "checkpoint 30 is damaged" in out and "resumed from the checkpoint at step 20" in out
  assert res["eval_loss"] == ref["eval_loss"]

  # Every checkpoint damaged: the run stops and says so, instead of starting again from step 0.
  os.remove(os.path.join(workdir, "results.json"))
  for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "state", "**", "*"),
                        recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoint.CheckpointsDamaged, match=r"every checkpoint in .* is damaged: "
                     r"30 \(.*; 20 \(.*; 10 \(.*Resuming would start the run again from step 0"):
    train.train_and_evaluate(_config(checkpoint__every_steps=10), workdir)
  assert len(_records(workdir)) == len(ref_records)


def test_a_finished_run_rewrites_a_lost_export_or_results_and_keeps_its_config(
    uninterrupted, tmp_path, capsys):
  """Re-running a finished run's command writes a missing export again (as evaluate's message
  says), finishes again from the final checkpoint when results.json cannot be read, drops a
  metrics line cut short by a kill, and leaves config.json as the run was trained."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(uninterrupted, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    trained_with = f.read()
  with open(os.path.join(workdir, "results.json")) as f:
    ref = json.load(f)
  cfg = _config(checkpoint__every_steps=1, checkpoint__max_to_keep=40, train__log_every=3)
  shutil.rmtree(os.path.join(workdir, "export", "params"))
  train.train_and_evaluate(cfg, workdir)
  assert "is missing or damaged: writing it again" in capsys.readouterr().out
  for a, b in zip(_params(workdir), _params(uninterrupted)):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == trained_with  # log_every 3 was not what it trained with

  with open(os.path.join(workdir, "results.json"), "w") as f:
    f.write('{"eval_loss": 2.')  # cut short
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 30, "train_lo')  # a kill while appending
  res = train.train_and_evaluate(_config(checkpoint__every_steps=1, checkpoint__max_to_keep=40),
                                 workdir)
  out = capsys.readouterr().out
  assert "results.json cannot be read (JSONDecodeError" in out
  assert "the last line is cut short" in out
  assert res["eval_loss"] == ref["eval_loss"] and res["steps"] == 30
  assert _records(workdir) == _records(uninterrupted)
  # no step was timed by the re-run: the rate is the one the run logged, not 0
  assert res["tokens_per_sec_from"] == "metrics.jsonl (median)" and res["tokens_per_sec"] > 0


def test_metrics_are_truncated_whole_or_not_at_all(tmp_path, monkeypatch):
  """A resume rewrites metrics.jsonl up to its checkpoint; a failure (or a kill) in the middle
  of the rewrite leaves the old file, not an emptied one."""
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 10, 15)))
  calls = []

  def dies_on_second(record):
    calls.append(record)
    if len(calls) == 2:
      raise OSError("killed")
    return json.JSONEncoder().encode(record)
  monkeypatch.setattr(train.json, "dumps", dies_on_second)
  with pytest.raises(OSError):
    train._truncate_metrics(str(path), 10)  # pylint: disable=protected-access
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [5, 10, 15]
  monkeypatch.undo()
  train._truncate_metrics(str(path), 10)  # pylint: disable=protected-access
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [5, 10]


def test_a_signal_after_the_last_step_is_not_lost(tmp_path, monkeypatch, capsys):
  """SIGTERM between the loop's last check and the final save: the run finishes its save,
  export and results, then says so and stops as preempted (exit 143 in a binary)."""
  from lsgd_jax import data  # pylint: disable=import-outside-toplevel
  close = data.Prefetcher.close
  sent = []

  def close_and_signal(self):
    if not sent:  # the first close: right after the loop's last step
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)
    return close(self)
  monkeypatch.setattr(data.Prefetcher, "close", close_and_signal)
  workdir = str(tmp_path / "run")
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(_config(20), workdir)
  assert f"signal {signal.SIGTERM} arrived during the final save and export" in (
      capsys.readouterr().out)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["steps"] == 20


def test_metrics_lines_that_are_not_records_are_named(tmp_path):
  from lsgd_jax import metrics  # pylint: disable=import-outside-toplevel
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{bad\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics record"):
    metrics.read_jsonl(str(path))
  path.write_text('{"step": 1}\n{"step": 2}\n{"st')
  assert metrics.read_jsonl(str(path)) == [{"step": 1}, {"step": 2}]


@pytest.mark.parametrize("change, message", [
    ({"local_sgd__num_workers": 2}, r"local_sgd.num_workers: 4 -> 2"),
    ({"model__size": "cpu-small"}, r"model.size: 'cpu-micro' -> 'cpu-small'"),
    ({"data__tokenizer": "sentencepiece"}, r"data.tokenizer: 'byte' -> 'sentencepiece'"),
    ({"data__val_fraction": 0.5}, r"data.val_fraction: 0.05 -> 0.5"),  # the split would move
])
def test_unsafe_config_change_is_rejected(uninterrupted, change, message):
  with pytest.raises(ValueError, match=message):
    checkpoint.check_compatible(json.load(open(os.path.join(uninterrupted, "config.json"))),
                                _config(**change))


def test_keys_added_to_the_schema_since_a_save_pass_at_their_default():
  saved = json.loads(_config().to_json_best_effort())
  del saved["model"]["attention"], saved["edge"]  # a checkpoint written before these keys existed
  assert checkpoint.check_compatible(saved, _config()) == []
  with pytest.raises(ValueError, match=r"model.attention: '<absent>' -> 'xla'"):
    checkpoint.check_compatible(saved, _config(model__attention="xla"))
  # the attention's query blocks change neither the state nor the function: a safe change
  assert checkpoint.check_compatible(saved, _config(model__attention_chunks=4)) == [
      "model.attention_chunks: 0 -> 4"]


def test_safe_config_change_is_reported(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_config(steps=20), workdir)
  os.remove(os.path.join(workdir, "results.json"))
  res = train.train_and_evaluate(_config(steps=25, train__log_every=1), workdir)
  out = capsys.readouterr().out
  assert "resuming with a changed setting: train.steps: 20 -> 25" in out
  assert "train.log_every: 5 -> 1" in out
  assert res["resumed_from"] == 20 and res["steps"] == 25


def test_nan_worker_stop_policy_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match=r"training diverged: train_loss = nan at step 15; "
                                               r"the last good checkpoint is step 10"):
    train.train_and_evaluate(_config(faults__nan_step=12, faults__nan_worker=1,
                                     checkpoint__every_steps=10), workdir)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [10]


def test_nan_worker_skip_policy_skips_the_round_and_recovers(tmp_path):
  res = train.train_and_evaluate(_config(faults__nan_step=12, faults__nan_worker=1,
                                         train__on_nonfinite="skip"), str(tmp_path / "run"))
  records = _records(str(tmp_path / "run"))
  assert res["skipped_rounds"] == 1.0
  assert np.isfinite(res["eval_loss"]) and res["eval_loss"] < 4.0
  at_20 = [r for r in records if r["step"] == 20 and "outer_skipped" in r][0]
  assert at_20["outer_skipped"] == 1.0 and at_20["skipped_steps"] == 8  # steps 13..20 of worker 1
  after = [r for r in records if r["step"] == 25][0]
  assert np.isfinite(after["train_loss"])


def test_worker_failures_are_finite_and_repeatable(tmp_path):
  c = _config(faults__fail_prob=0.5, faults__fail_schedule="0:0,0:1,0:2,0:3")
  a = train.train_and_evaluate(c, str(tmp_path / "a"))
  train.train_and_evaluate(c, str(tmp_path / "b"))
  ra, rb = _records(str(tmp_path / "a")), _records(str(tmp_path / "b"))
  assert ra == rb and np.isfinite(a["eval_loss"])
  syncs = [r for r in ra if "contributing_workers" in r]
  assert syncs[0]["contributing_workers"] == 0 and syncs[0]["outer_skipped"] == 1  # all failed
  assert any(0 < r["contributing_workers"] < 4 for r in syncs[1:])
  assert a["skipped_rounds"] >= 1


def test_exported_model_evaluates_to_the_training_loss(uninterrupted):
  res = json.load(open(os.path.join(uninterrupted, "results.json")))
  out = train.evaluate_exported(os.path.join(uninterrupted, "export"))
  assert out["eval_loss"] == pytest.approx(res["eval_loss"], abs=1e-5)
  assert out["perplexity"] == pytest.approx(np.exp(res["eval_loss"]), rel=1e-4)


def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
  env = xla_env()
  cmd = [sys.executable, "-m", "experiments.train", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", "--config.train.steps=3000", "--config.train.log_every=5",
         "--config.train.eval_every=0", "--config.checkpoint.every_minutes=0",
         "--config.model.size=cpu-micro"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  try:
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "stopped by signal 15" in out and "re-run the same command to resume" in out
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert len(saved) == 1 and 10 <= saved[0] < 3000
  # The same command resumes (with fewer steps, to keep the test short: a reported safe change).
  short = cmd[:5] + [f"--config.train.steps={saved[0] + 10}"] + cmd[6:]
  done = subprocess.run(short, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"resumed from the checkpoint at step {saved[0]}" in done.stdout
  assert json.load(open(tmp_path / "results.json"))["resumed_from"] == saved[0]


@pytest.mark.parametrize("async_save", [True, "auto"])
def test_memory_is_released_once_after_each_save_has_finished(tmp_path, async_save, monkeypatch):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from lsgd_jax import periodic  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=async_save)
  calls = []
  release = periodic.ReleaseMemory(ckpt, release=lambda: calls.append(1))
  end = periodic.StepEnd(1, False, None, None, None, {})
  assert not release.due(end)  # nothing saved yet
  state = {"w": jnp.arange(1 << 16, dtype=jnp.float32)}
  for step in (1, 2):
    ckpt.save(step, state, {})
    if async_save == "auto":  # on a CPU "auto" writes while the caller waits
      assert not ckpt.manager.is_saving_in_progress()
    ckpt.wait()
    with monkeypatch.context() as m:  # a write still running: not yet
      m.setattr(ckpt.manager, "is_saving_in_progress", lambda: True)
      assert not release.due(end)
    assert release.due(end)
    release(end)
    assert not release.due(end)  # once per save
  assert calls == [1, 1]
  ckpt.close()
  assert not release.due(end)  # closed


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_free_memory_is_released_under_glibc():
  from lsgd_jax import periodic  # pylint: disable=import-outside-toplevel
  assert periodic.release_free_memory()


_BLOCKS = """
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from lsgd_jax import periodic
def rss_mib():
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
if sys.argv[1] == "16":
  assert periodic.map_large_blocks(16)
before = rss_mib()
for _ in range(3):  # glibc's default raises its threshold when the first mapped block is freed
  block = np.ones(20 << 20, np.uint8)  # 20 MiB, every page written
  del block
kept_large = rss_mib() - before
before = rss_mib()
block = np.ones(10 << 20, np.uint8)  # under the mmap threshold: from the heap's top
del block
print(kept_large, rss_mib() - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_large_blocks_go_back_to_the_os_when_freed():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  kept = {mib: [float(x) for x in subprocess.run(
      [sys.executable, "-c", _BLOCKS, mib, root], check=True, capture_output=True,
      text=True).stdout.split()] for mib in ("0", "16")}
  assert kept["0"][0] > 15  # glibc's default: the freed 20 MiB block stays in the heap, resident
  assert kept["16"][0] < 2  # mapped for the request, returned when freed
  # The trim threshold (4 x 16 MiB) keeps a freed 10 MiB block at the heap's top for reuse; a
  # fixed mmap threshold alone would leave glibc trimming from 128 KiB (and 10 MiB go back).
  assert kept["16"][1] > 8


def test_mmap_threshold_setting_is_checked():
  from lsgd_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  assert [config_lib.mmap_threshold_mib(None, b) for b in ("cpu", "gpu", "tpu")] == [16, 0, 0]
  assert [config_lib.mmap_threshold_mib(v, "gpu") for v in (0, 1, 32)] == [0, 1, 32]
  for bad in (-1, 33, 2.5, True, "16"):
    with pytest.raises(ValueError, match=rf"train.mmap_threshold_mib={bad!r}: allowed None "
                       r"\(auto: 16 on a CPU\), 0 .* from 1 to 32"):
      config_lib.mmap_threshold_mib(bad, "cpu")
  c = _config()
  c.train.mmap_threshold_mib = 40
  with pytest.raises(ValueError, match="train.mmap_threshold_mib=40"):
    config_lib.validate(c)


def test_async_save_setting_is_checked():
  from lsgd_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  assert [config_lib.async_save(v) for v in (None, "auto", "True", "false", False)] == [
      "auto", "auto", True, False, False]
  c = _config().copy_and_resolve_references()  # a copy (as sweeps and comparisons make) takes
  c.checkpoint.async_save = False              # a bool
  config_lib.validate(c)
  c = _config().copy_and_resolve_references()
  c.checkpoint.async_save = "sometimes"  # the command line refuses it first (a bool flag)
  with pytest.raises(ValueError, match=r"checkpoint.async_save must be 'auto', True or False, "
                                       r"got 'sometimes'"):
    config_lib.validate(c)

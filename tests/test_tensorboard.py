"""What a run shows besides metrics.jsonl: TensorBoard events (one folder per algorithm), a
jax.profiler trace of chosen steps, progress lines with the simulated clock."""

import contextlib
import glob
import io
import json
import os

import pytest

from lsgd_jax import config as config_lib
from lsgd_jax import metrics, train
from conftest import small_config


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  """Local SGD (H = 2, steps 1 and 2 traced) and DDP, 4 steps each, compared in one workdir."""
  workdir = str(tmp_path_factory.mktemp("runs"))
  c = small_config(4, local_sgd__sync_every=2, train__log_every=2, train__eval_every=2,
                   train__profile_steps="1,2")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = train.compare_algorithms(c, workdir)
  return workdir, results, out.getvalue()


def test_event_files_hold_every_jsonl_scalar_per_algorithm(compared):
  workdir, _, _ = compared
  for algorithm in ("local_sgd", "ddp"):
    run = os.path.join(workdir, algorithm)
    events = metrics.read_events(run)
    records = metrics.read_jsonl(os.path.join(run, "metrics.jsonl"))
    # the same values at the same steps as metrics.jsonl (float32 in the event file)
    assert events["train/loss"] == [(r["step"], pytest.approx(r["train_loss"], rel=1e-6))
                                    for r in records if "train_loss" in r]
    assert events["eval/loss"] == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6))
                                   for r in records if "eval_loss" in r]
    assert [s for s, _ in events["eval/loss"]] == [0, 2, 4]
    keys = {k for r in records for k in r if k != "step"}
    assert {metrics.tb_tag(k, k not in metrics.TB_GROUPS) for k in keys} == set(events)
  lsgd = metrics.read_events(os.path.join(workdir, "local_sgd"))
  # the outer-sync diagnostics are their own group, one point per sync (steps 2 and 4)
  assert [s for s, _ in lsgd["outer_sync/pseudo_grad_norm"]] == [2, 4]
  assert "outer_sync/delta_cosine" in lsgd and "outer_sync/skipped_rounds" in lsgd
  assert not any(t.startswith("outer_sync/") for t in metrics.read_events(
      os.path.join(workdir, "ddp")))


def test_profile_steps_capture_a_trace_in_workdir_profile(compared):
  workdir, _, _ = compared
  for algorithm in ("local_sgd", "ddp"):  # the config's profile_steps apply to each run
    traces = glob.glob(os.path.join(workdir, algorithm, "profile", "plugins", "profile", "*",
                                    "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  cfg = json.load(open(os.path.join(workdir, "local_sgd", "config.json")))
  assert cfg["train"]["profile_steps"] == "1,2"


def test_progress_lines_show_the_simulated_clock(compared):
  _, results, out = compared
  lines = [l for l in out.splitlines() if l.startswith("[local_sgd] step 4/4")]
  assert len(lines) == 1 and " | sim " in lines[0] and "% utilisation" in lines[0]
  assert results["local_sgd"]["sim_utilisation"] > 0


@pytest.mark.parametrize("spec", ["3", "a,b", "-1,2", "2,0", "3,2"])
def test_bad_profile_steps_are_rejected_in_one_line(spec):
  c = small_config(4, train__profile_steps=spec)
  with pytest.raises(ValueError, match=r"^train.profile_steps=.* must be 'START,COUNT' with "
                                       r"START >= 0, COUNT >= 1 and START \+ COUNT <= "
                                       r"train.steps=4 \(e.g. '10,2'\), or '' \(off\).$"):
    config_lib.validate(c)

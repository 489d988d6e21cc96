"""Several inner steps per compiled call (`train.steps_per_call`): where calls are cut, and that a
run cut into scanned calls gives the numbers of a run dispatched step by step, bit for bit."""

import json

import jax
import numpy as np
import pytest

from conftest import small_config
from lsgd_jax import checkpoint, config as config_lib, train


def _ends(calls, start, total):
  out, step = [], start
  while step < total:
    step = calls.end(step)
    out.append(step)
  return out


def test_calls_are_cut_at_every_period_and_the_fault_step():
  # Periods by hand: H = 10, log every 4, at most 6 steps per call, 25 steps.
  calls = train.Calls(6, 25, cuts=(10, 0, 4, 0, 0))
  assert _ends(calls, 0, 25) == [4, 8, 10, 12, 16, 20, 24, 25]
  assert _ends(train.Calls(6, 25, cuts=(10,)), 3, 25) == [9, 10, 16, 20, 25]  # resumed at 3
  assert _ends(train.Calls(10, 20, cuts=(10,), at=(7, -1)), 0, 20) == [7, 10, 20]
  assert _ends(train.Calls(1, 4, cuts=(10,)), 0, 4) == [1, 2, 3, 4]


def test_steps_per_call_auto_and_budget():
  assert train.steps_per_call(0, per_step=False) == (10 if jax.default_backend() == "cpu" else 1)
  assert train.steps_per_call(7, per_step=False) == 7
  assert train.steps_per_call(7, per_step=True) == 1  # budget masks, streaming fragments


@pytest.mark.parametrize("bad", [-1, -7])
def test_bad_steps_per_call_is_refused(bad):
  c = small_config()
  c.train.steps_per_call = bad
  with pytest.raises(ValueError, match="train.steps_per_call"):
    config_lib.validate(c)


def _run(tmp_path, name, per_call, algorithm):
  c = small_config(steps=23, algorithm=algorithm, train__steps_per_call=per_call,
                   train__log_every=3)
  res = train.train_and_evaluate(c, str(tmp_path / name))
  records = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
  for r in records:
    r.pop("tokens_per_sec", None)
  params = checkpoint.load_model(str(tmp_path / name / "export"))[1]
  return res, records, params


@pytest.mark.xla_default
@pytest.mark.parametrize("algorithm", ["local_sgd", "ddp"])
def test_scanned_calls_equal_step_by_step(tmp_path, algorithm):
  # 23 steps, H = 10, log every 3, eval every 10: calls of 3, 3, 3, 1, 2, 3, 3, 2, ... steps.
  res1, rec1, p1 = _run(tmp_path, "one", 1, algorithm)
  res7, rec7, p7 = _run(tmp_path, "seven", 7, algorithm)
  assert rec1 == rec7
  assert res1["eval_loss"] == res7["eval_loss"] and res1["comm_bytes"] == res7["comm_bytes"]
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p7)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""Injected faults for the reliability, multi-cluster and edge studies.

Which workers fail in which outer round is a pure function of (seed, round), so a run with
failures is repeatable and resumes exactly. A failed worker's weight in the outer mean is 0: it is
left out, the mean is taken over the survivors, and it rejoins from the new global parameters.
"""

from __future__ import annotations

import os
import signal

import numpy as np

# Process faults for the reliability tests (tests/test_faults.py): $LSGD_FAULT="POINT[@STEP]:ACTION"
# makes the process signal itself when it reaches POINT (at STEP): ACTION "kill" (SIGKILL: no
# handler runs), "term" (SIGTERM, as a scheduler's preemption), or "stop" (SIGSTOP: hangs holding
# its workdir). Points: "save" (a checkpoint is about to be written), "export" (the final state
# is saved, the model about to be exported), "results" (exported, results.json not yet written).
FAULT_ENV = "LSGD_FAULT"
_ACTIONS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP}


def point(name: str, step: int | None = None) -> None:
  """Signals this process if $LSGD_FAULT names this point (and step); otherwise nothing."""
  spec = os.environ.get(FAULT_ENV, "")
  if not spec:
    return
  where, _, action = spec.partition(":")
  at, _, at_step = where.partition("@")
  if at == name and (not at_step or step is not None and int(at_step) == step):
    os.kill(os.getpid(), _ACTIONS[action])


def parse_schedule(schedule: str, num_workers: int) -> dict[int, set[int]]:
  """'ROUND:WORKER,ROUND:WORKER,...' (0-based) -> {round: {workers}}."""
  out: dict[int, set[int]] = {}
  for item in filter(None, (s.strip() for s in (schedule or "").split(","))):
    try:
      r, w = (int(x) for x in item.split(":"))
    except ValueError:
      raise ValueError(f"Bad failure schedule entry {item!r}: expected ROUND:WORKER with two "
                       f"integers, e.g. '3:1,5:0'.") from None
    if r < 0 or not 0 <= w < num_workers:
      raise ValueError(f"Failure schedule entry {item!r}: round must be >= 0 and worker in "
                       f"[0, {num_workers}).")
    out.setdefault(r, set()).add(w)
  return out


def round_weights(round_index: int, num_workers: int, *, seed: int = 0, fail_prob: float = 0.0,
                  schedule: dict[int, set[int]] | None = None) -> np.ndarray:
  """Weights [K] of the workers in the outer mean of `round_index`: 1 alive, 0 failed."""
  if not 0.0 <= fail_prob <= 1.0:
    raise ValueError(f"faults.fail_prob must be in [0, 1], got {fail_prob}.")
  w = np.ones(num_workers, np.float32)
  if fail_prob > 0:
    rng = np.random.default_rng([seed, 7919, round_index])
    w[rng.random(num_workers) < fail_prob] = 0.0
  for k in (schedule or {}).get(round_index, ()):
    w[k] = 0.0
  return w


STRAGGLER_POLICIES = ("wait", "budget")


def parse_speeds(spec: str, num_workers: int, seed: int = 0) -> np.ndarray:
  """Relative compute speeds [K] of the workers (1: the clock's device; 0.5: half as fast).

  "" -> all 1; "1,1,0.5,0.25" -> one value per worker; "random:LO" -> drawn uniformly from
  [LO, 1] once per seed (the same for every round, so a run is repeatable and resumes exactly).
  """
  spec = (spec or "").strip()
  if not spec:
    return np.ones(num_workers)
  if spec.startswith("random:"):
    try:
      lo = float(spec.split(":", 1)[1])
    except ValueError:
      lo = float("nan")
    if not 0 < lo <= 1:
      raise ValueError(f"edge.speeds={spec!r}: 'random:LO' needs 0 < LO <= 1, e.g. 'random:0.25'.")
    return np.random.default_rng([seed, 104729]).uniform(lo, 1.0, num_workers)
  try:
    v = np.array([float(x) for x in spec.split(",")])
  except ValueError:
    raise ValueError(f"edge.speeds={spec!r}: expected {num_workers} comma-separated numbers "
                     "(e.g. '1,1,0.5,0.25'), or 'random:LO'.") from None
  if v.size != num_workers:
    raise ValueError(f"edge.speeds={spec!r} gives {v.size} speeds for {num_workers} workers; "
                     "give one per worker.")
  if not np.all(np.isfinite(v) & (v > 0)):
    raise ValueError(f"edge.speeds={spec!r}: every speed must be a finite number > 0.")
  return v


def budget_steps(speeds: np.ndarray, sync_every: int) -> np.ndarray:
  """Inner steps [K] each worker does in a round under the "budget" policy: the round lasts H
  steps of the fastest worker, and worker k does floor(H v_k / max v) of its own (possibly 0)."""
  v = np.asarray(speeds, np.float64)
  return np.floor(sync_every * v / v.max() + 1e-9).astype(np.int64)

"""Injected faults for the reliability, multi-cluster and edge studies.

Which workers fail in which outer round is a pure function of (seed, round), so a run with
failures is repeatable and resumes exactly. A failed worker's weight in the outer mean is 0: it is
left out, the mean is taken over the survivors, and it rejoins from the new global parameters.
"""

from __future__ import annotations

import numpy as np


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

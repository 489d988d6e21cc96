"""Did a finished run learn? A run can end without an error and still have learned nothing: every
step skipped as non-finite, a final loss worse than predicting every token uniformly. The verdict
goes into the summary line and results.json (`verdict`, `failed_to_learn`); under
`train.on_no_learning = "error"` (the default) the run then raises `FailedToLearn`.
"""

from __future__ import annotations

import math

# A run fails to learn when any of these holds:
MARGIN_NATS = 0.25  # its final loss is above ln(vocab), the uniform prediction's, by this much
#                    (a freshly initialised model sits a little above ln(vocab): not a failure)
MAX_SKIPPED_SHARE = 0.5  # more than this share of its inner steps (or outer rounds) was skipped
ON_NO_LEARNING = ("error", "warn")


class FailedToLearn(FloatingPointError):
  """A finished run that learned nothing (see `failed_to_learn`); results.json is written."""


def failed_to_learn(results: dict, vocab_size: int, *, skipped_steps: float = 0.0,
                    worker_steps: int = 0, rounds: int = 0) -> str | None:
  """Why the run described by `results` failed to learn, or None if it learned.

  `skipped_steps` of `worker_steps` inner steps (over all workers) and `results["skipped_rounds"]`
  of `rounds` outer rounds were skipped as non-finite (train.on_nonfinite = "skip").
  """
  loss = results.get("eval_loss")
  what = "eval loss"
  if loss is None:
    loss, what = results.get("final_train_loss"), "final train loss"
  uniform = math.log(vocab_size)
  reasons = []
  if loss is not None and not math.isfinite(loss):
    reasons.append(f"{what} is {loss}")
  elif loss is not None and loss > uniform + MARGIN_NATS:
    reasons.append(f"{what} {loss:.3f} is worse than predicting every token uniformly "
                   f"(ln {vocab_size} = {uniform:.3f})")
  if worker_steps and skipped_steps > MAX_SKIPPED_SHARE * worker_steps:
    reasons.append(f"{skipped_steps:.0f} of {worker_steps} inner steps were skipped as non-finite")
  skipped_rounds = results.get("skipped_rounds") or 0.0
  if rounds and skipped_rounds > MAX_SKIPPED_SHARE * rounds:
    reasons.append(f"{skipped_rounds:.0f} of {rounds} outer rounds were skipped as non-finite")
  if not reasons:
    return None
  return "; ".join(reasons) + " (lower optim.lr or local_sgd.outer_lr)"

"""Inner optimizers (per worker, and the DDP optimizer) and outer optimizers (local SGD).

Both are plain optax `GradientTransformation`s built from a few values, so a Colab user can build
them without a config. The study's settings (arXiv 2409.13198): AdamW with beta1 0.9, beta2 0.95,
cosine decay; the outer optimizer follows DiLoCo (arXiv 2311.08105): SGD with Nesterov momentum
0.9 and learning rate 0.7.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

INNER_OPTIMIZERS = ("adamw", "sgd")
# Outer optimizers whose update of an element depends only on that element's history: they give
# the same result when the two-stage sync updates each device's slice of a leaf on its own.
# (lamb, lars, novograd, adafactor, sm3, ... use whole-leaf norms or factored statistics.)
ELEMENTWISE_OUTER = ("nesterov", "sgd", "average", "adam", "adamw", "nadam", "nadamw", "adamax",
                     "adamaxw", "amsgrad", "adabelief", "adagrad", "adadelta", "rmsprop", "lion",
                     "radam", "yogi", "rprop", "adan", "sign_sgd")


def lr_schedule(peak_lr: float, total_steps: int, warmup_steps: int,
                final_lr_fraction: float) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_lr`, then cosine decay to `final_lr_fraction * peak_lr`."""
  if peak_lr <= 0:
    raise ValueError(f"Learning rate must be positive, got {peak_lr}.")
  if not 0 <= warmup_steps < max(total_steps, 1):
    raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}).")
  if not 0.0 <= final_lr_fraction <= 1.0:
    raise ValueError(f"final_lr_fraction must be in [0, 1], got {final_lr_fraction}.")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak_lr * final_lr_fraction)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (not on RMSNorm scales)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def inner_optimizer(name: str, *, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                    final_lr_fraction: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                    eps: float = 1e-8, weight_decay: float = 0.1,
                    grad_clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """The optimizer each worker (or the DDP replica) applies every step.

  `name="adamw"`: clip by global norm, then AdamW with the warm-up + cosine schedule.
  `name="sgd"`: plain SGD with the same schedule (used by the equivalence tests).
  """
  if name not in INNER_OPTIMIZERS:
    raise ValueError(f"Unknown inner optimizer {name!r}; allowed: {', '.join(INNER_OPTIMIZERS)}.")
  schedule = lr_schedule(learning_rate, total_steps, warmup_steps, final_lr_fraction)
  if name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=_decay_mask)
  else:
    tx = optax.sgd(schedule)
  if grad_clip_norm is not None and grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx


def outer_optimizer(name: str, learning_rate: float = 0.7, momentum: float = 0.9,
                    kwargs: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
  """The optimizer applied to the mean pseudo-gradient at every outer sync.

  - "nesterov": SGD with Nesterov momentum (DiLoCo: lr 0.7, momentum 0.9);
  - "sgd": SGD with heavy-ball momentum (none if momentum is 0);
  - "average": plain parameter averaging (lr 1, no momentum; classic local SGD / FedAvg);
  - any other name: the optax optimizer of that name, called with
    `learning_rate=learning_rate, **kwargs` (e.g. "adam" with kwargs {"b1": 0.9}).
  """
  kwargs = dict(kwargs or {})
  if name == "average":
    return optax.sgd(1.0)
  if name in ("nesterov", "sgd"):
    if momentum < 0 or momentum >= 1:
      raise ValueError(f"Outer momentum must be in [0, 1), got {momentum}.")
    return optax.sgd(learning_rate, momentum=momentum or None,
                     nesterov=(name == "nesterov" and momentum > 0))
  factory = getattr(optax, name, None)
  if factory is None or not callable(factory) or name.startswith("_"):
    raise ValueError(f"Unknown outer optimizer {name!r}; allowed: 'nesterov', 'sgd', 'average', "
                     "or the name of an optax optimizer such as 'adam' or 'lion'.")
  try:
    tx = factory(learning_rate=learning_rate, **kwargs)
  except TypeError as e:
    raise ValueError(f"Outer optimizer optax.{name} rejected its arguments "
                     f"(learning_rate={learning_rate}, {kwargs}): {e}") from None
  if not isinstance(tx, optax.GradientTransformation):
    raise ValueError(f"optax.{name} is not an optimizer (it returned {type(tx).__name__}).")
  return tx

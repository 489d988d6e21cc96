"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == 8, "conftest must run before anything imports jax"


def small_config(steps=30, **overrides):
  """A fast local SGD config (cpu-tiny, bytes, 4 workers, H = 10); `section__name=value` or
  `name=value` overrides."""
  from lsgd_jax.config import base_config  # pylint: disable=import-outside-toplevel
  c = base_config()
  c.model.size, c.model.max_seq_len = "cpu-tiny", 64
  c.data.seq_len, c.data.tokenizer = 32, "byte"
  c.train.steps, c.train.global_batch, c.train.log_every = steps, 16, 5
  c.train.eval_every, c.train.eval_batches, c.train.eval_batch = 10, 1, 16
  c.optim.warmup_steps = 2
  c.local_sgd.num_workers, c.local_sgd.sync_every = 4, 10
  c.checkpoint.every_minutes = 0
  for key, value in overrides.items():
    section, name = key.split("__") if "__" in key else (None, key)
    if section:
      c[section][name] = value
    else:
      c[name] = value
  return c

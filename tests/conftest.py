"""Test set-up: 8 fake CPU devices and one compilation cache for the session, set before JAX is
imported anywhere."""

import atexit
import os
import shutil
import sys
import tempfile

# One persistent compilation cache per session, in a fresh temporary folder (nothing carries over
# from an earlier session), also used by the binaries the tests start (they inherit the
# environment): the many tiny runs compile the same programs once instead of once per run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="lsgd-jax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny programs too

# Cheap compiles: the tests compile hundreds of small programs, and LLVM's optimisation of the
# generated CPU code is most of each compile; at -O0 a tiny run's compiles take ~30% less time
# (its loss moves in the 8th digit). What the tests check (equalities between two runs, golden
# values with tolerances, collectives in the optimised HLO, which XLA's HLO passes decide before
# LLVM) does not depend on it. LSGD_TEST_XLA_OPT=1 runs the suite with the default optimisation level.
# Single-threaded Eigen kernels: the two pytest-xdist workers (and the binaries they start) already
# keep both cores busy, and intra-op threads on top of them only contend (the suite ran 274 s with
# them, 260 s without, 2026-12-06).
TEST_XLA_FLAGS = ("" if os.environ.get("LSGD_TEST_XLA_OPT") == "1" else
                  "--xla_backend_optimization_level=0") + " --xla_cpu_multi_thread_eigen=false"


def xla_env(devices: int = 8, **extra: str) -> dict[str, str]:
  """The environment for a binary a test starts: the test session's XLA flags (so its programs
  and numbers are the test process's) with `devices` fake CPU devices, plus `extra`."""
  flags = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}".strip()
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS,
                "--xla_force_host_platform_device_count=8") if f)
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

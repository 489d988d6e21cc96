"""Test set-up: 8 fake CPU devices and one compilation cache for the session, set before JAX is
imported anywhere."""

import atexit
import os
import shutil
import subprocess
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
# LLVM) does not depend on it.
# XLA:CPU's elemental emitters for fusions instead of its newer MLIR fusion emitters: a tiny
# run's compiles take another ~30% less time (the suite: 253 s -> 183 s, 2026-12-06). Under them
# two programs that compute the same values in a different shape (a step alone and inside the
# loop program, a masked step and a plain one) can differ in the last bit, where the default
# emitters give the same bits; the tests that claim such a bit equality carry the `xla_default`
# marker and run in a child process with the default emitters (`pytest_pyfunc_call` below).
# Single-threaded Eigen kernels: the two pytest-xdist workers (and the binaries they start) already
# keep both cores busy, and intra-op threads on top of them only contend (the suite ran 274 s with
# them, 260 s without, 2026-12-06).
# LSGD_TEST_XLA_OPT=1 runs the suite with XLA's defaults (optimisation level and emitters);
# LSGD_TEST_EMITTERS=default keeps -O0 with the default emitters (what `xla_default` tests get).
# The XLA_FLAGS the session started with (pytest-xdist's workers inherit the set ones).
_USER_XLA_FLAGS = os.environ.setdefault("LSGD_TEST_USER_XLA_FLAGS",
                                       os.environ.get("XLA_FLAGS", ""))
_DEFAULT_XLA = os.environ.get("LSGD_TEST_XLA_OPT") == "1"


def _xla_knows(flag: str) -> bool:
  """Whether the installed jaxlib has the XLA flag (an unknown flag in XLA_FLAGS aborts the
  process; a later jaxlib may drop the elemental emitters)."""
  import glob  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  import mmap  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("jaxlib")
  for folder in (spec.submodule_search_locations if spec else None) or ():
    for path in glob.glob(os.path.join(folder, "*.so")):
      with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m.find(flag.encode()) >= 0:
          return True
  return False


ELEMENTAL_EMITTERS = (not _DEFAULT_XLA and os.environ.get("LSGD_TEST_EMITTERS") != "default"
                      and _xla_knows("xla_cpu_use_fusion_emitters"))
TEST_XLA_FLAGS = " ".join(f for f in (
    "" if _DEFAULT_XLA else "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false" if ELEMENTAL_EMITTERS else "",
    "--xla_cpu_multi_thread_eigen=false") if f)


def xla_env(devices: int = 8, **extra: str) -> dict[str, str]:
  """The environment for a binary a test starts: the test session's XLA flags (so its programs
  and numbers are the test process's) with `devices` fake CPU devices, plus `extra`."""
  flags = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}".strip()
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


os.environ["XLA_FLAGS"] = " ".join(
    f for f in (_USER_XLA_FLAGS, TEST_XLA_FLAGS,
                "--xla_force_host_platform_device_count=8") if f)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == 8, "conftest must run before anything imports jax"


# module path -> {node id: (outcome, message)} from the module's child run
_CHILD_RUNS: dict[str, dict[str, tuple[str, str]]] = {}


def _child_outcomes(module: str, ids: list[str], rootpath: str) -> dict[str, tuple[str, str]]:
  """Runs `ids` (tests of `module`) in a child pytest with XLA's default emitters; each node id's
  outcome ("passed", "failed" or "skipped") and message, from the child's JUnit XML report."""
  import xml.etree.ElementTree as ET  # pylint: disable=import-outside-toplevel
  env = {**os.environ, "XLA_FLAGS": _USER_XLA_FLAGS, "LSGD_TEST_EMITTERS": "default"}
  with tempfile.TemporaryDirectory() as d:
    report = os.path.join(d, "report.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "",
           "--color=no", f"--junitxml={report}", *ids]
    res = subprocess.run(cmd, cwd=rootpath, env=env, capture_output=True, text=True, check=False)
    tail = f"{res.stdout[-4000:]}{res.stderr[-2000:]}"
    outcomes = {i: ("failed", f"no result for it; the child pytest said:\n{tail}") for i in ids}
    if os.path.exists(report):
      for case in ET.parse(report).getroot().iter("testcase"):
        node = f"{module}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
          outcomes[node] = ("failed", f"{bad.get('message', '')}\n{bad.text or ''}")
        elif skip is not None:
          outcomes[node] = ("skipped", skip.get("message", ""))
        else:
          outcomes[node] = ("passed", "")
  return outcomes


def pytest_pyfunc_call(pyfuncitem):
  """An `xla_default` test, while this session compiles with the elemental emitters: run it in a
  child pytest with XLA's default emitters instead (its fixtures here are set up and unused).
  One child runs all of a module's `xla_default` tests (pytest-xdist keeps a module together)."""
  if not (ELEMENTAL_EMITTERS and pyfuncitem.get_closest_marker("xla_default")):
    return None
  import pytest  # pylint: disable=import-outside-toplevel
  module = pyfuncitem.nodeid.split("::")[0]
  if module not in _CHILD_RUNS:
    ids = [i.nodeid for i in pyfuncitem.session.items
           if i.nodeid.split("::")[0] == module and i.get_closest_marker("xla_default")]
    _CHILD_RUNS[module] = _child_outcomes(module, ids, str(pyfuncitem.config.rootpath))
  outcome, message = _CHILD_RUNS[module][pyfuncitem.nodeid]
  if outcome == "skipped":
    pytest.skip(message)
  if outcome == "failed":
    pytest.fail(f"in a child process with XLA's default emitters: {message}", pytrace=False)
  return True


def small_config(steps=30, **overrides):
  """A fast local SGD config (cpu-micro, bytes, 4 workers, H = 10); `section__name=value` or
  `name=value` overrides."""
  from lsgd_jax.config import base_config  # pylint: disable=import-outside-toplevel
  c = base_config()
  c.model.size, c.model.max_seq_len = "cpu-micro", 64
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

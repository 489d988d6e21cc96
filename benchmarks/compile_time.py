"""Where a tiny test run's time goes: compiling vs the rest, cold and with its programs cached.

  python -m benchmarks.compile_time [--runs=2]

Imports tests/conftest.py first, so the run sees exactly what a test sees: 8 fake CPU devices,
the tests' XLA flags (-O0, elemental emitters, single-threaded Eigen) and a fresh persistent
compilation cache. Then runs `conftest.small_config()` (cpu-micro, 4 workers, 30 steps) `--runs`
times in this process, each in a fresh workdir: the first compiles everything, the later ones
find their programs in the caches. For each run: wall seconds, and from JAX's monitoring events the seconds spent tracing,
lowering to MLIR and compiling (the XLA backend compile, or reading the program back from the
persistent cache, which the later runs do). Writes JSON (`--out`).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import conftest  # noqa: E402  (sets XLA_FLAGS and the compilation cache before JAX starts)

import collections  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from lsgd_jax import train  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 2, "Runs of the same config in this process (>= 1).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/compile_time.json", "JSON output.")

EVENTS = {"trace": "/jax/core/compile/jaxpr_trace_duration",
          "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "compile": "/jax/core/compile/backend_compile_duration"}


def main(argv):
  del argv
  if _RUNS.value < 1:
    raise app.UsageError(f"--runs={_RUNS.value}: give at least 1")
  seconds, counts = collections.Counter(), collections.Counter()

  def listen(event, secs, **_):
    seconds[event] += secs
    counts[event] += 1

  jax.monitoring.register_event_duration_secs_listener(listen)
  rows = []
  for i in range(_RUNS.value):
    seconds.clear()
    counts.clear()
    t0 = time.perf_counter()
    train.train_and_evaluate(conftest.small_config(), tempfile.mkdtemp(prefix="lsgd-compile-"))
    row = {"run": i + 1, "wall_s": time.perf_counter() - t0}
    for name, event in EVENTS.items():
      row[f"{name}_s"], row[f"{name}_count"] = seconds[event], counts[event]
    rows.append(row)
  print(f"\nconftest.small_config(), XLA_FLAGS={os.environ['XLA_FLAGS']!r}\n")
  print("| run | wall s | tracing s | lowering s | compiling s (programs) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['run']} | {r['wall_s']:.2f} | {r['trace_s']:.2f} | {r['lower_s']:.2f} | "
          f"{r['compile_s']:.2f} ({r['compile_count']}) |")
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"xla_flags": os.environ["XLA_FLAGS"], "rows": rows}, f, indent=2)
  print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

"""Tokens/s of the trainer at each CPU size of the scaling study, one dispatch per step vs the
loop program (issue 11, item 2: small models must not lose to per-step overheads).

  python -m benchmarks.sizes [--sizes=cpu-0,cpu-1,cpu-2,cpu-3,cpu-3b,cpu-base --steps=100 --reps=2]

Each point is a real `train.train_and_evaluate` run of the study's setting (configs/default.py:
byte tokens, sequences of 64, global batch 64, K = 8 workers on 2 fake devices, H = 10; no
evaluation) with the model size swapped in, under two loops:
- `per_step`: `train.steps_per_call = 1`, one dispatch of the compiled step per step (the loop
  before issue 11);
- `loop`: `train.steps_per_call = 0` (auto, today's CPU default): up to 10 steps per call of one
  compiled `fori_loop` program.
Steady-state tokens/s is the median of the run's logged `tokens_per_sec` after its first record
(compiles excluded); `wall` is the whole run, compiles included (what a sweep pays per run).
% of peak = 6 x matmul weights x tokens/s over the float32 matmul peak measured in the same
process (benchmarks/common.matmul_peak, before and after). The variants alternate within each
repetition so that load from other processes falls on both. Writes benchmarks/results/sizes.json.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default as default_config  # noqa: E402
from lsgd_jax import metrics as metrics_lib  # noqa: E402
from lsgd_jax import model, train  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["cpu-0", "cpu-1", "cpu-2", "cpu-3", "cpu-3b", "cpu-base"],
                           "Model presets.")
_STEPS = flags.DEFINE_integer("steps", 100, "Steps per run (a multiple of 10).")
_REPS = flags.DEFINE_integer("reps", 2, "Interleaved repetitions (the median is reported).")
_ALGORITHM = flags.DEFINE_enum("algorithm", "local_sgd", ["local_sgd", "ddp"], "Algorithm.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/sizes.json", "JSON output.")

VARIANTS = {"per_step": 1, "loop": 0}


def run_config(size: str, steps: int, steps_per_call: int, algorithm: str):
  """The study's setting (configs/default.py) at `size`, without evaluation."""
  c = default_config.get_config(algorithm)
  c.model.size = size
  c.train.steps, c.train.steps_per_call = steps, steps_per_call
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 10, 0, 0
  c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 10)
  c.checkpoint.every_minutes = 0
  return c


def one_run(size: str, steps: int, steps_per_call: int, algorithm: str) -> dict:
  """(steady tokens/s, wall seconds) of one run in a fresh workdir."""
  workdir = tempfile.mkdtemp(prefix="lsgd-sizes-")
  t0 = time.perf_counter()
  train.train_and_evaluate(run_config(size, steps, steps_per_call, algorithm), workdir)
  wall = time.perf_counter() - t0
  rates = [r["tokens_per_sec"] for r in metrics_lib.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if "tokens_per_sec" in r][1:]
  return {"tokens_per_sec": float(np.median(rates)), "wall_seconds": wall}


def main(argv):
  del argv
  if _STEPS.value % 10 or _STEPS.value < 30:
    raise app.UsageError(f"--steps={_STEPS.value}: give a multiple of 10, at least 30")
  peak = common.matmul_peak()
  raw = {(s, v): [] for s in _SIZES.value for v in VARIANTS}
  for rep in range(_REPS.value):
    for size in _SIZES.value:
      for variant, per_call in VARIANTS.items():
        r = one_run(size, _STEPS.value, per_call, _ALGORITHM.value)
        raw[size, variant].append(r)
        print(f"rep {rep + 1} {size} {variant}: {r['tokens_per_sec']:,.0f} tokens/s, "
              f"{r['wall_seconds']:.1f} s", flush=True)
  peak = float(np.median([peak, common.matmul_peak()]))
  rows = []
  for size in _SIZES.value:
    cfg = model.model_config(size, 257, 64)
    n_mm = common.matmul_params(cfg)
    row = {"size": size, "non_embedding_params": model.non_embedding_params(cfg),
           "matmul_params": n_mm}
    for variant in VARIANTS:
      tps = float(np.median([r["tokens_per_sec"] for r in raw[size, variant]]))
      wall = float(np.median([r["wall_seconds"] for r in raw[size, variant]]))
      row[variant] = {"tokens_per_sec": tps, "share_of_peak": 6 * n_mm * tps / peak,
                      "wall_seconds": wall, "runs": raw[size, variant]}
    row["loop_over_per_step"] = row["loop"]["tokens_per_sec"] / row["per_step"]["tokens_per_sec"]
    rows.append(row)
  print(f"\n{_ALGORITHM.value}, {_STEPS.value} steps of 64 x 64 byte tokens, K = 8 on 2 devices; "
        f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; median of {_REPS.value}\n")
  print("| size | N | per step: tokens/s | % of peak | wall s | loop: tokens/s | % of peak | "
        "wall s | loop / per step |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    a, b = r["per_step"], r["loop"]
    print(f"| {r['size']} | {r['non_embedding_params']:,} | {a['tokens_per_sec']:,.0f} | "
          f"{100 * a['share_of_peak']:.1f}% | {a['wall_seconds']:.1f} | "
          f"{b['tokens_per_sec']:,.0f} | {100 * b['share_of_peak']:.1f}% | "
          f"{b['wall_seconds']:.1f} | {r['loop_over_per_step']:.2f}x |")
  common.write_json(_OUT.value, {"algorithm": _ALGORITHM.value, "steps": _STEPS.value,
                                 "reps": _REPS.value, "matmul_peak_flops": peak, "rows": rows})
  print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

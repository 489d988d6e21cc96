"""The trainer's CPU loop at a git revision against the working tree, in one process (issue 11).

  python -m benchmarks.ab_commits --base=HEAD~1                      # peer workload, ~4 min
  python -m benchmarks.ab_commits --base=d67af33 --size=cpu-1 --seq_len=64 --devices=2

Two runs measured hours apart on a shared 2-core machine differ by 5-20%, which hides the few
percent a change to the model or the step is worth. This benchmark imports `lsgd_jax` twice,
the working tree's and `--base`'s (`git archive` of that revision into a temporary folder, the
package renamed `lsgd_base`), builds each one's local SGD run (K = 8 workers, H = 10, AdamW /
Nesterov, the trainer's compile options) and times it as the trainer runs on a CPU: H inner
steps as one compiled program, then the outer sync. Variants alternate, `--reps` times
`--steps` steps each; printed and written (`--out`): each side's median tokens/s and the ratio
of every repetition. Run with the same code on both sides (`--base=HEAD` on a clean tree) it
reads the machine's noise: 0.998, single repetitions within 2%, on 2026-12-06.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import functools  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from types import ModuleType  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
import lsgd_jax  # noqa: E402

_BASE = flags.DEFINE_string("base", "HEAD", "Git revision to compare the working tree with.")
_SIZE = flags.DEFINE_string("size", "cpu-base", "Model preset.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices the 8 workers are spread over.")
_REPS = flags.DEFINE_integer("reps", 5, "Interleaved repetitions.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per repetition (whole rounds of H).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/ab_commits.json", "JSON output.")

K, H, GLOBAL_BATCH, VOCAB = 8, 10, 16, 1024


def round_runner(pkg: ModuleType, tokens: np.ndarray):
  """`run(steps)`: local SGD of `pkg`'s trainer pieces, each round one compiled program of H
  steps and then the outer sync; returns after the devices finish."""
  m, o, ls, ms, rd = (importlib.import_module(f"{pkg.__name__}.{n}") for n in
                      ("model", "optim", "local_sgd", "mesh", "rounds"))
  cfg = m.model_config(_SIZE.value, vocab_size=VOCAB, max_seq_len=_SEQ.value)
  tx = o.inner_optimizer("adamw", learning_rate=1e-3, total_steps=10**6, warmup_steps=10)
  outer = o.outer_optimizer("nesterov")
  layout = ms.make_layout(K, _DEVICES.value)
  state = ls.init_state(layout, "local_sgd", functools.partial(m.init_params, cfg), tx, outer,
                        jax.random.key(0))
  step = ls.make_train_step(layout, "local_sgd", functools.partial(m.loss_fn, cfg), tx)
  options = rd.compiler_options("auto", jax.default_backend(), cfg.d_model)
  run = common.scanned_round(common.MeshRun(  # package-agnostic: the step and sync are pkg's
      step=step, sync=ls.make_outer_sync(layout, outer), batch=ms.put_global(tokens, layout.batch),
      state=state, options=options), H)
  return lambda num_steps: run.run(max(num_steps // H, 1) * H, H)


def main(_):
  tokens = np.random.default_rng(0).integers(
      0, VOCAB, (K, GLOBAL_BATCH // K, _SEQ.value + 1)).astype(np.int32)
  with tempfile.TemporaryDirectory() as tmp:
    runs = {"base": round_runner(common.package_at(_BASE.value, tmp), tokens),
            "tree": round_runner(lsgd_jax, tokens)}
    for name, run in runs.items():
      run(H)  # compile and warm up
      print(f"compiled {name}", flush=True)
    times = {name: [] for name in runs}
    for _ in range(_REPS.value):
      for name, run in runs.items():
        t0 = time.perf_counter()
        run(_STEPS.value)
        times[name].append(time.perf_counter() - t0)
  tokens_run = max(_STEPS.value // H, 1) * H * GLOBAL_BATCH * _SEQ.value
  tps = {n: [tokens_run / t for t in ts] for n, ts in times.items()}
  ratios = [b / t for b, t in zip(times["base"], times["tree"])]
  result = {"base": _BASE.value, "size": _SIZE.value, "seq_len": _SEQ.value,
            "devices": _DEVICES.value, "reps": _REPS.value, "steps": _STEPS.value,
            "tokens_per_sec": {n: float(np.median(v)) for n, v in tps.items()},
            "tokens_per_sec_all": tps, "ratio_per_rep": ratios,
            "ratio": float(np.median(tps["tree"]) / np.median(tps["base"]))}
  print(f"\n{_SIZE.value}, {_SEQ.value} tokens, K={K} on {_DEVICES.value} devices, "
        f"median of {_REPS.value} x {_STEPS.value} steps")
  for n in runs:
    print(f"  {n:5s} {result['tokens_per_sec'][n]:9,.0f} tokens/s")
  print(f"working tree / {_BASE.value}: {result['ratio']:.3f} "
        f"(per repetition {', '.join(f'{r:.3f}' for r in ratios)})")
  common.write_json(_OUT.value, result, indent=1)


if __name__ == "__main__":
  app.run(main)

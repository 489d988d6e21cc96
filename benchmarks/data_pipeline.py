"""Input pipeline alone vs what training consumes: batches per second, per config.

  python -m benchmarks.data_pipeline [--configs=tiny,default --batches=2000 --steps=20]

For each config file: the dataset build time (cold: tfds corpus, vocabulary and tokens built in
a fresh temporary data_dir; warm: everything cached), the rate of `train_batch` called directly,
the rate through `data.Prefetcher` (the thread the loop uses), and the rate at which that
config's jitted train step consumes batches (steps per second, 8 fake CPU devices, median of 3
timings of `--steps` steps). The target (issue "Real data pipeline"): the pipeline delivers at
least 20x the consumption. Writes benchmarks/results/data_pipeline.json.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import importlib.util  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from lsgd_jax import data, train  # noqa: E402

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "default"], "Config files in configs/.")
_BATCHES = flags.DEFINE_integer("batches", 2000, "Batches drawn per pipeline timing.")
_STEPS = flags.DEFINE_integer("steps", 20, "Train steps per consumption timing.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/data_pipeline.json", "JSON output.")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _rate(draw, n: int) -> float:
  t = time.perf_counter()
  for i in range(n):
    draw(i)
  return n / (time.perf_counter() - t)


def measure(name: str, data_dir: str) -> dict:
  c = _config(name)
  c.data.data_dir = data_dir
  t = time.perf_counter()
  train.build(c)  # cold: builds the tfds corpus, trains the vocabulary, tokenizes
  cold = time.perf_counter() - t
  t = time.perf_counter()
  s = train.build(c)
  warm = time.perf_counter() - t
  ds, n = s.dataset, _BATCHES.value
  direct = _rate(ds.train_batch, n)
  with data.Prefetcher(ds, 0, depth=c.data.prefetch) as it:
    prefetched = _rate(lambda _: next(it), n)
  state = s.init_state()
  batch = s.device_batch(0)
  step = s.train_step.lower(state, batch).compile()
  times = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(_STEPS.value):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  consumed = _STEPS.value / float(np.median(times))
  return {"config": name, "dataset": c.data.name, "tokenizer": c.data.tokenizer,
          "vocab_size": ds.vocab_size, "batch_shape": list(ds.train_batch(0).shape),
          "build_cold_s": cold, "build_warm_s": warm, "direct_batches_per_s": direct,
          "prefetch_batches_per_s": prefetched, "train_steps_per_s": consumed,
          "headroom": prefetched / consumed}


def main(_):
  rows = []
  for name in _CONFIGS.value:
    with tempfile.TemporaryDirectory() as d:
      rows.append(measure(name, d))
  print(f"{'config':<9} {'tokenizer':<13} {'vocab':>5} {'cold s':>7} {'warm s':>7} "
        f"{'direct b/s':>11} {'prefetch b/s':>13} {'train st/s':>11} {'headroom':>9}")
  for r in rows:
    print(f"{r['config']:<9} {r['tokenizer']:<13} {r['vocab_size']:>5} {r['build_cold_s']:>7.2f} "
          f"{r['build_warm_s']:>7.2f} {r['direct_batches_per_s']:>11.0f} "
          f"{r['prefetch_batches_per_s']:>13.0f} {r['train_steps_per_s']:>11.1f} "
          f"{r['headroom']:>8.0f}x")
  result = {"device": str(jax.devices()[0].platform), "cpu_count": os.cpu_count(),
            "target_headroom": 20, "rows": rows}
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

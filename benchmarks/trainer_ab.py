"""The issue-11 command as the trainer at a git revision runs it against the working tree's,
alternating (issue 11's own measure, "a ratio in one run").

  python -m benchmarks.trainer_ab --base=9b714dc        # ~7 min on 2 cores (3 runs each)
  python -m benchmarks.trainer_ab --base=HEAD --reps=1   # the machine's noise, ~2 min
  python -m benchmarks.trainer_ab --base= --torch_python=/tmp/torchenv/bin/python \
      --torch_variants=eager,compile                    # against PyTorch, ~13 min

`--base`'s whole tree (`git archive`) is unpacked into a temporary folder and its
`experiments.train` started from there, the working tree's from the project root, in turn,
`--reps` times each, every run with a fresh workdir, on the issue's workload
(`common.TRAINER_WORKLOAD`, the command benchmarks/trainer_memory.py runs: configs/tiny.py with
cpu-base, a 1,024-token sentencepiece vocabulary, sequence 256, 16 sequences per step, K = 8 on
8 fake CPU devices, H = 10, no evaluation, `--steps` steps), with any arguments after `--`
added to both command lines.

A run's tokens/s (`common.steady_tokens_per_sec`) is the median of the `tokens_per_sec` its
metrics.jsonl records for the log intervals after the first two rounds (the first holds the
compilations and the second the checkpoint written at the first outer sync) and before the last
(which holds the final save): the steady rounds the progress lines show. Printed and written
(`--out`): every run's records and steady tokens/s, each side's median, and the ratio working tree /
base. Revision 9b714dc is the project as it was when issue 11 was filed (the issue's table read
3,703-3,894 tokens/s for it).

`--torch_python`: an interpreter that has torch (not a project dependency; e.g. `python -m venv
--system-site-packages /tmp/torchenv && /tmp/torchenv/bin/pip install torch`) also runs
benchmarks/torch_diloco.py, the same workload as a PyTorch DiLoCo simulator (one process per
worker, one thread each), once per `--torch_variants` entry in each turn ("eager", "compile":
`torch.compile`), and the ratios working tree / each are printed too. `--base=` (empty) leaves
the revision out.

The workload's flags apply to both sides: `--workers=K` (the trainer's K workers on K fake
devices, or on `--devices` of them; PyTorch's in K processes), `--size`, `--seq_len`,
`--batch_per_worker`, `--tokenizer` (the CPU study's settings: `--size=cpu-1 --seq_len=64
--batch_per_worker=2 --tokenizer=byte --devices=2`). `--cpus` pins every run to those cores:
`--workers=1 --cpus=0` compares one worker on one core, the systems' per-core speed without
their ways of sharing cores between workers.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

from benchmarks import common
from lsgd_jax import model

_BASE = flags.DEFINE_string("base", "HEAD", "Git revision to compare the working tree with.")
_REPS = flags.DEFINE_integer("reps", 3, "Runs of each side, alternating.")
_STEPS = flags.DEFINE_integer("steps", 50, "Training steps per run (a multiple of H = 10, at "
                              "least 40 so that one steady round is left).")
_TORCH = flags.DEFINE_string("torch_python", "", "Interpreter with torch for the PyTorch "
                             "simulator (benchmarks/torch_diloco.py); empty: not run.")
_TORCH_VARIANTS = flags.DEFINE_list("torch_variants", ["eager"], "PyTorch simulator variants "
                                    "run in each turn: eager, compile.")
_WORKERS = flags.DEFINE_integer("workers", 8, "K: workers (for the PyTorch simulator one "
                                "process each).")
_SIZE = flags.DEFINE_string("size", "cpu-base", "Model preset (lsgd_jax/model.py PRESETS).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch_per_worker", 2, "Sequences per worker per step.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "sentencepiece", ["sentencepiece", "byte"],
                               "The trainer's tokenizer: sentencepiece (1,024 tokens, the issue's) "
                               "or byte (257, the CPU study's); the simulator's vocabulary follows.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake CPU devices the trainer's K workers are "
                                "spread over (0: K, one each; the CPU study runs 8 on 2).")
_CPUS = flags.DEFINE_list("cpus", [], "CPU cores every run is pinned to (os.sched_setaffinity), "
                          "e.g. 0 for a per-core comparison; empty: all.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/trainer_ab.json", "JSON output.")

H = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_trainer(tree: str, extra: list[str], workdir: str) -> tuple[list[dict], float]:
  """The issue-11 command from `tree`; returns its metrics.jsonl records and its wall time."""
  k = _WORKERS.value
  devices = _DEVICES.value or k
  cmd = [sys.executable, "-m", "experiments.train", *common.TRAINER_WORKLOAD,
         f"--workdir={workdir}", f"--config.train.steps={_STEPS.value}",
         f"--config.train.log_every={H}"]
  workload = {"model.size": _SIZE.value, "data.seq_len": _SEQ.value,
              "model.max_seq_len": _SEQ.value, "local_sgd.num_workers": k,
              "train.global_batch": k * _BATCH.value, "data.tokenizer": _TOKENIZER.value}
  # the devices: all the fake devices XLA_FLAGS makes (mesh.num_devices 0, configs/tiny.py's)
  cmd += [f"--config.{key}={value}" for key, value in workload.items()  # later flags win
          if f"--config.{key}={value}" not in common.TRAINER_WORKLOAD] + extra
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                     f" --xla_force_host_platform_device_count={devices}").strip()}
  t0 = time.monotonic()
  done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
  wall = time.monotonic() - t0
  if done.returncode:
    raise RuntimeError(f"the trainer in {tree} failed (exit {done.returncode}):\n"
                       f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()], wall


TORCH_VARIANTS = {"eager": [], "compile": ["--compile"]}


def torch_model_args() -> list[str]:
  """benchmarks/torch_diloco.py's flags for the trainer's workload (`--size`, `--seq_len`, ...)."""
  layers, width, heads, d_ff = model.PRESETS[_SIZE.value]
  vocab = 1024 if _TOKENIZER.value == "sentencepiece" else 257
  return [f"--layers={layers}", f"--width={width}", f"--heads={heads}", f"--d_ff={d_ff}",
          f"--vocab={vocab}", f"--seq_len={_SEQ.value}", f"--batch={_BATCH.value}"]


def run_torch(python: str, variant: str, out: str) -> tuple[list[dict], float]:
  """benchmarks/torch_diloco.py on the issue's workload; returns its records and wall time."""
  cmd = [python, os.path.join(ROOT, "benchmarks", "torch_diloco.py"), f"--steps={_STEPS.value}",
         f"--sync_every={H}", f"--workers={_WORKERS.value}", f"--out={out}",
         *torch_model_args(), *TORCH_VARIANTS[variant]]
  t0 = time.monotonic()
  done = subprocess.run(cmd, capture_output=True, text=True)
  wall = time.monotonic() - t0
  if done.returncode:
    raise RuntimeError(f"the PyTorch simulator failed (exit {done.returncode}):\n"
                       f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
  with open(out) as f:
    return [json.loads(line) for line in f if line.strip()], wall


def main(argv):
  extra = argv[1:]
  if _STEPS.value < 4 * H or _STEPS.value % H:
    raise app.UsageError(f"--steps={_STEPS.value}: give a multiple of H = {H} of at least {4 * H}")
  if _REPS.value < 1:
    raise app.UsageError(f"--reps={_REPS.value}: give at least 1")
  bad = [v for v in _TORCH_VARIANTS.value if v not in TORCH_VARIANTS]
  if _TORCH.value and (bad or not _TORCH_VARIANTS.value):
    raise app.UsageError(f"--torch_variants={','.join(_TORCH_VARIANTS.value)}: allowed: "
                         f"{', '.join(TORCH_VARIANTS)}")
  if _TORCH.value:
    try:
      found = subprocess.run([_TORCH.value, "-c", "import torch"], capture_output=True, text=True)
      why = (found.stderr.strip().splitlines() or [""])[-1] if found.returncode else ""
    except OSError as e:  # no such file, not executable
      why = str(e)
    if why:
      raise app.UsageError(f"--torch_python={_TORCH.value}: cannot import torch there ({why}); "
                           "make one with `python -m venv --system-site-packages /tmp/torchenv && "
                           "/tmp/torchenv/bin/pip install torch`")
  if _TORCH.value and extra:
    raise app.UsageError(f"arguments after -- ({' '.join(extra)}) change the trainer's workload, "
                         "not the PyTorch simulator's: leave them out with --torch_python")
  if _WORKERS.value < 1:
    raise app.UsageError(f"--workers={_WORKERS.value}: give at least 1")
  if _SIZE.value not in model.PRESETS:
    raise app.UsageError(f"--size={_SIZE.value}: allowed: {', '.join(model.PRESETS)}")
  if _SEQ.value < 2 or _BATCH.value < 1:
    raise app.UsageError(f"--seq_len={_SEQ.value}, --batch_per_worker={_BATCH.value}: give a "
                         "sequence of at least 2 tokens and at least 1 sequence")
  if _DEVICES.value < 0 or (_DEVICES.value and _WORKERS.value % _DEVICES.value):
    raise app.UsageError(f"--devices={_DEVICES.value}: give 0 (one per worker) or a divisor of "
                         f"--workers={_WORKERS.value}")
  if _CPUS.value:
    try:
      os.sched_setaffinity(0, {int(c) for c in _CPUS.value})  # inherited by every run
    except (ValueError, OSError) as e:
      raise app.UsageError(f"--cpus={','.join(_CPUS.value)}: not cores of this machine "
                           f"(allowed: {sorted(os.sched_getaffinity(0))}): {e}") from None
  with tempfile.TemporaryDirectory(prefix="lsgd-trainer-ab-") as tmp:
    sides = {"tree": ROOT}
    if _BASE.value:
      sides = {"base": common.unpack(_BASE.value, os.path.join(tmp, "base")), **sides}
    if _TORCH.value:
      sides.update({f"torch-{v}": v for v in _TORCH_VARIANTS.value})
    runs = {name: [] for name in sides}
    for rep in range(_REPS.value):
      for name, where in sides.items():
        workdir = os.path.join(tmp, f"work-{name}-{rep}")
        if name.startswith("torch-"):
          records, wall = run_torch(_TORCH.value, where, workdir + ".jsonl")
        else:
          records, wall = run_trainer(where, extra, workdir)
        tps = common.steady_tokens_per_sec(records, _STEPS.value, H)
        runs[name].append({"tokens_per_sec": tps, "wall_s": wall, "records": [
            {k: r[k] for k in ("step", "tokens_per_sec") if k in r} for r in records]})
        print(f"{name} run {rep + 1}: {tps:,.0f} tokens/s steady, {wall:.0f} s wall", flush=True)
  median = {n: float(np.median([r["tokens_per_sec"] for r in rs])) for n, rs in runs.items()}
  ratios = {n: median["tree"] / v for n, v in median.items() if n != "tree"}
  result = {"base": _BASE.value, "steps": _STEPS.value, "reps": _REPS.value, "extra_args": extra,
            "workers": _WORKERS.value, "cpus": _CPUS.value, "size": _SIZE.value,
            "seq_len": _SEQ.value, "batch_per_worker": _BATCH.value,
            "tokenizer": _TOKENIZER.value, "devices": _DEVICES.value or _WORKERS.value,
            "torch_python": _TORCH.value, "tokens_per_sec": median,
            "ratio": ratios.get("base"), "ratios": ratios, "runs": runs}
  if _TORCH.value:
    result["torch_version"] = subprocess.run(
        [_TORCH.value, "-c", "import torch; print(torch.__version__)"],
        capture_output=True, text=True).stdout.strip()
  label = {"base": _BASE.value, "tree": "working tree"}
  cores = f", cores {','.join(_CPUS.value)}" if _CPUS.value else ""
  print(f"\n{_SIZE.value}, {_SEQ.value} tokens x {_BATCH.value} sequences per worker, "
        f"K = {_WORKERS.value} on {_DEVICES.value or _WORKERS.value} devices{cores}, "
        f"{_STEPS.value} steps, median of {_REPS.value} runs each (steady rounds):")
  for name, v in median.items():
    ratio = f"   (working tree / this: {ratios[name]:.3f})" if name in ratios else ""
    print(f"  {label.get(name, name)}: {v:,.0f} tokens/s{ratio}")
  common.write_json(_OUT.value, result, indent=1)


if __name__ == "__main__":
  app.run(main)

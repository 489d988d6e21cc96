"""The trainer's resident memory over a run: the issue-11 command, RSS sampled beside it.

  python -m benchmarks.trainer_memory                      # ~1 min on 2 cores
  python -m benchmarks.trainer_memory --steps=50 -- --config.checkpoint.async_save=True

Starts `experiments.train` on the issue-11 workload (configs/tiny.py with cpu-base, a 1,024-token
sentencepiece vocabulary, sequence 256, 16 sequences per step, K = 8 on 8 fake CPU devices, H = 10,
no evaluation; the default checkpoint settings: a save at the first outer sync and one at the
end) as a child process, with any arguments after `--` added to its command line. Reads the
child's resident set size (/proc/PID/status VmRSS) every `--every` seconds and prints the
trainer's own lines with the RSS at each, then: the maximum, where it was reached (between
which two of the trainer's lines), the RSS over the last round, and the child's wall time.
Writes JSON (`--out`) with every sample. Linux only (/proc).

`--breakdown` first builds the same run in this process (the config with the same overrides) and
prints where the memory is planned to go: the training state's bytes per field, summed over every
device's copy (a replicated array is held once per fake device), and the temporaries XLA plans
for one call of the loop program on one device, times the devices.
"""

import os
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from benchmarks import common

_STEPS = flags.DEFINE_integer("steps", 50, "Training steps (a multiple of H = 10).")
_EVERY = flags.DEFINE_float("every", 0.1, "Seconds between RSS samples.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/trainer_memory.json", "JSON output.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "First print the state's and the loop "
                               "program's planned bytes (built in this process).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOAD = common.TRAINER_WORKLOAD
GIB = 2.0 ** 30


def _rss(pid: int) -> float | None:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024 / GIB
  except (FileNotFoundError, ProcessLookupError):
    return None
  return None


def _config(args: list[str]):
  """configs/tiny.py with the `--config.a.b=value` overrides of `args` (values cast to the
  type of the key's default; None-valued keys take Python literals)."""
  import ast  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for arg in args:
    if not arg.startswith("--config."):
      continue
    key, value = arg[len("--config."):].split("=", 1)
    *path, name = key.split(".")
    section = c
    for part in path:
      section = section[part]
    old = section[name]
    section[name] = (ast.literal_eval(value) if old is None else
                     value.lower() == "true" if isinstance(old, bool) else type(old)(value))
  return c


def breakdown(args: list[str]) -> dict:
  """Planned bytes of the run `args` describes: the state per field and the loop's temporaries."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
  import jax  # pylint: disable=import-outside-toplevel
  from lsgd_jax import data, train  # pylint: disable=import-outside-toplevel
  s = train.build(_config(args))
  state = s.init_state()
  fields = {name: sum(sh.data.nbytes for x in jax.tree.leaves(part) for sh in x.addressable_shards)
            for name, part in zip(state._fields, state)}
  prefetch = data.Prefetcher(s.dataset, start_step=0, depth=1)
  compile_run = train._compile  # pylint: disable=protected-access
  try:
    _, progs = compile_run(s, state, train.Batches(s.layout, prefetch).first(), "[breakdown]")
  finally:
    prefetch.close()
  program = progs.loop if progs.loop is not None else progs.step
  temp = program.memory_analysis().temp_size_in_bytes
  devices = s.layout.mesh.size
  print("\nplanned memory (GiB):")
  for name, nbytes in fields.items():
    if nbytes:
      print(f"  state.{name:<18s} {nbytes / GIB:6.3f}  (all devices' copies)")
  print(f"  state, total             {sum(fields.values()) / GIB:6.3f}")
  print(f"  loop temporaries         {temp * devices / GIB:6.3f}  ({temp / 2**20:.1f} MiB per "
        f"device x {devices} devices)\n", flush=True)
  return {"state_bytes": fields, "temp_bytes_per_device": temp, "devices": devices}


def main(argv):
  extra = argv[1:]
  if _STEPS.value < 10 or _STEPS.value % 10:
    raise app.UsageError(f"--steps={_STEPS.value}: give a positive multiple of H = 10")
  if not os.path.exists("/proc/self/status"):
    raise app.UsageError("this benchmark reads /proc (Linux only)")
  flags_env = os.environ.get("XLA_FLAGS", "")  # before breakdown() adds the fake devices
  planned = breakdown(WORKLOAD + extra) if _BREAKDOWN.value else None
  workdir = tempfile.mkdtemp(prefix="lsgd-memory-")
  cmd = [sys.executable, "-m", "experiments.train", *WORKLOAD, f"--workdir={workdir}",
         f"--config.train.steps={_STEPS.value}", *extra]
  env = {**os.environ, "PYTHONUNBUFFERED": "1",
         "XLA_FLAGS": f"{flags_env} --xla_force_host_platform_device_count=8".strip()}
  t0 = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines: list[tuple[float, str]] = []
  tail: list[str] = []  # the child's last lines, shown if it fails

  def read():
    for line in proc.stdout:
      line = line.rstrip()
      tail[:] = (tail + [line])[-40:]
      if line.startswith("["):  # the trainer's own lines, not absl's logging
        lines.append((time.monotonic() - t0, line))
        print(f"{lines[-1][0]:7.1f}s  rss {samples[-1][1] if samples else 0:.2f} GiB  {line}",
              flush=True)

  samples: list[tuple[float, float]] = []
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  while proc.poll() is None:
    r = _rss(proc.pid)
    if r is not None:
      samples.append((time.monotonic() - t0, r))
    time.sleep(_EVERY.value)
  reader.join()
  wall = time.monotonic() - t0
  if proc.returncode != 0 or not samples:
    raise SystemExit("\n".join(tail) + f"\nthe trainer failed (exit {proc.returncode}): {cmd}")
  t_max, r_max = max(samples, key=lambda s: s[1])
  before = [l for t, l in lines if t <= t_max]
  after = [l for t, l in lines if t > t_max]
  steps = [t for t, l in lines if f"step {_STEPS.value - 10}/" in l]
  last_round = [r for t, r in samples if steps and t >= steps[0]]
  print(f"\nmax RSS {r_max:.2f} GiB at {t_max:.1f}s, between\n  {before[-1][:90] if before else '-'}"
        f"\n  {after[0][:90] if after else '-'}")
  if last_round:
    print(f"RSS over the last round: {min(last_round):.2f}-{max(last_round):.2f} GiB")
  print(f"wall {wall:.1f}s; command: {' '.join(cmd[1:])}")
  common.write_json(_OUT.value, {
      "command": cmd[1:], "planned": planned, "max_rss_gib": r_max, "max_at_s": t_max,
      "wall_s": wall, "last_round_gib": [min(last_round), max(last_round)] if last_round else None,
      "lines": lines, "samples": samples}, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

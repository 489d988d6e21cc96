"""Sweeps for scaling-law studies: a grid of training runs, one workdir each, resumable.

A sweep config is an ordinary training config (`config.base_config()`) plus a `sweep` section of
lists (`sweep_section()` documents every key): model sizes x algorithms x sync intervals H x worker
counts K x outer optimizers x budgets x seeds x learning rates. Named sub-grids (`sweep.grids`)
replace some of those lists to add ablations; a run that several grids ask for is trained once
and belongs to all of them (the `grid` column of results.csv). Every run trains in
`workdir/<name>` under a readable name such as

    size=cpu-3,alg=local_sgd,H=10,K=8,outer=nesterov-0.7-0.9,lr=6e-3,steps=150,seed=0

In a Colab cell, as in `experiments/sweep.py`:

    runs = sweep.plan(config)              # what would run: no devices, no data
    print(sweep.describe(config, runs))    # steps, tokens and FLOPs per run; cost on hardware
    rows = sweep.run_sweep(config, "out")  # trains what is missing; out/results.csv, out/report/

Resuming: a run whose workdir holds results.json is finished and skipped; one that diverged
(failed.json) is skipped too unless `retry_failed`; any other is started in its workdir, which
resumes from its latest checkpoint. results.csv is rewritten after every run, so it is complete
for the finished runs whenever the sweep stops.

Learning-rate fairness (arXiv 2409.13198 gives DDP and local SGD the same tuned settings): with
`sweep.tune_lr_on = "ddp"` only the DDP runs try every learning rate; every other run of a size
and budget uses the learning rate whose DDP runs reached the lowest mean eval loss (over seeds and
worker counts), so it starts once those DDP runs are done. Runs go size by size, smallest first:
a sweep stopped early still has whole sizes to fit.

Runs train in this process, one after another (`train.train_and_evaluate`): JAX starts once,
the code is imported once (an edit of the sources during a long sweep does not change it half-way)
and a finished run's compiled programs are freed with its jitted functions. A subprocess per run
would isolate memory better but pays the JAX start-up per run, a large share of a small CPU run.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from lsgd_jax import config as config_lib, model

GRID_KEYS = ("sizes", "algorithms", "sync_every", "num_workers", "outer", "budgets", "seeds",
             "lrs")
BUDGETS = ("steps", "tokens", "tokens_per_param", "flops")
COLUMNS = ("grid", "model_size", "algorithm", "num_workers", "sync_every", "outer_optimizer",
           "outer_lr", "outer_momentum", "lr", "seed", "steps", "global_batch", "seq_len",
           "non_embedding_params", "tokens", "tokens_per_param", "flops", "eval_loss",
           "final_train_loss", "train_seconds", "wall_seconds", "tokens_per_sec", "comm_bytes",
           "transferred", "lr_extended", "status", "workdir")
TUNED = "tuned"  # in a grid's `lrs` / `outer`: the tuned value of the size and budget
# Peak dense bf16 FLOP/s of whole machines, for cost estimates (vendor data sheets).
HARDWARE = {"8xH100": 8 * 989e12, "8xA100": 8 * 312e12, "v5e-64": 64 * 197e12,
            "v5p-128": 64 * 459e12, "v4-64": 32 * 275e12}


def sweep_section() -> ml_collections.ConfigDict:
  """The `sweep` section: every key, its default and its meaning. Add it to a training config."""
  s = ml_collections.ConfigDict()  # the axes are tuples so that flags can replace them:
  # --config.sweep.seeds="(0, 1)" (ml_collections cannot override a list from the command line)
  s.sizes = ("cpu-tiny",)          # model presets (lsgd_jax.model.PRESETS)
  s.algorithms = ("ddp", "local_sgd")
  s.sync_every = (10,)             # H values (local SGD only; DDP runs ignore this axis)
  s.num_workers = (8,)             # K values (DDP splits its global batch the same way)
  s.outer = ("nesterov",)          # outer optimizers (local SGD only): "nesterov" / "sgd" (lr and
                                   # momentum from local_sgd.outer_lr / outer_momentum), "average"
                                   # (lr 1, momentum 0), or "NAME:LR[:MOMENTUM]"
  s.budget = "steps"               # what `budgets` count: "steps", "tokens", "tokens_per_param"
                                   # (D = r N, e.g. 20 for Chinchilla) or "flops" (steps =
                                   # C / (FLOPs per token x tokens per step)); same for every method
  s.budgets = ()                   # budget values ((): train.steps)
  s.warmup_fraction = 0.0          # > 0: optim.warmup_steps = this fraction of each run's steps
  s.seeds = (0,)
  s.lrs = ()                       # peak learning rates tried at every size ((): optim.lr)
  s.lr_per_size = ml_collections.ConfigDict()  # size -> its own list of learning rates
  s.per_size = ml_collections.ConfigDict()     # size -> nested overrides of the training config,
                                               # e.g. {"train": {"global_batch": 256}}
  s.tune_lr_on = "ddp"             # algorithm whose runs try every lr; the others use its best lr
                                   # per size and budget ("": every algorithm tries every lr)
  s.extend_lr_grid = 0             # > 0: when the best lr of a tuning group (the runs that differ
                                   # only in lr) is the grid's largest or smallest, train the next
                                   # lr beyond it (the edge spacing again), up to this many per side
  # A grid may set `lrs = ["tuned"]` and (local SGD) `outer = ["tuned"]`: its runs take the
  # learning rate / outer optimizer of the best seed-`seeds[0]` run of the same size, budget and
  # algorithm among the runs that tried them (seeds, H and K ablations at the tuned settings).
  s.grids = ml_collections.ConfigDict()  # name -> replacements of the lists above (ablations)
  s.reports = ml_collections.ConfigDict({"report": ["main"]})  # folder -> the grids whose runs
                                   # its scaling report (experiments/fit.py) fits ({}: none)
  s.n_boot = 1000                  # bootstrap resamples of the report's intervals
  return s


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid. `lr` None: tuned, known once the tuning runs of its size are done."""

  size: str
  algorithm: str
  num_workers: int
  sync_every: int                             # 1 for DDP
  outer: tuple[str, float, float] | None      # (optimizer, lr, momentum); None for DDP
  steps: int
  seed: int
  lr: float | None
  grids: tuple[str, ...] = dataclasses.field(default=(), compare=False)
  transfer: tuple[str, ...] = ()  # "lr" / "outer": taken from the tuned run (`sweep.TUNED`)
  extended: bool = dataclasses.field(default=False, compare=False)  # an lr-grid extension

  def resolved(self, lr: float, outer: tuple[str, float, float] | None) -> "Run":
    """This run with its tuned learning rate and outer optimizer filled in."""
    return dataclasses.replace(self, lr=lr, outer=outer if "outer" in self.transfer else self.outer)

  def name(self, lr: float | None = None) -> str:
    lr = self.lr if lr is None else lr
    parts = [f"size={self.size}", f"alg={self.algorithm}"]
    if self.outer is not None or self.algorithm != "ddp":
      parts.append(f"H={self.sync_every}")
    parts.append(f"K={self.num_workers}")
    if self.outer is not None:
      parts.append(f"outer={outer_name(self.outer)}")
    elif self.algorithm != "ddp" and "outer" in self.transfer:
      parts.append(f"outer={TUNED}")
    parts += [f"lr={format_lr(lr) if lr is not None else 'tuned'}", f"steps={self.steps}",
              f"seed={self.seed}"]
    return ",".join(parts)


def format_lr(v: float) -> str:
  """3e-3, 1.5e-2: short and exact to 6 digits."""
  mantissa, exponent = f"{v:.5e}".split("e")
  return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def outer_name(outer: tuple[str, float, float]) -> str:
  """"average" or "NAME-LR-MOMENTUM", e.g. "nesterov-0.7-0.9"."""
  name, lr, momentum = outer
  return "average" if name == "average" else f"{name}-{lr:g}-{momentum:g}"


def parse_outer(spec: str, ls: ml_collections.ConfigDict) -> tuple[str, float, float]:
  """"nesterov" / "sgd": the base config's lr and momentum; "average"; "NAME:LR[:MOMENTUM]"."""
  parts = str(spec).split(":")
  if parts[0] == "average":
    return ("average", 1.0, 0.0)
  if len(parts) == 1:
    return (parts[0], float(ls.outer_lr), float(ls.outer_momentum))
  try:
    return (parts[0], float(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0)
  except ValueError:
    raise ValueError(f"Bad outer optimizer {spec!r}; use 'nesterov', 'average' or "
                     "'NAME:LR[:MOMENTUM]'.") from None


# ----------------------------------------------------------------------------- configs


def _merge(c: ml_collections.ConfigDict, overrides: Any, path: str = "") -> None:
  """Nested overrides into `c`; every key must already exist (typos fail loudly)."""
  for key, value in (overrides.items() if overrides is not None else ()):
    if key not in c:
      raise ValueError(f"sweep.per_size: no config key {path + key!r}.")
    if isinstance(c[key], ml_collections.ConfigDict):
      _merge(c[key], value, f"{path}{key}.")
    else:
      c[key] = value


def training_config(config: ml_collections.ConfigDict,
                    size: str | None = None) -> ml_collections.ConfigDict:
  """The training part of a sweep config (no `sweep`), with a size's `per_size` overrides."""
  c = ml_collections.ConfigDict({k: config[k] for k in config.keys() if k != "sweep"})
  c = c.copy_and_resolve_references()
  if size is not None:
    c.model.size = size
    if "sweep" in config and size in config.sweep.per_size:
      _merge(c, config.sweep.per_size[size])
  return c


def vocab_size(data_cfg: ml_collections.ConfigDict) -> int:
  """The vocabulary a config will train with, without building the tokenizer (for estimates)."""
  return 257 if data_cfg.tokenizer == "byte" else int(data_cfg.vocab_size)


def size_stats(c: ml_collections.ConfigDict) -> tuple[int, float]:
  """(non-embedding parameters, training FLOPs per token) of a training config's model."""
  mcfg = model.model_config(c.model.size, vocab_size(c.data), c.model.max_seq_len,
                            c.model.tie_embeddings, c.model.dtype,
                            c.model.attention, c.model.attention_chunks)
  return model.non_embedding_params(mcfg), model.train_flops_per_token(mcfg, c.data.seq_len)


def budget_steps(c: ml_collections.ConfigDict, kind: str, value: float | None) -> int:
  """Training steps of a size's config under a budget; tokens per step = global batch x seq."""
  if value is None:
    return int(c.train.steps)
  tokens_per_step = c.train.global_batch * c.data.seq_len
  n, flops_per_token = size_stats(c)
  tokens = {"steps": value * tokens_per_step, "tokens": value,
            "tokens_per_param": value * n, "flops": value / flops_per_token}[kind]
  return max(1, round(tokens / tokens_per_step))


def _read_json(path: str) -> dict:
  """A JSON object from `path`, or {} if the file cannot be read as one."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def _check_finished(rundir: str, run_cfg: ml_collections.ConfigDict) -> dict | None:
  """The results of a run that finished in `rundir`, None if it has not (or its results.json
  cannot be read: training it again finishes it from its final checkpoint). Raises ValueError
  if it finished with settings that change what it trained (its config.json against
  `run_cfg`, e.g. another data.seq_len): the sweep would report the old run under the new
  settings."""
  from lsgd_jax import checkpoint  # pylint: disable=import-outside-toplevel
  results = _read_json(os.path.join(rundir, "results.json")) or None
  saved = _read_json(os.path.join(rundir, "config.json"))
  unsafe = checkpoint.config_changes(saved, run_cfg)[0] if results is not None and saved else []
  if unsafe:
    raise ValueError(f"{rundir} finished with other settings than this sweep gives it "
                     f"({'; '.join(unsafe)}); the sweep would report that run under the new "
                     "settings. Use a new --workdir for the changed sweep, or the old values.")
  return results


def run_config(config: ml_collections.ConfigDict, run: Run,
               lr: float | None = None) -> ml_collections.ConfigDict:
  """The training config of one run."""
  lr = run.lr if lr is None else lr
  if lr is None:
    raise ValueError(f"{run.name()}: its learning rate is not tuned yet.")
  c = training_config(config, run.size)
  c.algorithm, c.seed = run.algorithm, run.seed
  c.local_sgd.num_workers = run.num_workers
  if run.outer is None and run.algorithm != "ddp":
    raise ValueError(f"{run.name()}: its outer optimizer is not tuned yet.")
  if run.outer is not None:
    c.local_sgd.sync_every = run.sync_every
    c.local_sgd.outer_optimizer, c.local_sgd.outer_lr, c.local_sgd.outer_momentum = run.outer
  c.train.steps = run.steps
  if config.sweep.warmup_fraction > 0:
    c.optim.warmup_steps = min(round(config.sweep.warmup_fraction * run.steps), run.steps - 1)
  c.optim.lr, c.optim.ddp_lr = float(lr), 0.0  # the run's lr, whatever its method
  return c


# ----------------------------------------------------------------------------- planning


def grid_specs(config: ml_collections.ConfigDict) -> dict[str, dict[str, list]]:
  """"main" (the top-level lists) and every named grid (main with its replacements)."""
  sw = config.sweep
  main = {k: list(sw[k]) for k in GRID_KEYS}
  specs = {"main": main} if main["sizes"] or not sw.grids else {}  # no sizes: grids only
  for name, over in sw.grids.items():
    unknown = sorted(set(over.keys()) - set(GRID_KEYS))
    if unknown:
      raise ValueError(f"sweep.grids.{name}: unknown keys {', '.join(unknown)}; allowed: "
                       f"{', '.join(GRID_KEYS)}.")
    specs[name] = {**main, **{k: list(v) for k, v in over.items()}}
  return specs


def plan(config: ml_collections.ConfigDict) -> list[Run]:
  """Every run of the sweep, deduplicated, in the order they train (size by size, smallest
  first; at each size the learning-rate tuning runs first). Checks the whole grid up front."""
  if "sweep" not in config:
    raise ValueError("The config has no `sweep` section (see lsgd_jax.sweep.sweep_section()).")
  sw = config.sweep
  if sw.budget not in BUDGETS:
    raise ValueError(f"Unknown sweep.budget {sw.budget!r}; allowed: {', '.join(BUDGETS)}.")
  if config.train.eval_batches < 1:
    raise ValueError("A sweep fits the final eval loss: train.eval_batches must be at least 1.")
  tune_on = sw.tune_lr_on
  runs: dict[Run, list[str]] = {}
  for grid, spec in grid_specs(config).items():
    for key in ("sizes", "algorithms", "num_workers", "seeds"):
      if not spec[key]:
        raise ValueError(f"sweep grid {grid!r}: `{key}` is empty.")
    for size in spec["sizes"]:
      base = training_config(config, size)
      transfer_lr = list(spec["lrs"]) == [TUNED]
      if TUNED in spec["lrs"] and not transfer_lr or TUNED in spec["outer"] and spec["outer"] != [
          TUNED]:
        raise ValueError(f"sweep grid {grid!r}: {TUNED!r} must be the only value of its list.")
      lrs = [None] if transfer_lr else [
          float(v) for v in (sw.lr_per_size[size] if size in sw.lr_per_size
                             else spec["lrs"] or [base.optim.lr])]
      budgets = spec["budgets"] or [None]
      for alg, k, budget, seed in itertools.product(spec["algorithms"], spec["num_workers"],
                                                    budgets, spec["seeds"]):
        transfer = ("lr",) if transfer_lr else ()
        if alg == "local_sgd":
          if spec["outer"] == [TUNED]:
            transfer += ("outer",)
            variants = [(int(h), None) for h in spec["sync_every"]]
          else:
            variants = [(int(h), parse_outer(o, base.local_sgd))
                        for h, o in itertools.product(spec["sync_every"], spec["outer"])]
        else:
          variants = [(1, None)]
        tuned_here = transfer_lr or len(lrs) == 1 or not tune_on or alg == tune_on
        for (h, outer), lr in itertools.product(variants, lrs if tuned_here else [None]):
          run = Run(size, alg, int(k), h, outer, budget_steps(base, sw.budget, budget),
                    int(seed), lr, transfer=transfer if alg == "local_sgd" else
                    tuple(t for t in transfer if t == "lr"))
          runs.setdefault(run, [])
          if grid not in runs[run]:
            runs[run].append(grid)
  out = [dataclasses.replace(r, grids=tuple(g)) for r, g in runs.items()]
  for r in out:  # every run's config must validate; every tuned run needs its tuning runs
    c = run_config(config, r.resolved(r.lr or 1e-3, ("nesterov", 0.7, 0.9)))
    config_lib.validate(c)
    if r.transfer:
      if not any(not t.transfer and t.algorithm == r.algorithm and t.size == r.size
                 and t.steps == r.steps for t in out):
        raise ValueError(f"{r.name()}: it takes the tuned {' and '.join(r.transfer)} of the "
                         f"{r.algorithm} runs of size {r.size} with {r.steps} steps, but the "
                         "sweep has none that try them; add them to a grid.")
    elif r.lr is None and not any(t.lr is not None and t.algorithm == tune_on and
                                  t.size == r.size and t.steps == r.steps for t in out):
      raise ValueError(f"{r.name()}: its learning rate is tuned on {tune_on!r} runs of size "
                       f"{r.size} with {r.steps} steps, but the sweep has none; add "
                       f"{tune_on!r} to that grid's algorithms or give it a single lr.")
  sizes = {r.size: size_stats(training_config(config, r.size))[0] for r in out}
  return sorted(out, key=lambda r: (sizes[r.size], r.size, r.steps, r.lr is None,
                                    bool(r.transfer)))


def tuned_setting(rows: Sequence[dict], run: Run, seed: int
                  ) -> tuple[float, tuple[str, float, float] | None] | None:
  """(lr, outer) of the finished seed-`seed` run of lowest eval loss among the runs of `run`'s
  size, budget and algorithm that tried settings themselves (no transferred values); None if
  none finished with a finite loss."""
  best = None
  for r in rows:
    if (r["algorithm"] == run.algorithm and r["model_size"] == run.size
        and int(r["steps"]) == run.steps and int(r["seed"]) == seed and not r["transferred"]
        and r["status"] == "done" and math.isfinite(float(r["eval_loss"]))):
      if best is None or float(r["eval_loss"]) < float(best["eval_loss"]):
        best = r
  if best is None:
    return None
  outer = ((best["outer_optimizer"], float(best["outer_lr"]), float(best["outer_momentum"]))
           if best["outer_optimizer"] else None)
  return float(best["lr"]), outer


def tuned_lr(rows: Sequence[dict], size: str, steps: int, algorithm: str = "ddp") -> float | None:
  """The lr of lowest mean eval loss among finished `algorithm` runs of a size and budget
  (rows of results.csv); None if none finished with a finite loss."""
  by_lr: dict[float, list[float]] = {}
  for r in rows:
    if (r["algorithm"] == algorithm and r["model_size"] == size and int(r["steps"]) == steps
        and r["status"] == "done" and math.isfinite(float(r["eval_loss"]))):
      by_lr.setdefault(float(r["lr"]), []).append(float(r["eval_loss"]))
  if not by_lr:
    return None
  return min(by_lr, key=lambda lr: (np.mean(by_lr[lr]), lr))


# ----------------------------------------------------------------------------- rows and CSV


def _row(config: ml_collections.ConfigDict, run: Run, lr: float, rundir: str, status: str,
         results: dict | None, wall: float = math.nan) -> dict[str, Any]:
  if run.outer is None and run.algorithm != "ddp":  # only for estimates: not yet tuned
    run = run.resolved(lr, ("nesterov", 0.7, 0.9))
  c = run_config(config, run, lr)
  n, flops_per_token = size_stats(c)
  tokens = run.steps * c.train.global_batch * c.data.seq_len
  row = {"grid": "+".join(run.grids), "model_size": run.size, "algorithm": run.algorithm,
         "num_workers": run.num_workers, "sync_every": run.sync_every,
         "outer_optimizer": run.outer[0] if run.outer else "",
         "outer_lr": run.outer[1] if run.outer else "",
         "outer_momentum": run.outer[2] if run.outer else "",
         "lr": lr, "seed": run.seed, "steps": run.steps, "global_batch": c.train.global_batch,
         "seq_len": c.data.seq_len, "non_embedding_params": n, "tokens": tokens,
         "tokens_per_param": tokens / n, "flops": tokens * flops_per_token,
         "eval_loss": math.nan, "final_train_loss": math.nan, "train_seconds": math.nan,
         "wall_seconds": wall, "tokens_per_sec": math.nan, "comm_bytes": math.nan,
         "transferred": "+".join(run.transfer), "lr_extended": int(run.extended),
         "status": status, "workdir": os.path.basename(rundir)}
  for key in ("non_embedding_params", "tokens", "flops", "eval_loss", "final_train_loss",
              "train_seconds", "tokens_per_sec", "comm_bytes"):
    if results and results.get(key) is not None:
      row[key] = results[key]
  return row


def write_csv(rows: Sequence[dict], path: str) -> None:
  """results.csv, written atomically (a reader never sees half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and k != "lr" else v)
                  for k, v in r.items()})
  os.replace(tmp, path)


def read_csv(path: str) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- progress


class _Eta:
  """Wall seconds of a run ~ a + b x FLOPs (a: start-up, compile, saving), fitted to the runs
  trained so far; until two sizes have run, half of their time counts as start-up."""

  def __init__(self):
    self.obs: list[tuple[float, float]] = []

  def observe(self, flops: float, seconds: float) -> None:
    self.obs.append((flops, seconds))

  def predict(self, flops: Sequence[float]) -> float:
    if not self.obs:
      return math.nan
    x, y = np.array(self.obs).T
    a, b = 0.5 * y.mean(), 0.5 * y.sum() / max(x.sum(), 1.0)
    if np.unique(x).size >= 2:
      b_fit, a_fit = np.polyfit(x, y, 1)
      if a_fit >= 0 and b_fit >= 0:
        a, b = a_fit, b_fit
    return float(a * len(flops) + b * np.sum(flops))


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# ----------------------------------------------------------------------------- running


def run_sweep(config: ml_collections.ConfigDict, workdir: str, *, retry_failed: bool = False,
              collect_only: bool = False,
              train_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
              log: Callable[[str], None] = lambda s: print(s, flush=True)) -> list[dict]:
  """Trains every unfinished run of the sweep into `workdir/<run name>`; returns the rows of
  `workdir/results.csv`, writes a table per grid to workdir/summary.md and a scaling report per
  entry of `sweep.reports` (by default workdir/report/ for the grid `main`).

  `train_fn(config, workdir) -> results` defaults to `train.train_and_evaluate`. With
  `collect_only` nothing trains: results.csv, summary.md and the reports are rebuilt from the
  runs that finished (e.g. while another process still trains the rest). A run that
  raises FloatingPointError (diverged) gets failed.json and a row with a NaN loss; any other
  exception stops the sweep (re-run to resume). In a multi-process run every process runs the
  same loop (each run is one global program); the workdir must be a file system they all see,
  as for checkpoints, and process 0 writes the files.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from lsgd_jax import mesh as mesh_lib, train  # pylint: disable=import-outside-toplevel

  train_fn = train_fn or train.train_and_evaluate
  runs = plan(config)
  for r in runs:  # every run fits the devices (fails now, not an hour in)
    c = run_config(config, r.resolved(r.lr or 1e-3, ("nesterov", 0.7, 0.9)))
    try:
      mesh_lib.check_batch(mesh_lib.make_layout(r.num_workers, c.mesh.num_devices or None),
                           c.train.global_batch)
    except ValueError as e:
      raise ValueError(f"{r.name()}: {e}") from None
  for r in runs:  # finished runs whose settings this sweep changed: refused before any file
    if r.lr is not None and not r.transfer:  # changes (tuned runs: named later, checked then)
      _check_finished(os.path.join(workdir, r.name(r.lr)), run_config(config, r, r.lr))
  lead = jax.process_index() == 0  # every process trains every run; process 0 writes the files
  if lead:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep_config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  csv_path = os.path.join(workdir, "results.csv")
  flops = [_row(config, r, r.lr or 1e-3, "", "", None)["flops"] for r in runs]
  groups = _lr_groups(runs) if config.sweep.extend_lr_grid > 0 else {}
  tuned = sum(r.lr is None for r in runs)
  log(f"[sweep] {len(runs)} runs in {workdir}: {len({r.size for r in runs})} sizes" +
      (f", {tuned} with the learning rate tuned on {config.sweep.tune_lr_on}" if tuned else "") +
      (f"; {_extension_note(config, groups)}" if groups else ""))
  rows: list[dict] = []
  eta, t0 = _Eta(), time.perf_counter()
  counts = {"trained": 0, "skipped": 0, "failed": 0}

  def train_one(i: int, run: Run, lr: float) -> None:
    """Trains (or skips, if finished) one run and appends its row."""
    name = run.name(lr)
    at = f"[sweep {i + 1}/{len(runs)}{', lr-grid extension' if run.extended else ''}]"
    rundir = os.path.join(workdir, name)
    results_path, failed_path = (os.path.join(rundir, f) for f in ("results.json", "failed.json"))
    wall_path = os.path.join(rundir, "wall_seconds.json")
    t_run = time.perf_counter()
    run_cfg = run_config(config, run, lr)
    results = _check_finished(rundir, run_cfg)
    failed = os.path.exists(failed_path)  # diverged, or learned nothing (results.json as well)
    if (results is not None and results.get("failed_to_learn") and not failed
        and run_cfg.train.on_no_learning == "error"):
      failed = True  # killed between its results.json and failed.json
      if lead:
        with open(failed_path, "w") as f:
          json.dump({"error": results.get("verdict", "failed to learn")}, f)
    if failed and not retry_failed:
      row = _row(config, run, lr, rundir, "failed", None)
      counts["skipped"] += 1
      what = "failed before"
    elif results is not None and not failed:  # (failed with --retry_failed: trained again)
      wall = _read_json(wall_path).get("wall_seconds", math.nan)
      row = _row(config, run, lr, rundir, "done", results, wall)
      counts["skipped"] += 1
      what = "finished before"
    elif collect_only:
      counts["skipped"] += 1
      return
    else:
      log(f"{at} training {name}")
      try:
        results = train_fn(run_cfg, rundir)
        wall = time.perf_counter() - t_run
        row = _row(config, run, lr, rundir, "done", results, wall)
        what = "trained"
        if lead:
          with open(wall_path, "w") as f:
            json.dump({"wall_seconds": wall}, f)
          if os.path.exists(failed_path):
            os.remove(failed_path)
      except FloatingPointError as e:  # diverged: a result of the grid, not a bug
        if lead:
          os.makedirs(rundir, exist_ok=True)
          with open(failed_path, "w") as f:
            json.dump({"error": str(e)}, f)
        row = _row(config, run, lr, rundir, "failed", None)
        counts["failed"] += 1
        what = f"diverged ({e})"
      finally:
        gc.collect()  # the finished run's arrays; its compiled programs go with its jit objects
      counts["trained"] += 1
      eta.observe(flops[i], time.perf_counter() - t_run)
    rows.append(row)
    if lead:
      write_csv(rows, csv_path)
    left = eta.predict(flops[i + 1:])
    log(f"{at} {name}: {what}, eval loss {float(row['eval_loss']):.4f} | "
        f"{counts['trained']} trained, {counts['skipped']} skipped, {counts['failed']} failed | "
        f"elapsed {_fmt_time(time.perf_counter() - t0)}, ETA {_fmt_time(left)}")

  for i, run in enumerate(runs):
    lr = run.lr
    if run.transfer:
      tuned = tuned_setting(rows, run, int(config.sweep.seeds[0]))
      if tuned is None:
        log(f"[sweep {i + 1}/{len(runs)}] {run.name()}: no finished {run.algorithm} run of its "
            "size and budget to take its tuned settings from; not run")
        counts["failed"] += 1
        continue
      run = run.resolved(*tuned)
      lr = run.lr
    elif lr is None:
      lr = tuned_lr(rows, run.size, run.steps, config.sweep.tune_lr_on)
    if lr is None:  # every tuning run diverged
      log(f"[sweep {i + 1}/{len(runs)}] {run.name()}: no finite {config.sweep.tune_lr_on} loss "
          "to tune its learning rate on; not run")
      counts["failed"] += 1
      continue
    train_one(i, run, lr)
    key = _group_key(run)
    if key in groups and all(any(_row_of(r, run, g) for r in rows) for g in groups[key]):
      for extra in _extensions(rows, run, config.sweep.extend_lr_grid, log):
        train_one(i, dataclasses.replace(run, lr=extra, extended=True), extra)
  summary = summary_markdown(rows)
  log(summary)
  if lead:
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      f.write(summary)
  for folder, grids in (config.sweep.reports.items() if lead else ()):
    write_report(csv_path, os.path.join(workdir, folder), list(grids), n_boot=config.sweep.n_boot,
                 log=log)
  log(f"[sweep] done in {_fmt_time(time.perf_counter() - t0)}: {counts['trained']} trained, "
      f"{counts['skipped']} skipped, {counts['failed']} failed; {csv_path}")
  return rows


def _extension_note(config: ml_collections.ConfigDict, groups: dict) -> str:
  k = config.sweep.extend_lr_grid
  return (f"up to {2 * k * len(groups)} more (sweep.extend_lr_grid={k}: {k} per side of each of "
          f"{len(groups)} learning-rate grids whose best value is at its edge)")


def _group_key(run: Run) -> tuple:
  """What the runs of one lr-tuning group share: everything but the learning rate."""
  return (run.size, run.algorithm, run.num_workers, run.sync_every, run.outer, run.steps,
          run.seed)


def _lr_groups(runs: Sequence[Run]) -> dict[tuple, list[float]]:
  """Tuning groups (runs that try several lrs and differ only in it) -> their planned lrs."""
  groups: dict[tuple, list[float]] = {}
  for r in runs:
    if r.lr is not None and not r.transfer:
      groups.setdefault(_group_key(r), []).append(r.lr)
  return {k: sorted(v) for k, v in groups.items() if len(v) > 1}


def _row_of(row: dict, run: Run, lr: float) -> bool:
  """Whether a results row is `run` (its group) at learning rate `lr`."""
  return (row["model_size"] == run.size and row["algorithm"] == run.algorithm
          and int(row["num_workers"]) == run.num_workers
          and int(row["sync_every"]) == run.sync_every and int(row["steps"]) == run.steps
          and int(row["seed"]) == run.seed and float(row["lr"]) == lr
          and (row["outer_optimizer"] or None) == (run.outer[0] if run.outer else None)
          and (not run.outer or (float(row["outer_lr"]), float(row["outer_momentum"]))
               == run.outer[1:]))


def _extensions(rows: list[dict], run: Run, limit: int, log: Callable[[str], None]):
  """Yields the learning rates that extend a finished tuning group's grid while its best lr
  (lowest eval loss; a diverged run counts as +inf) is the largest or smallest tried, the edge
  spacing again each time, at most `limit` per side. `rows` grows as the caller trains each."""
  added = {"up": 0, "down": 0}
  while True:
    tried = {}
    for r in rows:
      if _row_of(r, run, float(r["lr"])):
        loss = float(r["eval_loss"])
        tried[float(r["lr"])] = loss if math.isfinite(loss) else math.inf
    lrs = sorted(tried)
    if len(lrs) < 2 or not math.isfinite(min(tried.values())):
      return
    best = min(lrs, key=lambda v: (tried[v], v))
    if best == lrs[-1] and added["up"] < limit:
      side, new = "up", lrs[-1] * lrs[-1] / lrs[-2]
    elif best == lrs[0] and added["down"] < limit:
      side, new = "down", lrs[0] * lrs[0] / lrs[1]
    else:
      if best in (lrs[0], lrs[-1]):
        log(f"[sweep] {run.name(best)}: the best lr is still at the edge of the grid after "
            f"{limit} extension(s)")
      return
    new = float(f"{new:.3g}")
    added[side] += 1
    log(f"[sweep] {run.name(best)}: the best lr {format_lr(best)} is the "
        f"{'largest' if side == 'up' else 'smallest'} of {[format_lr(v) for v in lrs]}; "
        f"extending the grid to {format_lr(new)}")
    yield new


def write_report(csv_path: str, out_dir: str, grids: Sequence[str], n_boot: int = 1000,
                 log: Callable[[str], None] = print) -> list[str]:
  """experiments/fit.py on the rows of `grids`: report.md and plots in out_dir (or a note)."""
  from lsgd_jax import report  # pylint: disable=import-outside-toplevel
  try:
    cols = report.select_grids(report.read_results(csv_path), grids)
    analysis = report.analyze(cols, n_boot=n_boot)
  except ValueError as e:
    log(f"[sweep] no scaling report: {e}")
    return []
  log(analysis.table())
  paths = report.write_report(analysis, out_dir, source=f"{os.path.basename(csv_path)} "
                                                        f"(grids {', '.join(grids)})")
  log(f"[sweep] report: {', '.join(paths)}")
  return paths


# ----------------------------------------------------------------------------- summaries


def summary_markdown(rows: Sequence[dict]) -> str:
  """A table per grid: each run's eval loss and its difference from the best DDP run of the same
  size and budget (the tuned baseline)."""
  best_ddp: dict[tuple, float] = {}
  for r in rows:
    if r["algorithm"] == "ddp" and r["status"] == "done":
      key = (r["model_size"], int(r["steps"]))
      best_ddp[key] = min(best_ddp.get(key, math.inf), float(r["eval_loss"]))
  grids = list(dict.fromkeys(g for r in rows for g in str(r["grid"]).split("+")))
  out = ["# Sweep summary", ""]
  for grid in grids:
    sel = [r for r in rows if grid in str(r["grid"]).split("+")]
    out += [f"## Grid `{grid}`", "", "| size | N | algorithm | K | H | outer | lr | seed | steps "
            "| eval loss | vs best DDP |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
      loss = float(r["eval_loss"])
      ref = best_ddp.get((r["model_size"], int(r["steps"])))
      diff = f"{loss - ref:+.4f}" if ref is not None and math.isfinite(loss) else "-"
      outer = (outer_name((r["outer_optimizer"], float(r["outer_lr"]),
                           float(r["outer_momentum"]))) if r["outer_optimizer"] else "-")
      out.append(f"| {r['model_size']} | {int(float(r['non_embedding_params'])):,} | "
                 f"{r['algorithm']} | {r['num_workers']} | "
                 f"{r['sync_every'] if r['algorithm'] != 'ddp' else '-'} | {outer} | "
                 f"{format_lr(float(r['lr']))} | {r['seed']} | {r['steps']} | "
                 f"{loss:.4f} | {diff} |")
    out.append("")
  return "\n".join(out)


def describe(config: ml_collections.ConfigDict, runs: Sequence[Run],
             hardware: str | None = None, mfu: float = 0.4) -> str:
  """The plan as a table (steps, tokens, FLOPs per run) and its total cost; with `hardware`
  (a key of HARDWARE) the hours at `mfu` of its peak."""
  lines = ["| run | grids | steps | tokens | FLOPs |", "|---|---|---|---|---|"]
  total = 0.0
  for r in runs:
    row = _row(config, r, r.lr or 1e-3, "", "", None)
    total += row["flops"]
    lines.append(f"| {r.name()} | {'+'.join(r.grids)} | {r.steps:,} | {row['tokens']:.3g} | "
                 f"{row['flops']:.3g} |")
  groups = _lr_groups(runs) if config.sweep.extend_lr_grid > 0 else {}
  lines.append(f"\n{len(runs)} runs, {total:.3g} training FLOPs in all" +
               (f"; {_extension_note(config, groups)}, not counted." if groups else "."))
  if hardware:
    if hardware not in HARDWARE:
      raise ValueError(f"Unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}.")
    hours = total / (HARDWARE[hardware] * mfu) / 3600
    lines.append(f"On {hardware} ({HARDWARE[hardware]:.3g} FLOP/s peak) at {mfu:.0%} MFU: "
                 f"{hours:,.3g} hours.")
  return "\n".join(lines)

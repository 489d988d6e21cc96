"""CPU-scale scaling study v2 (arXiv 2409.13198): DDP vs local SGD, both tuned, at 20 tokens per
parameter. docs/scaling_cpu_v2/README.md has the design (written before the runs), the results and
the findings.

Five LLaMA-style sizes from 6.7K to 227K non-embedding parameters (34x: cpu-0, cpu-1, cpu-2,
cpu-3, cpu-3b), byte tokens of the embedded Shakespeare plays (4.8M training tokens: every run
sees each token at most once), 64-token sequences, each size trained to 20 tokens per parameter
with a global batch that grows with the size (8 to 128 sequences: 1 to 16 per worker), so every
run has 260 to 1,110 steps and, at H = 10, 26 to 110 outer rounds. AdamW 0.9 / 0.95, warm-up 5%,
cosine to 10%; evaluation on 64K held-out tokens every 100 steps (for local SGD at the next outer
sync) and at the end.

Tuning (on the held-out split, seed 0): each method tunes its own peak learning rate per size and
budget on a grid a factor 2 apart, extended automatically while the best lr is at an edge
(`sweep.extend_lr_grid`); local SGD also tunes its outer optimizer over 7 settings at the three
small sizes; the large sizes use the outer setting chosen there by the rule in the design
document. Ablations at the tuned settings: workers K in {1, 2, 4, 8} at an equal global batch,
H in {5, 10, 25, 50, 100} at 80 tokens per parameter, seeds 0-4 at the small sizes and 0-2 at the
large ones,
5 / 20 / 80 tokens per parameter at cpu-1 and cpu-2 for L(D) and the compute frontier.

Parts (each resumable, committed when done; the names select grids):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m experiments.sweep --config=configs/scaling_cpu_v2.py:part1 --workdir=runs/v2
  ... :part2, :part3; `:full` (the default) is all three; `:smoke` checks the set-up in minutes.

Then: python -m experiments.fit --results=docs/scaling_cpu_v2/results.csv --study=v2
--out=docs/scaling_cpu_v2 regenerates the report from the committed CSV.
"""

import os

from lsgd_jax import report, study_report, sweep
from lsgd_jax.config import base_config

SMALL = ("cpu-0", "cpu-1", "cpu-2")
LARGE = ("cpu-3", "cpu-3b")
# Global batch (64-token sequences) per size: 1, 2, 4, 8, 16 sequences per worker (K = 8).
BATCH = {"cpu-0": 8, "cpu-1": 16, "cpu-2": 32, "cpu-3": 64, "cpu-3b": 128}
LRS_SMALL = [4e-3, 8e-3, 1.6e-2, 3.2e-2]
# Local SGD's outer optimizer grid at the small sizes: Nesterov lr x momentum, and plain averaging.
OUTER_GRID = ["nesterov:0.3:0.9", "nesterov:0.7:0.9", "nesterov:1.0:0.9",
              "nesterov:0.3:0.5", "nesterov:0.7:0.5", "nesterov:1.0:0.5", "average"]
# Parts 2 and 3 take settings from part 1's rows of the committed results, by the design's rule
# (study_report.transfer_rule): the OUTER_GRID entry with the lowest mean local SGD - DDP gap over
# the small sizes, and per size 3 lrs a factor 2 apart centred on each method's tuned lr at the
# size named here (20 tokens per parameter).
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs",
                       "scaling_cpu_v2", "results.csv")
CENTRES = {"cpu-3": "cpu-2", "cpu-3b": "cpu-2", "cpu-1": "cpu-1", "cpu-2": "cpu-2"}


def transfer(path: str = RESULTS) -> dict | None:
  """{"outer", "lrs", "gaps"} from part 1's results, or None before part 1 has finished."""
  if not os.path.exists(path):
    return None
  try:
    return study_report.transfer_rule(report.read_results(path), SMALL, OUTER_GRID, CENTRES)
  except ValueError:  # part 1 incomplete
    return None


def get_config(arg: str = "full"):
  c = base_config()
  c.algorithm = "local_sgd"       # the sweep sets it per run
  c.model.size = "cpu-1"          # the sweep sets it per run
  c.model.max_seq_len = 64
  c.data.name = "shakespeare"
  c.data.tokenizer = "byte"       # vocabulary 257
  c.data.seq_len = 64
  c.train.steps = 100             # replaced: budgets are tokens per parameter
  c.train.global_batch = 16       # replaced per size (BATCH)
  c.train.log_every = 100
  c.train.eval_every = 100        # local SGD: at the next outer sync (a multiple of H)
  c.train.eval_batches = 16       # 16 x 64 x 64 = 65,536 held-out tokens, the same for every run
  c.train.eval_batch = 64
  c.optim.lr = 8e-3
  c.optim.final_lr_fraction = 0.1
  c.local_sgd.num_workers = 8
  c.local_sgd.sync_every = 10
  c.local_sgd.outer_optimizer = "nesterov"
  c.local_sgd.outer_lr = 0.7
  c.local_sgd.outer_momentum = 0.9
  c.mesh.num_devices = 2          # 8 workers on 2 fake devices (see configs/scaling_cpu.py)

  s = c.sweep = sweep.sweep_section()
  s.sizes = list(SMALL)
  s.algorithms = ["ddp", "local_sgd"]
  s.sync_every = [10]
  s.num_workers = [8]
  s.outer = list(OUTER_GRID)
  s.seeds = [0]
  s.budget = "tokens_per_param"
  s.budgets = [20]
  s.warmup_fraction = 0.05
  s.tune_lr_on = ""               # each method tunes its own lr
  s.extend_lr_grid = 2
  s.lrs = list(LRS_SMALL)
  for size, gb in BATCH.items():
    s.per_size[size] = {"train": {"global_batch": gb}}
  tuned = {"lrs": [sweep.TUNED], "outer": [sweep.TUNED]}
  grids = {
      # part 1: the small sizes (the main grid) and their ablations
      # seeds 1-4 at every small size (amended after part 1's first runs measured a run-to-run
      # spread of ~0.06 nats at cpu-0: cheap here, and each size gets its own noise estimate)
      "seeds_small": {"sizes": list(SMALL), "seeds": [1, 2, 3, 4], **tuned},
      "workers": {"sizes": ["cpu-2"], "algorithms": ["local_sgd"], "num_workers": [1, 2, 4],
                  **tuned},
  }
  rule = transfer() if arg != "smoke" else None
  outer = rule["outer"] if rule else None
  if rule:
    for size in LARGE:  # part 2: the large sizes, outer transferred, each method its lr grid
      ddp_lrs, lsgd_lrs = rule["lrs"][size]
      grids[f"large_ddp_{size}"] = {"sizes": [size], "algorithms": ["ddp"], "lrs": ddp_lrs}
      grids[f"large_lsgd_{size}"] = {"sizes": [size], "algorithms": ["local_sgd"],
                                     "outer": [outer], "lrs": lsgd_lrs}
    grids["seeds_large"] = {"sizes": list(LARGE), "seeds": [1, 2], **tuned}
    for size in ("cpu-1", "cpu-2"):  # part 3: L(D) at 5 and 80 tokens per parameter
      ddp_lrs, lsgd_lrs = rule["lrs"][size]
      grids[f"data_ddp_{size}"] = {"sizes": [size], "algorithms": ["ddp"], "budgets": [5, 80],
                                   "lrs": ddp_lrs}
      grids[f"data_lsgd_{size}"] = {"sizes": [size], "algorithms": ["local_sgd"],
                                    "budgets": [5, 80], "outer": [outer], "lrs": lsgd_lrs}
    grids["H"] = {"sizes": ["cpu-2"], "algorithms": ["local_sgd"], "budgets": [80],
                  "sync_every": [5, 25, 50, 100], "lrs": [sweep.TUNED], "outer": [outer]}
  parts = {"part1": ["main", "seeds_small", "workers"],
           "part2": [g for g in grids if g.startswith("large_")] + ["seeds_large"],
           "part3": [g for g in grids if g.startswith("data_")] + ["H"]}
  s.grids = grids
  s.reports = {"report": ["main"] + [g for g in grids if g.startswith("large_")]}
  s.n_boot = 1000

  if arg in ("", "full"):
    return c
  if arg == "smoke":  # two small sizes, two lrs, two outer settings, 2 tokens per parameter
    s.sizes, s.lrs, s.outer, s.budgets = ["cpu-0", "cpu-1"], [8e-3, 1.6e-2], OUTER_GRID[1::5], [2]
    s.grids = {"seeds_small": {"sizes": ["cpu-0"], "seeds": [1], **tuned}}
    s.reports, s.n_boot = {"report": ["main"]}, 100
    return c
  if arg not in parts:
    raise ValueError(f"Unknown argument {arg!r}; use 'full' (default), 'part1', 'part2', "
                     "'part3' or 'smoke'.")
  keep = parts[arg]
  if arg != "part1" and outer is None:
    raise ValueError(f"{arg} needs part 1's results in {os.path.normpath(RESULTS)} (run part1, "
                     "then copy its results.csv there).")
  if "main" not in keep:  # the grids inherit the main lists, but the main grid trains nothing
    s.sizes = []
  s.grids = {g: grids[g] for g in keep if g != "main"}
  s.reports = {}  # the report fits every part: `:full`, or experiments/fit.py on results.csv
  return c

"""The full study (arXiv 2409.13198) at its real scale: 8 sizes x {DDP, local SGD} on C4, 8 workers.

    python -m experiments.sweep --config=configs/study_sweep.py --workdir=DIR
    python -m experiments.sweep --config=configs/study_sweep.py --dry_run --hardware=8xH100

Every size trains as `configs/study.py:SIZE` does (20 tokens per non-embedding parameter, global
batch from the DeepSeek LLM rule, 2048-token sequences, AdamW 0.9 / 0.95, warm-up 5%, cosine;
local SGD K = 8, H = 50, outer Nesterov 0.7 / 0.9). Learning rates: DDP tries the rule's lr
x {0.5, 1, 2} at each size and local SGD uses DDP's best (`sweep.tune_lr_on = "ddp"`: the same
tuned lr for both methods). Ablations at 100M, local SGD at the tuned lr: H in {10, 50, 200, 500},
outer optimizer Nesterov vs plain averaging, workers K in {2, 4, 8}. 8 x 4 + 6 = 38 runs.

Cost: 4.9e20 training FLOPs in all (4 runs per size, 4.8e20, plus 6 ablation runs at 100M,
1.0e19); at 40% MFU about 43 hours on one 8xH100 machine or 27 hours on a v5e-64 slice, 72% of it
the four 800M runs (docs/study.md has the table per size). The argument "small" keeps 5M .. 50M
and the ablations at 25M (3.7e18 FLOPs, about 0.3 hours on 8xH100 at 40% MFU).

The report (DIR/report/, grids `main` and `H`) fits L(N) = (N_c / N)^alpha per method; the paper
reports DDP alpha 0.069, N_c 6.06e14 and local SGD alpha 0.072, N_c 3.15e14.
"""

import importlib.util
import os

from lsgd_jax import model, sweep


def _study():
  """configs/study.py, loaded beside this file (config files are not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.py")
  spec = importlib.util.spec_from_file_location("study_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "full"):
  study = _study()
  if arg in ("", "full"):
    sizes, ablation_size = list(model.STUDY_SIZES), "100M"
  elif arg == "small":
    sizes, ablation_size = ["5M", "12M", "25M", "50M"], "25M"
  else:
    raise ValueError(f"Unknown argument {arg!r}; use 'full' (default) or 'small'.")
  c = study.get_config("100M")  # shared settings; size, batch, steps and lr are set per size
  s = c.sweep = sweep.sweep_section()
  s.sizes = sizes
  s.algorithms = ["ddp", "local_sgd"]
  s.sync_every = [50]
  s.num_workers = [8]
  s.outer = ["nesterov"]
  s.seeds = [0]
  s.budget = "steps"                 # each size's train.steps from per_size: D = 20 N
  s.budgets = []
  s.warmup_fraction = 0.05
  s.tune_lr_on = "ddp"
  for size in sizes:
    p = study.size_plan(size)
    s.per_size[size] = {"train": {"global_batch": p["global_batch"], "steps": p["steps"]}}
    s.lr_per_size[size] = [float(f"{f * p['lr']:.2g}") for f in (0.5, 1.0, 2.0)]
  ablation = {"sizes": [ablation_size], "algorithms": ["local_sgd"]}
  s.grids.H = {**ablation, "sync_every": [10, 50, 200, 500]}
  s.grids.outer = {**ablation, "outer": ["nesterov", "average"]}
  s.grids.workers = {**ablation, "num_workers": [2, 4, 8]}
  s.reports = {"report": ["main", "H"]}
  s.n_boot = 1000
  return c

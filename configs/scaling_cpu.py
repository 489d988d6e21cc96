"""CPU-scale reproduction of the scaling-law study (arXiv 2409.13198): DDP vs local SGD, 8 workers.

Five LLaMA-style sizes from 24K to 804K non-embedding parameters (34x; presets cpu-1 .. cpu-4 and
cpu-small), byte tokens of the embedded Shakespeare corpus, 64-token sequences, global batch 32
(4 per worker), 150 steps (307K tokens) per run: the same tokens and compute for both methods at
each size. AdamW 0.9 / 0.95, warm-up 15 steps, cosine to 10%. Local SGD: K = 8, H = 10, outer
Nesterov lr 0.7 momentum 0.9 (DiLoCo's defaults).

The 8 workers run on 2 of the 8 fake CPU devices, 4 per device (`mesh.num_devices = 2`): on this
2-core host XLA:CPU all-reduces among 8 device threads sometimes hung for minutes (then aborted),
and the algorithms do not depend on how workers map to devices.

Learning-rate fairness: DDP tries three peak learning rates per size (factor 2 apart, centred
where small models like them); local SGD uses the learning rate that gave DDP the lowest eval loss
at that size (`sweep.tune_lr_on = "ddp"`), so both methods train with the same tuned settings.

Ablations at cpu-3 (142K), local SGD at the tuned lr: H in {10, 50, 200} (grid `H`), outer
optimizer Nesterov (0.7, 0.9) vs plain averaging (grid `outer`), workers K in {2, 4, 8} with the
global batch fixed (grid `workers`). And the scaling grid once more with plain averaging as
the outer step (grid `average`, DDP runs shared): a second law for local SGD. 29 runs.

Command (about 35 minutes on the shared 2-core CPU; docs/scaling_cpu/README.md has the results):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m experiments.sweep --config=configs/scaling_cpu.py --workdir=/tmp/scaling_cpu

It writes /tmp/scaling_cpu/results.csv, summary.md, report/ (the fit of grids `main` and `H`:
`python -m experiments.fit --results=/tmp/scaling_cpu/results.csv --grids=main,H --out=DIR`) and
report_average/ (grid `average`).
`--config=configs/scaling_cpu.py:smoke` runs two sizes, one lr, 10 steps (4 runs, a minute or two)
to check the set-up.
"""

from lsgd_jax import sweep
from lsgd_jax.config import base_config

SIZES = ("cpu-1", "cpu-2", "cpu-3", "cpu-4", "cpu-small")
ABLATION_SIZE = "cpu-3"


def get_config(arg: str = "full"):
  c = base_config()
  c.algorithm = "local_sgd"       # the sweep sets it per run
  c.model.size = ABLATION_SIZE    # the sweep sets it per run
  c.model.max_seq_len = 128
  c.data.name = "shakespeare"     # embedded, public domain
  c.data.tokenizer = "byte"       # vocabulary 257: no tokenizer to train
  c.data.seq_len = 64
  c.train.steps = 150             # 150 x 32 x 64 = 307K tokens per run
  c.train.global_batch = 32       # 4 sequences per worker
  c.train.log_every = 50
  c.train.eval_every = 0          # evaluate once, at the end
  c.train.eval_batches = 8        # 8 x 32 x 64 = 16K held-out tokens, the same for every run
  c.train.eval_batch = 32
  c.optim.lr = 6e-3               # replaced by the sweep's learning rates
  c.optim.warmup_steps = 15
  c.optim.final_lr_fraction = 0.1
  c.local_sgd.num_workers = 8
  c.local_sgd.sync_every = 10
  c.local_sgd.outer_optimizer = "nesterov"
  c.local_sgd.outer_lr = 0.7
  c.local_sgd.outer_momentum = 0.9
  # 8 workers on 2 of the 8 fake devices (4 per device): on a 2-core host, XLA:CPU collectives
  # among 8 device threads sometimes deadlock (the all-reduce waits for device threads that
  # never run); between 2 they do not, and the math is the same (workers are mapped, not devices).
  c.mesh.num_devices = 2

  s = c.sweep = sweep.sweep_section()
  s.sizes = list(SIZES)
  s.algorithms = ["ddp", "local_sgd"]
  s.sync_every = [10]
  s.num_workers = [8]
  s.outer = ["nesterov"]
  s.seeds = [0]
  s.budget = "steps"
  s.budgets = []                  # train.steps for every size
  s.tune_lr_on = "ddp"
  for size, lrs in {"cpu-1": [4e-3, 8e-3, 1.6e-2], "cpu-2": [4e-3, 8e-3, 1.6e-2],
                    "cpu-3": [3e-3, 6e-3, 1.2e-2], "cpu-4": [2e-3, 4e-3, 8e-3],
                    "cpu-small": [2e-3, 4e-3, 8e-3]}.items():
    s.lr_per_size[size] = lrs
  ablation = {"sizes": [ABLATION_SIZE], "algorithms": ["local_sgd"]}
  s.grids.H = {**ablation, "sync_every": [10, 50, 200]}
  s.grids.outer = {**ablation, "outer": ["nesterov", "average"]}
  s.grids.workers = {**ablation, "num_workers": [2, 4, 8]}
  # The scaling grid again with plain averaging as the outer step (DDP runs are shared): a
  # second L(N) law for local SGD, `python -m experiments.fit --grids=average ...`.
  s.grids.average = {"outer": ["average"]}
  s.reports = {"report": ["main", "H"],       # Nesterov outer step (DiLoCo), with the H ablation
               "report_average": ["average"]}  # plain averaging
  s.n_boot = 1000

  if arg == "smoke":  # 4 runs of 10 steps: checks the set-up
    c.train.steps, c.optim.warmup_steps, c.train.eval_batches = 10, 2, 2
    s.sizes = ["cpu-1", "cpu-2"]
    s.lr_per_size, s.lrs = {}, [8e-3]
    s.grids = {}
    s.n_boot = 100
  elif arg not in ("", "full"):
    raise ValueError(f"Unknown argument {arg!r}; use 'full' (default) or 'smoke'.")
  return c

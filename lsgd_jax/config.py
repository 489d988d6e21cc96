"""The configuration schema: every key, its default and its meaning, in one place.

Config files in `configs/` start from `base_config()` and change what their experiment needs;
a Colab user does the same. `validate(config)` checks the values that can be checked without
devices or data and raises `ValueError` naming the bad value and what is allowed.
"""

from __future__ import annotations

import ml_collections

from lsgd_jax import data, local_sgd, model, optim


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "local_sgd"  # "local_sgd" (DiLoCo-style) or "ddp" (gradients averaged every step)
  c.seed = 0                 # parameter init and data order

  c.model = ml_collections.ConfigDict()
  c.model.size = "cpu-tiny"       # a preset of lsgd_jax.model.PRESETS ("5M" ... "800M", "cpu-*")
  c.model.dtype = "float32"       # compute dtype: "float32" or "bfloat16" (parameters stay float32)
  c.model.tie_embeddings = False  # share the input embedding with the output head
  c.model.max_seq_len = 2048      # longest sequence the model accepts

  c.data = ml_collections.ConfigDict()
  c.data.name = "shakespeare"  # "shakespeare" (embedded, public domain) or "text" (data.path)
  c.data.path = ""             # file or folder of .txt files for name="text"
  c.data.seq_len = 128         # tokens per training sequence
  c.data.val_fraction = 0.05   # share of the corpus held out for evaluation

  c.train = ml_collections.ConfigDict()
  c.train.steps = 200          # inner steps (= DDP steps): the same token budget for both
  c.train.global_batch = 32    # sequences per step over all workers (same for DDP and local SGD)
  c.train.log_every = 10       # steps between metrics.jsonl lines and progress lines
  c.train.eval_every = 50      # steps between held-out evaluations (0: only at the end)
  c.train.eval_batches = 4     # held-out batches per evaluation
  c.train.eval_batch = 32      # sequences per held-out batch (a multiple of num_workers x data)

  c.optim = ml_collections.ConfigDict()  # inner optimizer (local SGD workers) = DDP optimizer
  c.optim.name = "adamw"        # "adamw" or "sgd"
  c.optim.lr = 3e-3             # peak learning rate
  c.optim.warmup_steps = 20     # linear warm-up from 0
  c.optim.final_lr_fraction = 0.1  # cosine decay ends at this fraction of the peak
  c.optim.b1 = 0.9              # AdamW betas: the study's 0.9 / 0.95 (arXiv 2409.13198)
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1    # decoupled weight decay on matrices
  c.optim.grad_clip = 1.0       # global-norm clipping (0: off)

  c.local_sgd = ml_collections.ConfigDict()
  c.local_sgd.num_workers = 8        # K replicas; also splits DDP's batch the same way
  c.local_sgd.sync_every = 10        # H: inner steps between outer syncs
  c.local_sgd.outer_optimizer = "nesterov"  # "nesterov", "sgd", "average", or an optax name
  c.local_sgd.outer_lr = 0.7         # DiLoCo's default (arXiv 2311.08105)
  c.local_sgd.outer_momentum = 0.9   # DiLoCo's default
  c.local_sgd.outer_kwargs = ml_collections.ConfigDict()  # extra arguments of an optax optimizer
  c.local_sgd.exact_cosine = False   # exact pairwise cosine (costs a second parameter all-reduce)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0  # devices to use (0: all visible)
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError for values that are wrong whatever the devices and data."""
  if c.algorithm not in local_sgd.ALGORITHMS:
    raise ValueError(f"Unknown algorithm {c.algorithm!r}; allowed: "
                     f"{', '.join(local_sgd.ALGORITHMS)}.")
  if c.model.size not in model.PRESETS:
    raise ValueError(f"Unknown model size {c.model.size!r}; allowed: {', '.join(model.PRESETS)}.")
  if c.data.name not in data.DATASETS:
    raise ValueError(f"Unknown dataset {c.data.name!r}; allowed: {', '.join(data.DATASETS)}.")
  if c.optim.name not in optim.INNER_OPTIMIZERS:
    raise ValueError(f"Unknown inner optimizer {c.optim.name!r}; allowed: "
                     f"{', '.join(optim.INNER_OPTIMIZERS)}.")
  if c.data.seq_len < 1 or c.data.seq_len > c.model.max_seq_len:
    raise ValueError(f"data.seq_len={c.data.seq_len} must be in [1, model.max_seq_len="
                     f"{c.model.max_seq_len}].")
  if c.local_sgd.sync_every < 1:
    raise ValueError(f"local_sgd.sync_every (H) must be at least 1, got {c.local_sgd.sync_every}.")
  if c.local_sgd.num_workers < 1:
    raise ValueError(f"local_sgd.num_workers must be at least 1, got {c.local_sgd.num_workers}.")
  if c.train.steps < 1:
    raise ValueError(f"train.steps must be at least 1, got {c.train.steps}.")
  for key in ("log_every", "eval_every", "eval_batches"):
    if c.train[key] < 0:
      raise ValueError(f"train.{key} must be non-negative, got {c.train[key]}.")
  if c.algorithm == "local_sgd":  # builds the outer optimizer once to check its name and args
    optim.outer_optimizer(c.local_sgd.outer_optimizer, c.local_sgd.outer_lr,
                          c.local_sgd.outer_momentum, c.local_sgd.outer_kwargs.to_dict())

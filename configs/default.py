"""The README's default experiment: one point of the CPU scaling study v2, both methods tuned.

Local SGD (K = 8 workers, H = 10, outer Nesterov lr 0.3 momentum 0.5) against DDP on the embedded
Shakespeare plays (bytes, public domain; nothing is downloaded): the "cpu-3" model (3 layers,
width 64, 141,760 non-embedding parameters) trained to 20 tokens per parameter (692 steps of
64 x 64 tokens), each method at its own tuned peak learning rate (DDP 8e-3, local SGD 1.6e-2) and
with the outer setting the study found best at the smaller sizes (docs/scaling_cpu_v2). Evaluation
on 65,536 held-out tokens every 100 steps, always right after an outer sync for local SGD.

Command (the README's first; both runs, 2m09s on an idle 2-core CPU, 2026-12-06):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m experiments.compare --config=configs/default.py --workdir=runs/default

Measured with this command (2026-12-06, jax 0.10.2): eval loss DDP 1.6594, local SGD 1.9224, so
local SGD is 0.26 nats (16%) behind DDP at this size. The study's seed-0 runs of this exact config
(docs/scaling_cpu_v2/results.csv, trained on 2026-12-01 before the trainer's current loop
program; each beside another sweep, DDP 2m14s, local SGD 3m22s) read DDP 1.6625, local SGD
1.9232: the same gap to 0.01 nats; the runs drift apart by float reassociation over 692 steps.
Over seeds 0-2 the study reports the gap with its interval. The study finds the gap comes from
splitting the batch over 8 workers (K = 1 is within noise of DDP) and grows with N over its range.
`python -m experiments.train --config=configs/default.py:ddp --workdir=DIR` trains one method;
`--config.data.name=text --config.data.path=FILE_OR_FOLDER` trains on your own text.
"""

from lsgd_jax.config import base_config


def get_config(arg: str = "local_sgd"):
  c = base_config()
  c.algorithm = arg or "local_sgd"   # "local_sgd" or "ddp"
  c.model.size = "cpu-3"             # 3 layers, width 64
  c.model.max_seq_len = 64
  c.data.name = "shakespeare"        # embedded, public domain
  c.data.tokenizer = "byte"          # vocabulary 257
  c.data.seq_len = 64
  c.train.steps = 692                # 20 tokens per parameter: 2.83M tokens
  c.train.global_batch = 64          # 8 sequences (512 tokens) per worker
  c.train.log_every = 100
  c.train.eval_every = 100
  c.train.eval_batches = 16
  c.train.eval_batch = 64
  c.optim.lr = 1.6e-2                # local SGD's tuned peak lr at this size (the study)
  c.optim.ddp_lr = 8e-3              # DDP's tuned peak lr at this size (the study)
  c.optim.warmup_steps = 35          # 5% of the steps
  c.optim.final_lr_fraction = 0.1
  c.local_sgd.num_workers = 8
  c.local_sgd.sync_every = 10
  c.local_sgd.outer_optimizer = "nesterov"
  c.local_sgd.outer_lr = 0.3         # the study's best outer setting at 6.7K-55K parameters
  c.local_sgd.outer_momentum = 0.5
  c.mesh.num_devices = 2             # the study's layout (configs/scaling_cpu.py says why)
  return c

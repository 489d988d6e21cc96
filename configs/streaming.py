"""Communication-efficient outer syncs (experiments/streaming.py): DDP, DiLoCo, streaming DiLoCo
(P = 2, 4 fragments; tau = 0, 1, 5 overlap steps), eager updates and a bf16 / int8 / int4 wire.

The loss curves come from cpu-tiny trained for real on 8 fake CPU devices (Shakespeare, bytes,
144 steps, H = 24: six rounds, the same tokens for every run). The clock prices each step as the
100M preset processing 8,192 tokens per worker on an H100, workers joined by a 1 Gbit/s WAN link,
with every collective allowed to hide behind the backward pass (2/3 of a step).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m experiments.streaming --config=configs/streaming.py --workdir=runs/streaming
"""

from lsgd_jax.config import base_config


def get_config():
  c = base_config()
  c.model.size = "cpu-tiny"
  c.model.max_seq_len = 128
  c.data.name = "shakespeare"
  c.data.tokenizer = "byte"
  c.data.seq_len = 64
  c.train.steps = 144
  c.train.global_batch = 64        # 8 sequences per worker
  c.train.log_every = 12
  c.train.eval_every = 24
  c.train.eval_batches = 2
  c.train.eval_batch = 64
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  c.local_sgd.num_workers = 8
  c.local_sgd.sync_every = 24      # H: 6 rounds; H / P = 12 or 6 steps between fragments
  c.clock.device = "h100"
  c.clock.inter_link = "wan-10g"
  c.clock.inter_bandwidth = 1000.0  # Mbit/s per worker
  c.clock.model_size = "100M"
  c.clock.tokens_per_step = 8192
  c.clock.comm_overlap = 2 / 3
  c.checkpoint.every_minutes = 0.0
  return c

"""Edge training scenarios (experiments/edge.py): 8 phone-class workers on 20 Mbit/s uplinks.

The loss curves come from a small model trained for real on 8 fake CPU devices (cpu-tiny on the
Shakespeare plays, bytes, 300 steps); the clock prices every step as the 12M preset processing
16,384 tokens per worker on a phone (clock.DEVICES["phone"]: 4 TFLOP/s peak at 25% MFU, 8 GB)
behind an edge uplink (20 Mbit/s, 50 ms). Utilisation depends on the model size only through link
latency and the attention FLOPs (compute and bytes both scale with N), so the proxy's utilisation
is the priced model's; its seconds are the priced model's too.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m experiments.edge --config=configs/edge.py --workdir=runs/edge --out=docs/edge
"""

from lsgd_jax.config import base_config


def get_config():
  c = base_config()
  c.model.size = "cpu-tiny"
  c.model.max_seq_len = 256
  c.data.name = "shakespeare"
  c.data.tokenizer = "byte"
  c.data.seq_len = 64
  c.train.steps = 300
  c.train.global_batch = 64        # 8 sequences per worker
  c.train.log_every = 25
  c.train.eval_every = 25
  c.train.eval_batches = 2
  c.train.eval_batch = 64
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  c.local_sgd.num_workers = 8
  c.local_sgd.sync_every = 25      # H: 12 rounds
  c.clock.device = "phone"
  c.clock.inter_link = "edge-uplink"
  c.clock.model_size = "12M"
  c.clock.tokens_per_step = 16384
  c.checkpoint.every_minutes = 5.0
  return c

"""One run of the study at its real scale (arXiv 2409.13198): a size of 5M .. 800M on C4, 8 workers.

    python -m experiments.train --config=configs/study.py:100M --workdir=DIR \\
        [--config.algorithm=ddp] [--config.optim.lr=...]

The argument is one of the study's sizes, "5M" .. "800M" (non-embedding parameters; presets in
lsgd_jax/model.py, docs/model_sizes.md); "cpu" is a seconds-long stand-in with the same
structure (cpu-tiny, byte tokens of the embedded corpus) for trying the file on a laptop.

Settings (the paper gives few; the choices are ours and stated here):
  - data: C4 (`data.name="c4"`, tfds c4/en:3.0.1 prepared under data.data_dir, see
    lsgd_jax/corpora.py), a 32K SentencePiece vocabulary trained on its first documents,
    sequences of 2048 tokens;
  - tokens: 20 per non-embedding parameter (Chinchilla-style, D = 20 N), the same for DDP and
    local SGD at each size;
  - global batch and learning rate from the compute-optimal fits of DeepSeek LLM
    (arXiv 2401.02954): B = 0.292 C^0.3271 tokens, rounded to a power of two of sequences
    (at least 32, i.e. 4 per worker), and lr = 0.3118 C^-0.125, with C the run's training FLOPs
    (lsgd_jax.model.train_flops_per_token x D); configs/study_sweep.py tries lr x {0.5, 1, 2} on
    DDP and gives local SGD DDP's best (the study's fairness rule);
  - AdamW beta 0.9 / 0.95, weight decay 0.1, clipping 1.0, warm-up 5% of the steps, cosine to
    10%; bfloat16 compute, float32 parameters;
  - local SGD: 8 workers, H = 50, outer Nesterov lr 0.7 momentum 0.9 (DiLoCo's outer optimizer;
    H = 50 is between Charles et al. 2025's 30 and DiLoCo's 500 and gives 29 .. 300 outer steps).

Cost of one run (training FLOPs C = FLOPs per token x D; hours at 40% MFU of the bf16 peak;
small models reach far less MFU, but they are cheap):

| size | N | global batch | steps | tokens D | lr (rule) | C (FLOPs) | 8xH100 h | v5e-64 h |
|---|---|---|---|---|---|---|---|---|
| 5M | 4.82M | 32 | 1,472 | 96.5M | 3.1e-3 | 9.4e15 | 0.0008 | 0.0005 |
| 12M | 12.4M | 32 | 3,782 | 248M | 2.6e-3 | 4.5e16 | 0.004 | 0.0025 |
| 25M | 25.3M | 64 | 3,862 | 506M | 2.2e-3 | 1.5e17 | 0.013 | 0.008 |
| 50M | 49.6M | 64 | 7,565 | 992M | 1.9e-3 | 4.9e17 | 0.043 | 0.027 |
| 100M | 99.1M | 128 | 7,562 | 1.98B | 1.6e-3 | 1.7e18 | 0.15 | 0.095 |
| 200M | 202M | 256 | 7,722 | 4.05B | 1.4e-3 | 6.5e18 | 0.57 | 0.36 |
| 400M | 397M | 256 | 15,128 | 7.93B | 1.2e-3 | 2.3e19 | 2.0 | 1.3 |
| 800M | 793M | 512 | 15,122 | 15.9B | 1.0e-3 | 8.8e19 | 7.8 | 4.9 |

(8xH100: 8 x 989 TFLOP/s; v5e-64: 64 x 197 TFLOP/s; `python -m experiments.sweep
--config=configs/study_sweep.py --dry_run --hardware=8xH100` prints the same arithmetic.)
The whole study (configs/study_sweep.py) is in docs/study.md. Memory: each worker holds its own
parameters and AdamW state (16 bytes per parameter in float32: 12.7 GB at 800M) and the loop has
no gradient accumulation, so the 400M and 800M batches need enough devices per worker (the
mesh's `data` axis) for their activations.
"""

import math

from lsgd_jax import model
from lsgd_jax.config import base_config

SEQ_LEN = 2048
VOCAB = 32_000
TOKENS_PER_PARAM = 20  # Chinchilla-style D = 20 N


def size_plan(size: str) -> dict:
  """Global batch, steps, tokens, FLOPs and the rule's learning rate of one study size."""
  cfg = model.model_config(size, VOCAB, SEQ_LEN)
  n = model.non_embedding_params(cfg)
  tokens = TOKENS_PER_PARAM * n
  flops_per_token = model.train_flops_per_token(cfg, SEQ_LEN)
  flops = flops_per_token * tokens
  batch = max(32, 2 ** round(math.log2(0.292 * flops ** 0.3271 / SEQ_LEN)))
  steps = math.ceil(tokens / (batch * SEQ_LEN))
  return {"N": n, "global_batch": batch, "steps": steps, "tokens": steps * batch * SEQ_LEN,
          "flops": flops_per_token * steps * batch * SEQ_LEN,
          "lr": float(f"{0.3118 * flops ** -0.125:.2g}")}


def get_config(arg: str = "100M"):
  size = arg or "100M"
  if size != "cpu" and size not in model.STUDY_SIZES:
    raise ValueError(f"Unknown size {size!r}; use one of {', '.join(model.STUDY_SIZES)} or 'cpu'.")
  c = base_config()
  c.algorithm = "local_sgd"           # or "ddp": same data, batch and optimizer
  c.seed = 0
  c.model.dtype = "bfloat16"          # compute; parameters stay float32
  c.model.max_seq_len = SEQ_LEN
  c.data.name = "c4"                  # tfds c4/en:3.0.1 under data.data_dir
  c.data.path = ""                    # "": c4/en:3.0.1
  c.data.tokenizer = "sentencepiece"  # trained on C4's first documents once, cached beside it
  c.data.vocab_size = VOCAB
  c.data.seq_len = SEQ_LEN
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.eval_batches = 20           # 20 x 64 x 2048 = 2.6M held-out tokens
  c.train.eval_batch = 64
  c.optim.name = "adamw"
  c.optim.b1, c.optim.b2 = 0.9, 0.95  # the study's betas
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0
  c.optim.final_lr_fraction = 0.1
  c.local_sgd.num_workers = 8
  c.local_sgd.sync_every = 50
  c.local_sgd.outer_optimizer = "nesterov"
  c.local_sgd.outer_lr = 0.7
  c.local_sgd.outer_momentum = 0.9
  if size == "cpu":  # the same structure in seconds: tiny model, embedded corpus, byte tokens
    c.model.size, c.model.dtype, c.model.max_seq_len = "cpu-tiny", "float32", 128
    c.data.name, c.data.tokenizer, c.data.seq_len = "shakespeare", "byte", 64
    c.train.steps, c.train.global_batch, c.train.eval_every = 40, 32, 20
    c.train.eval_batches, c.train.eval_batch = 2, 32
    c.optim.lr, c.optim.warmup_steps = 3e-3, 4
    c.local_sgd.sync_every = 10
    return c
  p = size_plan(size)
  c.model.size = size
  c.train.global_batch = p["global_batch"]
  c.train.steps = p["steps"]
  c.optim.lr = p["lr"]
  c.optim.warmup_steps = round(0.05 * p["steps"])
  return c

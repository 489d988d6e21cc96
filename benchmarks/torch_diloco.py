"""A PyTorch DiLoCo simulator of issue 11's workload, the kind of baseline the issue measured
lsgd-jax against: one process per worker, one thread each, gloo collectives between them.

  python benchmarks/torch_diloco.py --steps=50 --out=/tmp/torch.jsonl   # needs torch (not a
                                                                         # project dependency)

Standalone on purpose (no jax, no lsgd_jax import), so that it runs under any interpreter that has
torch; `python -m benchmarks.trainer_ab --torch_python=PYTHON` runs it beside the trainer.

The model is lsgd-jax's `cpu-base` written in PyTorch (lsgd_jax/model.py): 4 pre-norm blocks of
width 256 with 4 heads, RMSNorm, rotary embeddings, causal attention
(`F.scaled_dot_product_attention`), a SwiGLU MLP of width 704, no biases, an untied output head
over a 1,024-token vocabulary; sequences of 256 tokens, 2 per worker per step (4,096 tokens per
step for K = 8). Each worker: AdamW (b1 0.9, b2 0.95, weight decay 0.1 on matrices, clipping at
1.0, lr 3e-3) for H steps; then the outer step, as lsgd-jax's: the pseudo-gradients (outer
parameters minus the worker's) averaged by one all-reduce of a flat buffer, a Nesterov SGD step
(lr 0.7, momentum 0.9) on the outer parameters, which every worker copies. Tokens are random (the
speed of a step does not depend on them). The learning-rate schedule is left out: it costs a
scalar per step.

Output: one JSON line per round from rank 0 (`step`, `tokens_per_sec` over the round, its outer
sync included, `sync_s`, `loss`), the same fields as the trainer's metrics.jsonl, so
`common.steady_tokens_per_sec` reads both. That the model is lsgd-jax's (the same loss and
gradients from the same weights) is checked by tests/test_peer_workload.py when
LSGD_TORCH_PYTHON names an interpreter with torch and the project's requirements.
"""

import argparse
import json
import math
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workers", type=int, default=8, help="K: processes, one worker each")
  p.add_argument("--sync_every", type=int, default=10, help="H: inner steps per round")
  p.add_argument("--steps", type=int, default=50, help="inner steps per worker (whole rounds)")
  p.add_argument("--batch", type=int, default=2, help="sequences per worker per step")
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--d_ff", type=int, default=704)
  p.add_argument("--threads", type=int, default=1, help="torch threads per process")
  p.add_argument("--optimizer", choices=("for-loop", "foreach", "fused"), default="fused",
                 help="torch AdamW implementation")
  p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
  p.add_argument("--profile", action="store_true",
                 help="print worker 0's torch.profiler table for the last round's inner steps")
  p.add_argument("--port", type=int, default=0, help="gloo rendezvous port (0: a free one)")
  p.add_argument("--out", default="", help="JSON lines output (default: stdout)")
  args = p.parse_args(argv)
  for name in ("workers", "sync_every", "steps", "batch", "seq_len", "vocab", "layers", "width",
               "heads", "d_ff", "threads"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)}: give a positive number")
  if args.steps % args.sync_every:
    p.error(f"--steps={args.steps} is not a multiple of --sync_every={args.sync_every}")
  if args.width % args.heads or (args.width // args.heads) % 2:
    p.error(f"--width={args.width} must split into --heads={args.heads} heads of even size")
  return args


def build_model(args):
  import torch
  from torch import nn
  import torch.nn.functional as F

  class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
      super().__init__()
      self.scale, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
      return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale

  def rope_tables(t, hd, theta=10_000.0):
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cos(ang), torch.sin(ang)

  def rope(x, cos, sin):  # x [B, N, T, hd]: the halves rotated, as lsgd_jax.model._rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      d, f = args.width, args.d_ff
      self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
      self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
      self.gate, self.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
      self.down = nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin):
      b, t, d = x.shape
      n = args.heads
      h = self.norm1(x)
      q, k, v = (p(h).view(b, t, n, d // n).transpose(1, 2) for p in (self.q, self.k, self.v))
      a = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
      x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
      h = self.norm2(x)
      return x + self.down(F.silu(self.gate(h)) * self.up(h))

  class Transformer(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(args.vocab, args.width)
      self.blocks = nn.ModuleList(Block() for _ in range(args.layers))
      self.norm = RMSNorm(args.width)
      self.head = nn.Linear(args.width, args.vocab, bias=False)
      cos, sin = rope_tables(args.seq_len, args.width // args.heads)
      self.register_buffer("cos", cos, persistent=False)
      self.register_buffer("sin", sin, persistent=False)
      out_std = 0.02 / math.sqrt(2 * args.layers)  # lsgd-jax's init (GPT-2's scaled residuals)
      for name, p in self.named_parameters():
        if p.ndim == 2:
          nn.init.normal_(p, std=out_std if name.endswith(("o.weight", "down.weight")) else 0.02)

    def forward(self, tokens):
      x = self.embed(tokens[:, :-1])
      for blk in self.blocks:
        x = blk(x, self.cos, self.sin)
      logits = self.head(self.norm(x))
      return F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))

  return Transformer()


def worker(rank, args, port):
  import torch
  import torch.distributed as dist

  torch.set_num_threads(args.threads)
  dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                          world_size=args.workers)
  torch.manual_seed(0)  # the same initial parameters on every worker
  model = build_model(args)
  params = list(model.parameters())
  matrices = [p for p in params if p.ndim >= 2]
  others = [p for p in params if p.ndim < 2]
  opt_kw = {"fused": True} if args.optimizer == "fused" else {
      "foreach": args.optimizer == "foreach"}
  inner = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                             {"params": others, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8, **opt_kw)
  outer_params = [p.detach().clone() for p in params]
  for p in outer_params:
    p.grad = torch.zeros_like(p)
  outer = torch.optim.SGD(outer_params, lr=0.7, momentum=0.9, nesterov=True)
  numel = sum(p.numel() for p in params)
  flat = torch.empty(numel)
  step_fn = torch.compile(model) if args.compile else model
  gen = torch.Generator().manual_seed(1 + rank)
  tokens_per_round = args.workers * args.batch * args.seq_len * args.sync_every
  out = open(args.out, "a") if (args.out and rank == 0) else sys.stdout

  dist.barrier()
  t_round, prof = time.perf_counter(), None
  for step in range(1, args.steps + 1):
    if args.profile and rank == 0 and step == args.steps - args.sync_every + 1:
      prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
      prof.start()
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
    loss = step_fn(batch)
    inner.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=args.optimizer != "for-loop")
    inner.step()
    if prof is not None and step == args.steps:
      prof.stop()
      print(f"worker 0, the last {args.sync_every} inner steps (self CPU time):\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)
    if step % args.sync_every == 0:
      t_sync = time.perf_counter()
      with torch.no_grad():  # pseudo-gradient outer - worker, averaged in one all-reduce
        offset = 0
        for p, o in zip(params, outer_params):
          flat[offset:offset + p.numel()].copy_((o - p).reshape(-1))
          offset += p.numel()
        dist.all_reduce(flat)
        flat /= args.workers
        offset = 0
        for p, o in zip(params, outer_params):
          o.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
          offset += p.numel()
        outer.step()
        for p, o in zip(params, outer_params):
          p.copy_(o)
      now = time.perf_counter()
      if rank == 0:
        print(json.dumps({"step": step, "tokens_per_sec": tokens_per_round / (now - t_round),
                          "sync_s": now - t_sync, "loss": float(loss)}), file=out, flush=True)
      t_round = now
  if out is not sys.stdout:
    out.close()
  dist.barrier()
  dist.destroy_process_group()


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main(argv=None):
  args = parse_args(argv)
  try:
    import torch.multiprocessing as mp
  except ImportError:
    sys.exit("benchmarks/torch_diloco.py needs torch, which lsgd-jax does not depend on: run it "
             "with an interpreter that has it (e.g. a venv with `pip install torch`).")
  if args.out and os.path.exists(args.out):
    os.remove(args.out)
  mp.spawn(worker, args=(args, args.port or free_port()), nprocs=args.workers, join=True)


if __name__ == "__main__":
  main()

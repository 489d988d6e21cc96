"""The training loop: `train_and_evaluate(config, workdir) -> results`.

One loop for both algorithms. Every step dispatches the jitted inner (or DDP) step; every H steps
local SGD also runs the outer sync. The host never waits for a step to finish except to evaluate:
metrics are read one logged step late.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from lsgd_jax import comm, data, local_sgd, mesh as mesh_lib, metrics as metrics_lib, model, optim
from lsgd_jax.config import validate


@dataclasses.dataclass
class Setup:
  """What a run is built from; tests and benchmarks build one and drive the pieces themselves."""

  config: ml_collections.ConfigDict
  layout: mesh_lib.Layout
  dataset: data.Dataset
  tokenizer: Any
  model_cfg: model.ModelConfig
  tx: Any
  outer_tx: Any
  loss_fn: Callable
  train_step: Callable  # jitted (state, batch) -> (state, metrics)
  outer_sync: Callable | None  # jitted state -> (state, diagnostics); None for DDP
  eval_step: Callable

  @property
  def is_local_sgd(self) -> bool:
    return self.config.algorithm == "local_sgd"

  def init_state(self) -> local_sgd.TrainState:
    rng = jax.random.key(self.config.seed)
    return local_sgd.init_state(self.layout, self.config.algorithm,
                                functools.partial(model.init_params, self.model_cfg), self.tx,
                                self.outer_tx, rng)

  def device_batch(self, step: int) -> jax.Array:
    return jax.make_array_from_process_local_data(self.layout.batch,
                                                  self.dataset.train_batch(step))

  def evaluate(self, state: local_sgd.TrainState) -> float:
    params = local_sgd.global_params(state)
    losses = [self.eval_step(params, jax.device_put(b, self.layout.batch))
              for b in self.dataset.eval_batches()]
    return float(np.mean(jax.device_get(losses)))


def build(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config and builds mesh, data, model, optimizers and jitted steps."""
  validate(config)
  c = config
  layout = mesh_lib.make_layout(c.local_sgd.num_workers, c.mesh.num_devices or None)
  per_worker = mesh_lib.check_batch(layout, c.train.global_batch)
  if c.train.eval_batches:
    mesh_lib.check_batch(layout, c.train.eval_batch)
  dataset, tokenizer = data.build_dataset(
      c.data.name, c.data.path, seq_len=c.data.seq_len, num_workers=layout.num_workers,
      batch_per_worker=per_worker, seed=c.seed, val_fraction=c.data.val_fraction,
      eval_batch_per_worker=max(c.train.eval_batch // layout.num_workers, 1),
      num_eval_batches=max(c.train.eval_batches, 1))
  mcfg = model.model_config(c.model.size, dataset.vocab_size, c.model.max_seq_len,
                            c.model.tie_embeddings, c.model.dtype)
  tx = optim.inner_optimizer(
      c.optim.name, learning_rate=c.optim.lr, total_steps=c.train.steps,
      warmup_steps=c.optim.warmup_steps, final_lr_fraction=c.optim.final_lr_fraction,
      b1=c.optim.b1, b2=c.optim.b2, weight_decay=c.optim.weight_decay,
      grad_clip_norm=c.optim.grad_clip or None)
  outer_tx = None
  if c.algorithm == "local_sgd":
    outer_tx = optim.outer_optimizer(c.local_sgd.outer_optimizer, c.local_sgd.outer_lr,
                                     c.local_sgd.outer_momentum,
                                     c.local_sgd.outer_kwargs.to_dict())
  loss_fn = functools.partial(model.loss_fn, mcfg)
  return Setup(
      config=c, layout=layout, dataset=dataset, tokenizer=tokenizer, model_cfg=mcfg, tx=tx,
      outer_tx=outer_tx, loss_fn=loss_fn,
      train_step=local_sgd.make_train_step(layout, c.algorithm, loss_fn, tx),
      outer_sync=(local_sgd.make_outer_sync(layout, outer_tx, c.local_sgd.exact_cosine)
                  if outer_tx is not None else None),
      eval_step=local_sgd.make_eval_step(layout, loss_fn))


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       name: str | None = None) -> dict[str, Any]:
  """Trains per `config`, writing config.json and metrics.jsonl to `workdir`; returns a summary."""
  s = build(config)
  c = s.config
  name = name or c.algorithm
  _write_config(c, workdir)
  print(f"[{name}] {mesh_lib.describe(s.layout)}", flush=True)
  n_params = model.non_embedding_params(s.model_cfg)
  flops_per_token = model.train_flops_per_token(s.model_cfg, c.data.seq_len)
  print(f"[{name}] model {c.model.size}: {n_params:,} non-embedding parameters, "
        f"vocab {s.model_cfg.vocab_size}", flush=True)

  state = s.init_state()
  batch = s.device_batch(0)
  # Compile ahead of time; the compiled programs also tell the bytes their collectives move.
  t0 = time.perf_counter()
  step_fn = s.train_step.lower(state, batch).compile()
  step_comm = comm.CommStats.of(comm.collectives(step_fn, s.layout.mesh))
  sync_fn, sync_comm = None, comm.CommStats(0, 0.0, {})
  if s.is_local_sgd:
    sync_fn = s.outer_sync.lower(state).compile()
    sync_comm = comm.CommStats.of(comm.collectives(sync_fn, s.layout.mesh))
  print(f"[{name}] compiled in {time.perf_counter() - t0:.1f}s; bytes per device: "
        f"{step_comm.wire_bytes:,.0f} per step, {sync_comm.wire_bytes:,.0f} per outer sync",
        flush=True)

  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(c.train.steps, f"[{name}]")
  H, total = c.local_sgd.sync_every, c.train.steps
  tokens_per_step = c.train.global_batch * c.data.seq_len
  comm_bytes, pending, last_record = 0.0, None, {}
  t_log, tokens_at_log = time.perf_counter(), 0
  train_time, t_start = 0.0, time.perf_counter()
  eval_loss = None

  def flush(p) -> dict:
    nonlocal t_log, tokens_at_log
    step, m, diag, extra = p
    now = time.perf_counter()
    losses = np.asarray(jax.device_get(m["worker_loss"]), np.float64)
    record = {"step": step, "train_loss": float(losses.mean()), **extra,
              "tokens_per_sec": (extra["tokens"] - tokens_at_log) / max(now - t_log, 1e-9),
              "grad_norm": float(np.mean(jax.device_get(m["grad_norm"])))}
    if losses.size > 1:
      record["worker_loss_std"] = float(losses.std())
      record["worker_loss_range"] = float(losses.max() - losses.min())
    if diag is not None:
      record.update({k: float(v) for k, v in jax.device_get(diag).items()})
    if not math.isfinite(record["train_loss"]):
      raise FloatingPointError(f"[{name}] training loss is {record['train_loss']} at step {step}.")
    t_log, tokens_at_log = now, extra["tokens"]
    return record

  if c.train.eval_every and c.train.eval_batches:  # the starting point of the eval curve
    writer.write({"step": 0, "tokens": 0, "comm_bytes": 0.0, "eval_loss": s.evaluate(state)})
  t_log = t_start = time.perf_counter()
  for step in range(total):
    state, m = step_fn(state, batch)
    comm_bytes += step_comm.wire_bytes
    diag = None
    last = step + 1 == total
    if sync_fn is not None and ((step + 1) % H == 0 or last):
      # A last, incomplete round still ends with a sync so the run yields one global model.
      state, diag = sync_fn(state)
      comm_bytes += sync_comm.wire_bytes
    if not last:
      batch = s.device_batch(step + 1)  # prepared while the device works
    if pending is not None:
      last_record = flush(pending)
      writer.write(last_record)
      progress.update(last_record["step"], last_record)
      pending = None
    extra = {"tokens": (step + 1) * tokens_per_step, "comm_bytes": comm_bytes,
             "sim_flops": (step + 1) * tokens_per_step * flops_per_token}
    want_eval = last or (c.train.eval_every and (step + 1) % c.train.eval_every == 0)
    if want_eval and c.train.eval_batches:
      jax.block_until_ready(state)  # the wait for training work counts as training time
      t_eval = time.perf_counter()
      eval_loss = s.evaluate(state)
      extra["eval_loss"] = eval_loss
      t_log += time.perf_counter() - t_eval  # evaluation time is not training throughput
    if last or want_eval or (c.train.log_every and (step + 1) % c.train.log_every == 0):
      pending = (step + 1, m, diag, extra)
  jax.block_until_ready(state)
  if pending is not None:
    last_record = flush(pending)
    writer.write(last_record)
    progress.update(last_record["step"], last_record)
  train_time = time.perf_counter() - t_start

  results = {
      "algorithm": c.algorithm, "model_size": c.model.size, "non_embedding_params": n_params,
      "num_workers": s.layout.num_workers, "sync_every": H if s.is_local_sgd else 1,
      "steps": total, "tokens": total * tokens_per_step,
      "flops": total * tokens_per_step * flops_per_token,
      "final_train_loss": last_record.get("train_loss"), "eval_loss": eval_loss,
      "tokens_per_sec": total * tokens_per_step / train_time, "train_seconds": train_time,
      "comm_bytes": comm_bytes, "comm_bytes_per_step": step_comm.wire_bytes,
      "comm_bytes_per_sync": sync_comm.wire_bytes,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  print(f"[{name}] done: eval loss {eval_loss if eval_loss is None else round(eval_loss, 4)}, "
        f"{metrics_lib.format_count(results['tokens_per_sec'])} tok/s, "
        f"{metrics_lib.format_count(comm_bytes)}B communicated per device, "
        f"{metrics_lib.format_duration(train_time)}", flush=True)
  return results


def compare_algorithms(config: ml_collections.ConfigDict, workdir: str,
                       algorithms: tuple[str, ...] = ("local_sgd", "ddp")) -> dict[str, dict]:
  """Trains each algorithm on the same data and budget into `workdir/<algorithm>`, then prints a
  side-by-side table and writes `workdir/comparison.png` (eval loss against tokens) and
  `workdir/comparison.json`."""
  results, curves = {}, {}
  for algorithm in algorithms:
    c = config.copy_and_resolve_references()
    c.algorithm = algorithm
    run_dir = os.path.join(workdir, algorithm)
    results[algorithm] = train_and_evaluate(c, run_dir)
    curves[_label(c)] = metrics_lib.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  if jax.process_index() == 0:
    print(comparison_table(results), flush=True)
    metrics_lib.plot_eval_curves(curves, os.path.join(workdir, "comparison.png"),
                                 title=f"{config.model.size} on {config.data.name}")
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def _label(c: ml_collections.ConfigDict) -> str:
  if c.algorithm == "ddp":
    return "DDP"
  return (f"local SGD (K={c.local_sgd.num_workers}, H={c.local_sgd.sync_every}, "
          f"{c.local_sgd.outer_optimizer})")


def comparison_table(results: dict[str, dict]) -> str:
  rows = [("algorithm", "final eval loss", "tokens", "tokens/s", "bytes/device", "time")]
  for name, r in results.items():
    rows.append((name, f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-",
                 metrics_lib.format_count(r["tokens"]),
                 metrics_lib.format_count(r["tokens_per_sec"]),
                 metrics_lib.format_count(r["comm_bytes"]) + "B",
                 metrics_lib.format_duration(r["train_seconds"])))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)

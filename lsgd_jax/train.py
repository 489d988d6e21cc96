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
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lsgd_jax import checkpoint, data, local_sgd, model, optim, tokenizers
from lsgd_jax import distributed, pricing
from lsgd_jax import rounds as rounds_lib
from lsgd_jax import mesh as mesh_lib
from lsgd_jax import metrics as metrics_lib
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
  train_step: Callable  # jitted (state, batch[, active]) -> (state, metrics); `active` [K] under
  #                       edge.policy "budget" with unequal speeds (see rounds.Rounds.step_args)
  outer_sync: Callable | None  # jitted state -> (state, diagnostics); None for DDP
  eval_step: Callable
  cluster_tx: Any = None  # hierarchical local SGD: the in-cluster outer optimizer
  cluster_sync: Callable | None = None  # hierarchical: jitted (state, weights) -> (state, diag)

  @property
  def is_local_sgd(self) -> bool:
    return self.config.algorithm == "local_sgd"

  def init_state(self) -> local_sgd.TrainState:
    rng = jax.random.key(self.config.seed)
    return local_sgd.init_state(self.layout, self.config.algorithm,
                                functools.partial(model.init_params, self.model_cfg), self.tx,
                                self.outer_tx, rng, cluster_tx=self.cluster_tx)

  def device_batch(self, step: int, host_batch: np.ndarray | None = None) -> jax.Array:
    """The batch of `step` on the mesh; `host_batch` if given (e.g. from a data.Prefetcher)."""
    if host_batch is None:
      host_batch = self.dataset.train_batch(step)
    # Every process holds the same global batch (a pure function of the step) and copies only
    # its own devices' rows to them.
    return mesh_lib.put_global(host_batch, self.layout.batch)

  def evaluate(self, state: local_sgd.TrainState) -> float:
    params = local_sgd.global_params(state)
    losses = [self.eval_step(params, mesh_lib.put_global(b, self.layout.batch))
              for b in self.dataset.eval_batches()]
    return float(np.mean(jax.device_get(losses)))


def build(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config and builds mesh, data, model, optimizers and jitted steps."""
  validate(config)
  c = config
  hierarchical = c.algorithm == "local_sgd" and c.local_sgd.num_clusters > 1
  layout = mesh_lib.make_layout(c.local_sgd.num_workers, c.mesh.num_devices or None,
                                num_clusters=c.local_sgd.num_clusters if hierarchical else None,
                                two_stage=c.local_sgd.two_stage)
  per_worker = mesh_lib.check_batch(layout, c.train.global_batch)
  if c.train.eval_batches:
    mesh_lib.check_batch(layout, c.train.eval_batch)
  # Process 0 builds the corpus and vocabulary caches first; other processes then read them.
  dataset, tokenizer = distributed.process_zero_first(functools.partial(
      data.build_dataset,
      c.data.name, c.data.path, seq_len=c.data.seq_len, num_workers=layout.num_workers,
      batch_per_worker=per_worker, seed=c.seed, val_fraction=c.data.val_fraction,
      eval_batch_per_worker=max(c.train.eval_batch // layout.num_workers, 1),
      num_eval_batches=max(c.train.eval_batches, 1), data_dir=c.data.data_dir,
      tokenizer=c.data.tokenizer, vocab_size=c.data.vocab_size, text_field=c.data.text_field,
      domain_field=c.data.domain_field, non_iid=c.data.non_iid,
      dirichlet_alpha=c.data.dirichlet_alpha))
  mcfg = model.model_config(c.model.size, dataset.vocab_size, c.model.max_seq_len,
                            c.model.tie_embeddings, c.model.dtype,
                            c.model.attention)
  tx = optim.inner_optimizer(
      c.optim.name, learning_rate=c.optim.lr, total_steps=c.train.steps,
      warmup_steps=c.optim.warmup_steps, final_lr_fraction=c.optim.final_lr_fraction,
      b1=c.optim.b1, b2=c.optim.b2, weight_decay=c.optim.weight_decay,
      grad_clip_norm=c.optim.grad_clip or None)
  skip = c.train.on_nonfinite == "skip"
  if skip:  # a step with non-finite gradients leaves parameters and optimizer state unchanged
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)
  outer_tx = cluster_tx = None
  if hierarchical:
    cluster_tx = optim.outer_optimizer(c.local_sgd.cluster_outer_optimizer,
                                       c.local_sgd.cluster_outer_lr,
                                       c.local_sgd.cluster_outer_momentum)
  if c.algorithm == "local_sgd":
    outer_tx = optim.outer_optimizer(c.local_sgd.outer_optimizer, c.local_sgd.outer_lr,
                                     c.local_sgd.outer_momentum,
                                     c.local_sgd.outer_kwargs.to_dict())
  loss_fn = functools.partial(model.loss_fn, mcfg)
  return Setup(
      config=c, layout=layout, dataset=dataset, tokenizer=tokenizer, model_cfg=mcfg, tx=tx,
      outer_tx=outer_tx, loss_fn=loss_fn,
      train_step=local_sgd.make_train_step(layout, c.algorithm, loss_fn, tx,
                                           masked=rounds_lib.budget_policy(c)),
      outer_sync=(local_sgd.make_outer_sync(layout, outer_tx, c.local_sgd.exact_cosine,
                                            skip_nonfinite=skip)
                  if outer_tx is not None else None),
      eval_step=local_sgd.make_eval_step(layout, loss_fn), cluster_tx=cluster_tx,
      cluster_sync=(local_sgd.make_cluster_sync(layout, cluster_tx, c.local_sgd.exact_cosine,
                                                skip_nonfinite=skip) if hierarchical else None))


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


class Preempted(Exception):
  """Raised after a SIGTERM / SIGINT once the checkpoint is written; re-run to resume."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    super().__init__(f"stopped by signal {signum} at step {step}; a checkpoint was saved: re-run "
                     "the same command to resume.")


class _SignalFlag:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps (main thread only)."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _truncate_metrics(path: str, step: int) -> None:
  """Drops records past the checkpoint so a resumed run's metrics read as an uninterrupted one."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  keep = [r for r in metrics_lib.read_jsonl(path) if r["step"] <= step]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in keep)


def _nonfinite(record: dict) -> str | None:
  for key in ("train_loss", "grad_norm", "pseudo_grad_norm"):
    v = record.get(key)
    if v is not None and not math.isfinite(v):
      return f"{key} = {v}"
  return None


def _restore_or_init(s: Setup, workdir: str, tag: str):
  """(checkpointer, state, meta, abstract state): the latest restorable checkpoint, or a fresh
  state with empty meta.

  Resume order: abstract state -> latest restorable checkpoint -> config and tokenizer checks ->
  data position (the caller then truncates metrics.jsonl to the checkpoint's step).
  """
  c = s.config
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=c.checkpoint.max_to_keep,
                                 every_steps=c.checkpoint.every_steps,
                                 every_minutes=c.checkpoint.every_minutes,
                                 async_save=c.checkpoint.async_save)
  abstract = jax.eval_shape(s.init_state)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          abstract, local_sgd.state_shardings(s.layout, abstract))
  restored = ckpt.restore_latest(abstract)
  if restored is None:
    return ckpt, s.init_state(), {}, abstract
  state, meta = restored
  for line in checkpoint.check_compatible(meta["config"], c):
    print(f"{tag} resuming with a changed setting: {line}", flush=True)
  tokenizers.check_identity(meta["tokenizer"], s.tokenizer)
  s.dataset.load_state_dict(meta["data"])
  return ckpt, state, meta, abstract


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       name: str | None = None) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Writes config.json, metrics.jsonl, checkpoints/, export/ (the final global model) and
  results.json; returns the results. Raises `Preempted` after saving on SIGTERM / SIGINT and
  FloatingPointError on divergence under `train.on_nonfinite = "stop"`.
  """
  s = build(config)
  c = s.config
  name = name or c.algorithm
  tag = f"[{name}]"
  results_path = os.path.join(workdir, "results.json")
  print(f"{tag} {mesh_lib.describe(s.layout)}", flush=True)
  n_params = model.non_embedding_params(s.model_cfg)
  flops_per_token = model.train_flops_per_token(s.model_cfg, c.data.seq_len)
  print(f"{tag} model {c.model.size}: {n_params:,} non-embedding parameters, "
        f"vocab {s.model_cfg.vocab_size}", flush=True)

  ckpt, state, meta, abstract = _restore_or_init(s, workdir, tag)
  _write_config(c, workdir)
  start = int(meta.get("step", 0))
  total, H = c.train.steps, c.local_sgd.sync_every
  if start >= total and os.path.exists(results_path):
    ckpt.close()
    print(f"{tag} already finished ({start} steps); results in {results_path}", flush=True)
    with open(results_path) as f:
      return json.load(f)
  if start:
    print(f"{tag} resumed from the checkpoint at step {start}", flush=True)
    _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start)

  prefetch = data.Prefetcher(s.dataset, start_step=start, depth=c.data.prefetch)
  batch = s.device_batch(start, next(prefetch)[1])
  hier = s.cluster_sync is not None
  rounds = rounds_lib.Rounds(c, s.layout, c.local_sgd.cluster_sync_every if hier else H,
                  global_steps=H if hier else None)
  t0 = time.perf_counter()
  progs = rounds_lib.Programs(s, state, batch, rounds)
  if hier:
    print(f"{tag} hierarchical: {progs.cluster_comm.wire_bytes:,.0f} bytes per device per cluster "
          f"sync (every {progs.h1} steps)", flush=True)
  sim = pricing.sim_clock(c, s.layout, s.model_cfg)
  if sim is not None:
    sim.load_state_dict(meta.get("sim", {"seconds": meta.get("sim_time", 0.0)}))
  print(f"{tag} compiled in {time.perf_counter() - t0:.1f}s; bytes per device: "
        f"{progs.step_comm.wire_bytes:,.0f} per step, {progs.sync_comm.wire_bytes:,.0f} per outer "
        "sync", flush=True)
  memory = pricing.memory_report(c, s.layout, s.model_cfg, s.is_local_sgd)
  if memory is not None:
    print(f"{tag} memory of one {c.clock.device} worker device: {memory.verdict}", flush=True)
  if rounds.budget:
    print(f"{tag} budget policy: inner steps per round by worker {rounds.steps.tolist()}",
          flush=True)
  poison = jax.jit(lambda st: st._replace(params=jax.tree.map(
      lambda x: x.at[c.faults.nan_worker].set(jnp.nan), st.params)), donate_argnums=0)

  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(total, tag)
  tokens_per_step = c.train.global_batch * c.data.seq_len
  comm_bytes = float(meta.get("comm_bytes", 0.0))
  skipped_rounds = jnp.asarray(meta.get("skipped_rounds", 0.0), jnp.float32)
  pending, last_record, eval_loss = None, {}, None
  last_good = int(meta["step"]) if meta else None
  t_log = time.perf_counter()
  tokens_at_log = start * tokens_per_step

  def flush(p) -> dict:
    nonlocal t_log, tokens_at_log
    step, m, diag, extra = p
    m = mesh_lib.fetch(m)  # per-worker metrics span every process's devices; waits for the step
    now = time.perf_counter()  # after the wait: the host may run ahead of the devices
    losses = np.asarray(m["worker_loss"], np.float64)
    record = {"step": step, "train_loss": float(losses.mean()), **extra,
              "tokens_per_sec": (extra["tokens"] - tokens_at_log) / max(now - t_log, 1e-9),
              "grad_norm": float(np.mean(m["grad_norm"]))}
    if losses.size > 1:
      record["worker_loss_std"] = float(losses.std())
      record["worker_loss_range"] = float(losses.max() - losses.min())
    if "skipped_steps" in m:
      record["skipped_steps"] = int(np.sum(m["skipped_steps"]))
    if diag is not None:
      record.update({k: float(v) for k, v in jax.device_get(diag).items()})
    if s.is_local_sgd:
      record["skipped_rounds"] = float(extra.pop("skipped_rounds"))
    bad = _nonfinite(record)
    if bad and c.train.on_nonfinite == "stop":
      where = (f"the last good checkpoint is step {last_good} in {ckpt.directory}"
               if last_good is not None else "no checkpoint was saved before it")
      raise FloatingPointError(
          f"{tag} training diverged: {bad} at step {step}; {where}. Lower optim.lr, or set "
          "train.on_nonfinite='skip' to skip non-finite steps and rounds.")
    t_log, tokens_at_log = now, extra["tokens"]
    return record

  def save(step: int, m, diag) -> None:
    nonlocal last_good
    if c.train.on_nonfinite == "stop":  # never keep a diverged state (one host sync per save)
      probe = {"train_loss": float(np.mean(mesh_lib.fetch(m["worker_loss"]))),
               "grad_norm": float(np.mean(mesh_lib.fetch(m["grad_norm"])))}
      if diag is not None:
        probe["pseudo_grad_norm"] = float(diag.get("pseudo_grad_norm", 0.0))
      if _nonfinite(probe):
        return
    ckpt.save(step, state, {
        "step": step, "data": prefetch.state_dict(step), "comm_bytes": comm_bytes,
        "skipped_rounds": float(skipped_rounds), "tokenizer": tokenizers.describe(s.tokenizer),
        "sim_time": sim.seconds if sim is not None else 0.0,
        "sim": sim.state_dict() if sim is not None else {},
        "config": json.loads(c.to_json_best_effort())})
    last_good = step

  if start == 0 and c.train.eval_every and c.train.eval_batches:  # start of the eval curve
    writer.write({"step": 0, "tokens": 0, "comm_bytes": 0.0, "eval_loss": s.evaluate(state)})
  t_log = t_start = time.perf_counter()
  m = diag = None
  try:
    with _SignalFlag() as stop:
      for step in range(start, total):
        if step == c.faults.nan_step:
          state = poison(state)  # fault injection: one worker's parameters become NaN
        state, m = progs.step(state, batch, *rounds.step_args(step))
        comm_bytes += progs.step_comm.wire_bytes
        if sim is not None:
          sim.step()
        last = step + 1 == total
        state, diag, scope, moved = progs.outer_syncs(state, step, last)
        if scope is not None:
          comm_bytes += moved
          if "outer_skipped" in diag:
            skipped_rounds = skipped_rounds + diag["outer_skipped"]
          if sim is not None:  # clock.py prices a global sync with its in-cluster stages
            sim.sync(scope)
        if not last:
          batch = s.device_batch(step + 1, next(prefetch)[1])  # prepared while the device works
        if pending is not None:
          last_record = flush(pending)
          writer.write(last_record)
          progress.update(last_record["step"], last_record)
          pending = None
        extra = {"tokens": (step + 1) * tokens_per_step, "comm_bytes": comm_bytes,
                 "flops": (step + 1) * tokens_per_step * flops_per_token}
        if sim is not None:
          extra["sim_time"] = sim.seconds
          extra["sim_utilisation"] = sim.utilisation
        if s.is_local_sgd:
          extra["skipped_rounds"] = skipped_rounds
        want_eval = last or (c.train.eval_every and (step + 1) % c.train.eval_every == 0)
        if want_eval and c.train.eval_batches:
          jax.block_until_ready(state)  # the wait for training work counts as training time
          t_eval = time.perf_counter()
          eval_loss = s.evaluate(state)
          extra["eval_loss"] = eval_loss
          t_log += time.perf_counter() - t_eval  # evaluation time is not training throughput
        if last or want_eval or (c.train.log_every and (step + 1) % c.train.log_every == 0):
          pending = (step + 1, m, diag, extra)
        if stop.signum is not None or (not last and ckpt.due(step + 1)):
          if pending is not None:  # metrics up to the checkpoint are written before it
            last_record = flush(pending)
            writer.write(last_record)
            pending = None
          save(step + 1, m, diag)
        if stop.signum is not None:
          print(f"{tag} stopped by signal {stop.signum} at step {step + 1}: checkpoint saved in "
                f"{ckpt.directory}; re-run the same command to resume.", flush=True)
          raise Preempted(stop.signum, step + 1)
    jax.block_until_ready(state)
    prefetch.close()
    if pending is not None:
      last_record = flush(pending)
      writer.write(last_record)
      progress.update(last_record["step"], last_record)
  except BaseException:
    prefetch.close()
    ckpt.close()  # a save in flight completes: the last good checkpoint is kept
    raise

  train_time = time.perf_counter() - t_start
  save(total, m, diag)
  export_dir = checkpoint.export_model(
      os.path.join(workdir, "export"), local_sgd.global_params(state), s.model_cfg,
      {"tokenizer": tokenizers.describe(s.tokenizer),
       "config": json.loads(c.to_json_best_effort())})
  ckpt.close()

  results = {
      "algorithm": c.algorithm, "model_size": c.model.size, "non_embedding_params": n_params,
      "num_workers": s.layout.num_workers, "sync_every": H if s.is_local_sgd else 1,
      "steps": total, "tokens": total * tokens_per_step,
      "flops": total * tokens_per_step * flops_per_token,
      "final_train_loss": last_record.get("train_loss"), "eval_loss": eval_loss,
      "tokens_per_sec": (total - start) * tokens_per_step / train_time,
      "train_seconds": train_time, "resumed_from": start,
      "comm_bytes": comm_bytes, "comm_bytes_per_step": progs.step_comm.wire_bytes,
      "comm_bytes_per_sync": progs.sync_comm.wire_bytes, "export": export_dir,
      **({"sim_time": sim.seconds, "sim_comm_time": sim.comm_seconds,
          "sim_utilisation": sim.utilisation} if sim is not None else {"sim_time": None}),
  }
  if memory is not None:
    results.update(memory_fits=memory.fits, memory_gb=memory.total / 1e9,
                   memory_capacity_gb=memory.capacity / 1e9)
  if s.is_local_sgd:
    results["skipped_rounds"] = float(skipped_rounds)
  if jax.process_index() == 0:
    with open(results_path, "w") as f:
      json.dump(results, f, indent=2)
  print(f"{tag} done: eval loss {eval_loss if eval_loss is None else round(eval_loss, 4)}, "
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


def evaluate_exported(directory: str) -> dict[str, float]:
  """Held-out loss and perplexity of an exported model (`workdir/export`), on the data of the
  run that trained it (its config is stored beside the parameters)."""
  model_cfg, params, info = checkpoint.load_model(directory)
  config = ml_collections.ConfigDict(info["config"])
  s = build(config)
  tokenizers.check_identity(info["tokenizer"], s.tokenizer)
  if s.model_cfg != model_cfg:
    raise ValueError(f"The exported model {model_cfg} does not match its config's {s.model_cfg}.")
  params = jax.device_put(params, s.layout.replicated)
  loss = float(np.mean([jax.device_get(s.eval_step(params, mesh_lib.put_global(b, s.layout.batch)))
                        for b in s.dataset.eval_batches()]))
  return {"eval_loss": loss, "perplexity": math.exp(loss),
          "non_embedding_params": model.non_embedding_params(model_cfg)}

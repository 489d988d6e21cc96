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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lsgd_jax import checkpoint, data, distributed, faults, local_sgd, model, optim, periodic
from lsgd_jax import pricing, streaming, tokenizers, verdict
from lsgd_jax import config as config_lib
from lsgd_jax import workdir as workdir_lib
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
                                self.outer_tx, rng, cluster_tx=self.cluster_tx,
                                streaming=(streaming.Streaming.of(self.config.local_sgd)
                                           if self.is_local_sgd else None))

  def device_batch(self, step: int, host_batch: np.ndarray | None = None) -> jax.Array:
    """The batch of `step` on the mesh; `host_batch` if given (e.g. from a data.Prefetcher)."""
    if host_batch is None:
      host_batch = self.dataset.train_batch(step)
    # Every process holds the same global batch (a pure function of the step) and copies only
    # its own devices' rows to them.
    return mesh_lib.put_global(host_batch, self.layout.batch)

  def evaluate(self, state: local_sgd.TrainState) -> float:
    params = local_sgd.global_params(state)
    losses = []
    for b in self.dataset.eval_batches():
      losses.append(self.eval_step(params, mesh_lib.put_global(b, self.layout.batch)))
      if len(losses) % 8 == 0:  # at most 8 programs in flight: with dozens queued on fake CPU
        jax.block_until_ready(losses[-1])  # devices, XLA:CPU's all-reduce rendezvous timed out
    return float(np.mean(jax.device_get(losses)))


def build(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config and builds mesh, data, model, optimizers and jitted steps."""
  validate(config)
  c = config
  if c.model.attention == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"model.attention='cudnn' needs a GPU (cuDNN's fused attention); this run's "
                     f"devices are {jax.default_backend()!r}: use 'auto' or 'xla'.")
  hierarchical = c.algorithm == "local_sgd" and c.local_sgd.num_clusters > 1
  layout = mesh_lib.make_layout(c.local_sgd.num_workers, c.mesh.num_devices or None,
                                num_clusters=c.local_sgd.num_clusters if hierarchical else None,
                                two_stage=config_lib.two_stage(c.local_sgd.two_stage),
                                shard_outer=config_lib.shard_outer(c))
  config_lib.check_outer_layout(c, layout.two_stage)
  per_worker = mesh_lib.check_batch(layout, c.train.global_batch)
  group = layout.num_workers * layout.data_axis_size
  if c.train.eval_batches and c.train.eval_batch % group:
    raise ValueError(f"train.eval_batch={c.train.eval_batch} (held-out sequences per batch) is not "
                     f"divisible by num_workers x data devices = {group}; allowed: multiples of "
                     f"{group}.")
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
                            c.model.attention, c.model.attention_chunks)
  skip = c.train.on_nonfinite == "skip"
  tx, outer_tx, cluster_tx = _optimizers(c.optim, c.local_sgd, c.algorithm, c.train.steps,
                                         hierarchical, skip)
  speeds = faults.parse_speeds(c.edge.speeds, c.local_sgd.num_workers, c.seed)
  loss_fn = functools.partial(model.loss_fn, mcfg)
  return Setup(
      config=c, layout=layout, dataset=dataset, tokenizer=tokenizer, model_cfg=mcfg, tx=tx,
      outer_tx=outer_tx, loss_fn=loss_fn,
      train_step=local_sgd.make_train_step(
          layout, c.algorithm, loss_fn, tx,
          masked=rounds_lib.budget_policy(c.algorithm, c.edge.policy, speeds)),
      outer_sync=(streaming.make(layout, outer_tx, streaming.Streaming.of(c.local_sgd),
                                 c.local_sgd.sync_every, c.local_sgd.exact_cosine,
                                 skip_nonfinite=skip)
                  if outer_tx is not None else None),
      eval_step=local_sgd.make_eval_step(layout, loss_fn), cluster_tx=cluster_tx,
      cluster_sync=(local_sgd.make_cluster_sync(layout, cluster_tx, c.local_sgd.exact_cosine,
                                                skip_nonfinite=skip) if hierarchical else None))


def _optimizers(o: ml_collections.ConfigDict, ls: ml_collections.ConfigDict, algorithm: str,
                total_steps: int, hierarchical: bool, skip_nonfinite: bool):
  """(inner, outer, in-cluster outer) optimizers from the `optim` and `local_sgd` sections; the
  outer ones are None where the algorithm has none."""
  lr = o.ddp_lr if algorithm == "ddp" and o.ddp_lr else o.lr
  tx = optim.inner_optimizer(
      o.name, learning_rate=lr, total_steps=total_steps, warmup_steps=o.warmup_steps,
      final_lr_fraction=o.final_lr_fraction, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
      grad_clip_norm=o.grad_clip or None)
  if skip_nonfinite:  # a step with non-finite gradients leaves parameters and optimizer state
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)  # unchanged
  outer_tx = cluster_tx = None
  if hierarchical:
    cluster_tx = optim.outer_optimizer(ls.cluster_outer_optimizer, ls.cluster_outer_lr,
                                       ls.cluster_outer_momentum)
  if algorithm == "local_sgd":
    outer_tx = optim.outer_optimizer(ls.outer_optimizer, ls.outer_lr, ls.outer_momentum,
                                     ls.outer_kwargs.to_dict())
  return tx, outer_tx, cluster_tx


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


Preempted = periodic.Preempted  # raised after a signal once the checkpoint is written


def _truncate_metrics(path: str, step: int) -> None:
  """Drops records past the checkpoint (every record when starting from step 0) so a resumed
  run's metrics read as an uninterrupted one."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  keep = [r for r in metrics_lib.read_jsonl(path) if r["step"] <= step] if step else []
  with open(path + ".tmp", "w") as f:  # replaced whole: a kill meanwhile leaves the old file
    f.writelines(json.dumps(r) + "\n" for r in keep)
  os.replace(path + ".tmp", path)


def _checkpointer(ck: ml_collections.ConfigDict, workdir: str,
                  first_step: int) -> checkpoint.Checkpointer:
  """The run's checkpointer, per the `checkpoint` section (the first timed save at
  `first_step`, the first outer sync)."""
  return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=ck.max_to_keep, every_steps=ck.every_steps,
                                 every_minutes=ck.every_minutes, async_save=ck.async_save,
                                 first_step=first_step)


def _restore_or_init(s: Setup, ckpt: checkpoint.Checkpointer, tag: str):
  """(state, meta): the latest restorable checkpoint, or a fresh state with empty meta.

  Resume order: abstract state -> latest restorable checkpoint -> config and tokenizer checks ->
  data position (the caller then truncates metrics.jsonl to the checkpoint's step).
  """
  abstract = jax.eval_shape(s.init_state)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          abstract, local_sgd.state_shardings(s.layout, abstract))
  def check(meta):  # before the state is read: a changed shape is refused, never "damage"
    for line in checkpoint.check_compatible(meta["config"], s.config):
      if line.startswith(("train.steps:", "optim.warmup_steps:", "optim.final_lr_fraction:")):
        line += (" (the learning-rate schedule follows it: the steps already trained used the "
                 "old one, so the result differs from a fresh run with the new value)")
      print(f"{tag} resuming with a changed setting: {line}", flush=True)
  restored = ckpt.restore_latest(abstract, check_meta=check)
  if restored is None:
    return s.init_state(), {}
  state, meta = restored
  tokenizers.check_identity(meta["tokenizer"], s.tokenizer)
  s.dataset.load_state_dict(meta["data"])
  return state, meta


def _compile(s: Setup, state: local_sgd.TrainState, batch: jax.Array, tag: str):
  """(rounds, programs): who contributes to each round and the compiled step and syncs."""
  c = s.config
  hier = s.cluster_sync is not None
  rounds = rounds_lib.Rounds(rounds_lib.RoundSpec.of(c), s.layout,
                             c.local_sgd.cluster_sync_every if hier else c.local_sgd.sync_every,
                             global_steps=c.local_sgd.sync_every if hier else None)
  per_step = rounds.budget or isinstance(s.outer_sync, streaming.Factory)
  backend, width = jax.default_backend(), s.model_cfg.d_model
  options = rounds_lib.compiler_options(c.train.library_fusion, backend, width)
  per_call = steps_per_call(c.train.steps_per_call, per_step)
  progs = rounds_lib.Programs(
      s.layout, s.train_step, s.outer_sync, s.cluster_sync, state, batch, rounds,
      per_call=per_call, options=options,
      one_step_options=rounds_lib.step_options(options, backend, width) if per_call == 1 else None)
  if hier:
    print(f"{tag} hierarchical: {progs.cluster_comm.wire_bytes:,.0f} bytes per device per cluster "
          f"sync (every {progs.h1} steps)", flush=True)
  return rounds, progs


def _pricing(s: Setup):
  """(simulated clock, memory report) of the run; both None with clock.device = ""."""
  c = s.config
  priced = pricing.priced_model(c.clock.model_size, c.data.seq_len, s.model_cfg)
  tokens = pricing.tokens_per_device_step(c.clock.tokens_per_step, c.train.global_batch,
                                          c.data.seq_len, s.layout)
  speeds = (None if c.edge.speeds == "" else
            faults.parse_speeds(c.edge.speeds, s.layout.num_workers, c.seed))
  sim = pricing.sim_clock(c.clock, s.layout, priced, algorithm=c.algorithm,
                          seq_len=c.data.seq_len, tokens_per_step=tokens,
                          sync_every=c.local_sgd.sync_every,
                          cluster_sync_every=c.local_sgd.cluster_sync_every, speeds=speeds,
                          policy=c.edge.policy,
                          streaming=pricing.streaming_run(c.local_sgd, c.algorithm))
  memory = pricing.memory_report(c.clock.device, s.layout, priced, seq_len=c.data.seq_len,
                                 tokens_per_step=tokens, local_sgd=s.is_local_sgd)
  return sim, memory


def _poison(worker: int) -> Callable:
  """Fault injection: a jitted state -> state in which `worker`'s parameters are NaN."""
  return jax.jit(lambda st: st._replace(params=jax.tree.map(
      lambda x: x.at[worker].set(jnp.nan), st.params)), donate_argnums=0)


def _checkpoint_meta(step: int, prefetch: data.Prefetcher, tally: periodic.Tally,
                     tokenizer: dict, config: dict) -> dict:
  """The `meta` item of the checkpoint at `step` (see checkpoint.py)."""
  sim = tally.sim
  return {"step": step, "data": prefetch.state_dict(step), "comm_bytes": tally.comm_bytes,
          "skipped_rounds": float(tally.skipped_rounds), "tokenizer": tokenizer,
          "sim_time": sim.seconds if sim is not None else 0.0,
          "sim": sim.state_dict() if sim is not None else {}, "config": config,
          "devices": jax.device_count()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       name: str | None = None) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Writes config.json, metrics.jsonl and TensorBoard events, checkpoints/, export/ (the final
  global model), results.json and, with train.profile_steps, profile/; returns the results.
  Holds the workdir's lock throughout (workdir.claim: a second run on it is refused). Raises `Preempted` after saving on SIGTERM / SIGINT (during the
  final save and export: once they are written), `workdir.Interrupted` on a signal while setting
  up, FloatingPointError on divergence under `train.on_nonfinite = "stop"`, and
  `verdict.FailedToLearn` after writing results.json for a run that learned nothing under
  `train.on_no_learning = "error"`.
  """
  workdir = os.fspath(workdir)
  validate(config)  # (a dict, a misspelt key: one line before the workdir is touched)
  with workdir_lib.claim(workdir, lead=jax.process_index() == 0), \
      workdir_lib.stop_on_signal(f"[{name or config.algorithm}]"):
    return _train_and_evaluate(config, workdir, name)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        name: str | None) -> dict[str, Any]:
  s = build(config)
  c = s.config
  periodic.map_large_blocks(config_lib.mmap_threshold_mib(c.train.mmap_threshold_mib,
                                                          jax.default_backend()))
  tag = f"[{name or c.algorithm}]"
  print(f"{tag} {mesh_lib.describe(s.layout)}", flush=True)
  print(f"{tag} model {c.model.size}: {model.non_embedding_params(s.model_cfg):,} non-embedding "
        f"parameters, vocab {s.model_cfg.vocab_size}", flush=True)
  ckpt = _checkpointer(c.checkpoint, workdir, c.local_sgd.sync_every)
  state, meta = _restore_or_init(s, ckpt, tag)
  start = int(meta.get("step", 0))
  results_path = os.path.join(workdir, "results.json")
  results = _read_results(results_path, tag) if start >= c.train.steps else None
  if results is not None:  # finished: config.json keeps the settings it was trained with
    if not checkpoint.export_present(os.path.join(workdir, "export")):
      print(f"{tag} the exported model in {os.path.join(workdir, 'export')} is missing or "
            "damaged: writing it again from the final checkpoint", flush=True)
      _export(s, workdir, state)
    ckpt.close()
    print(f"{tag} already finished ({start} steps); results in {results_path}", flush=True)
    return _judged(results, c)
  _write_config(c, workdir)
  if start:
    print(f"{tag} resumed from the checkpoint at step {start}", flush=True)
  _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start)

  prefetch = data.Prefetcher(s.dataset, start_step=start, depth=c.data.prefetch)
  batches = Batches(s.layout, prefetch)
  t0 = time.perf_counter()
  rounds, progs = _compile(s, state, batches.first(), tag)
  periodic.release_free_memory()  # what building, initialising and compiling freed
  sim, memory = _pricing(s)
  _print_compiled(tag, time.perf_counter() - t0, progs, rounds, memory, c.clock.device)
  tally = periodic.Tally(meta, sim, tokens_per_step=c.train.global_batch * c.data.seq_len,
                         flops_per_token=model.train_flops_per_token(s.model_cfg, c.data.seq_len),
                         local_sgd=s.is_local_sgd)
  writer = metrics_lib.MetricWriter(workdir, purge_step=start)
  if start == 0 and c.train.eval_every and c.train.eval_batches:  # start of the eval curve
    every = _eval_every(s)
    if every != c.train.eval_every:
      print(f"{tag} evaluating every {every} steps: train.eval_every={c.train.eval_every} rounded "
            f"up to a multiple of H={c.local_sgd.sync_every}, so that local SGD is scored right "
            "after an outer sync", flush=True)
    writer.write({"step": 0, "tokens": 0, "comm_bytes": 0.0, "eval_loss": s.evaluate(state)})
  t_start = time.perf_counter()
  state, end, acts, pending = _train(s, workdir, ckpt, prefetch, writer, tally, progs, rounds,
                                     state, batches, meta, start, tag)
  train_time = time.perf_counter() - t_start
  eval_loss, last_record = acts.evaluation.loss, acts.log.last_record
  with periodic.SignalFlag() as late:  # the final save and export complete before a signal acts
    if end is not None:
      acts.checkpoints.save(end)
    else:  # the final checkpoint was saved, results.json was not (killed between): finish from it
      eval_loss = s.evaluate(state) if c.train.eval_batches else None
      last_record = _last_record(workdir, start)
    writer.close()
    results = _finish(s, workdir, ckpt, state, progs, tally, memory, eval_loss, last_record,
                      start, train_time, tag)
  signum = late.signum if late.signum is not None else pending
  if signum is not None:  # (pending: after the last step's check, before the final save)
    print(f"{tag} signal {signum} arrived during the final save and export; they completed "
          f"first: results in {results_path}.", flush=True)
    raise Preempted(signum, c.train.steps)
  return _judged(results, c)


def _read_results(path: str, tag: str) -> dict | None:
  """A finished run's results.json, or None if it is missing or unreadable (cut short or edited:
  the run then finishes again from its final checkpoint and writes it anew)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      results = json.load(f)
    if isinstance(results, dict):
      return results
    why = f"a JSON {type(results).__name__}, not an object"
  except (OSError, ValueError) as e:
    why = f"{type(e).__name__}: {e}"
  print(f"{tag} {path} cannot be read ({why}); finishing the run again from its final "
        "checkpoint", flush=True)
  return None


def _export(s: Setup, workdir: str, state: local_sgd.TrainState) -> str:
  """Writes workdir/export: the global model, its tokenizer and the config."""
  return checkpoint.export_model(
      os.path.join(workdir, "export"), local_sgd.global_params(state), s.model_cfg,
      {"tokenizer": tokenizers.describe(s.tokenizer),
       "config": json.loads(s.config.to_json_best_effort())})


def _metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  return metrics_lib.read_jsonl(path) if os.path.exists(path) else []


def _last_record(workdir: str, step: int) -> dict:
  """The metrics record of `step` (empty if there is none)."""
  records = [r for r in _metrics(workdir) if r["step"] == step]
  return records[-1] if records else {}


def _judged(results: dict, c: ml_collections.ConfigDict) -> dict:
  """`results`, or FailedToLearn if they say the run failed to learn and the config says stop."""
  if results.get("failed_to_learn") and c.train.on_no_learning == "error":
    raise verdict.FailedToLearn(f"{results['verdict']}; results.json records it (set "
                                "train.on_no_learning='warn' to keep going after such a run).")
  return results


def _print_compiled(tag: str, seconds: float, progs: rounds_lib.Programs,
                    rounds: rounds_lib.Rounds, memory, device: str) -> None:
  print(f"{tag} compiled in {seconds:.1f}s; bytes per device: "
        f"{progs.step_comm.wire_bytes:,.0f} per step, {progs.sync_comm.wire_bytes:,.0f} per outer "
        "sync", flush=True)
  if memory is not None:
    print(f"{tag} memory of one {device} worker device: {memory.verdict}", flush=True)
  if rounds.budget:
    print(f"{tag} budget policy: inner steps per round by worker {rounds.steps.tolist()}",
          flush=True)


class _Actions(NamedTuple):
  """The periodic actions of a run; `ordered()` is the order the loop calls them in."""

  evaluation: periodic.Evaluation
  log: periodic.MetricsLog
  checkpoints: periodic.Checkpointing
  profile: periodic.Profile | None
  preemption: periodic.Preemption
  memory: periodic.ReleaseMemory

  def ordered(self) -> list:
    return [a for a in (self.evaluation, self.log, self.checkpoints, self.profile,
                        self.preemption, self.memory) if a is not None]


def _eval_every(s: Setup) -> int:
  """Steps between evaluations: at outer-sync boundaries for local SGD (periodic.eval_period)."""
  return periodic.eval_period(s.config.train.eval_every, s.config.local_sgd.sync_every,
                              s.is_local_sgd)


def _actions(s: Setup, workdir: str, ckpt: checkpoint.Checkpointer, stop: periodic.SignalFlag,
             writer: metrics_lib.MetricWriter, prefetch: data.Prefetcher, tally: periodic.Tally,
             meta: dict, start: int, tag: str) -> _Actions:
  """The run's periodic actions, from the `train` section."""
  t, clock = s.config.train, periodic.TrainClock()
  divergence = periodic.Divergence(t.on_nonfinite == "stop", tag, ckpt.directory,
                                   int(meta["step"]) if meta else None)
  log = periodic.MetricsLog(writer, metrics_lib.Progress(t.steps, tag), divergence, clock,
                            log_every=t.log_every, eval_every=_eval_every(s),
                            tokens=start * tally.tokens_per_step)
  checkpoints = periodic.Checkpointing(
      ckpt, stop, log, divergence,
      functools.partial(_checkpoint_meta, prefetch=prefetch, tally=tally,
                        tokenizer=tokenizers.describe(s.tokenizer),
                        config=json.loads(s.config.to_json_best_effort())),
      probe_nonfinite=t.on_nonfinite == "stop")
  profile = periodic.parse_profile_steps(t.profile_steps, t.steps)
  return _Actions(
      evaluation=periodic.Evaluation(s.evaluate, _eval_every(s), t.eval_batches, clock), log=log,
      checkpoints=checkpoints,
      profile=(periodic.Profile(*profile, os.path.join(workdir, "profile")) if profile else None),
      preemption=periodic.Preemption(stop, tag, ckpt.directory),
      memory=periodic.ReleaseMemory(ckpt))


def _train(s: Setup, workdir: str, ckpt: checkpoint.Checkpointer, prefetch: data.Prefetcher,
           writer: metrics_lib.MetricWriter, tally: periodic.Tally, progs: rounds_lib.Programs,
           rounds: rounds_lib.Rounds, state: local_sgd.TrainState, batches: "Batches",
           meta: dict, start: int, tag: str):
  """Runs the loop with SIGTERM / SIGINT turned into a flag: (state, what the last step left
  (None if no step ran), the actions, a signal that arrived after the loop's last check). On an exception the data thread, a trace, the
  checkpointer (a save in flight completes: the last good checkpoint is kept) and the writer
  are closed first."""
  c = s.config
  with periodic.SignalFlag() as stop:
    acts = _actions(s, workdir, ckpt, stop, writer, prefetch, tally, meta, start, tag)
    try:
      if acts.profile is not None:
        acts.profile.begin(start)
      profiled = (acts.profile.first, acts.profile.stop_at) if acts.profile is not None else ()
      syncs = (progs.h, progs.h1) if s.is_local_sgd else ()
      calls = Calls(progs.per_call, c.train.steps,
                    cuts=syncs + (c.train.log_every, _eval_every(s),
                                  c.checkpoint.every_steps),
                    at=(c.faults.nan_step,) + profiled)
      state, end = _loop(progs, rounds, tally, acts.ordered(), acts.log.write_pending, state,
                         batches, calls, start, c.train.steps, _poison(c.faults.nan_worker),
                         c.faults.nan_step)
      jax.block_until_ready(state)
      prefetch.close()
      acts.log.write_pending()
      if acts.profile is not None:
        acts.profile.close()
    except BaseException:
      prefetch.close()
      if acts.profile is not None:
        acts.profile.close()
      ckpt.close()
      writer.close()
      raise
  return state, end, acts, stop.signum


def steps_per_call(configured: int, per_step: bool) -> int:
  """Inner steps per call of the compiled step: `train.steps_per_call`, or with 0 ("auto") 10 on
  a CPU and 1 elsewhere; always 1 when `per_step` (the budget policy's worker mask changes every
  step; streaming syncs send fragments at offsets inside a round).

  On a CPU the host dispatches every fake device's program for every step and waits for them
  all; a loop over several steps runs them as one program per device (benchmarks/peer_workload.py:
  1.1-1.3x tokens/s), with the same numbers bit for bit (tests/test_calls.py) where both programs
  have the same XLA options (from width 128 the one-step program has its own scheduler,
  `rounds.step_options`, and rounds differently)."""
  if per_step:
    return 1
  if configured:
    return configured
  return 10 if jax.default_backend() == "cpu" else 1


class Calls:
  """Cuts steps [start, total) into calls of the compiled step: a call ends after at most
  `per_call` steps, and at every step where something may be due: a multiple of a period in
  `cuts` (outer and cluster syncs, logging, evaluation, step-counted checkpoints), at each step in
  `at` (the step before an injected fault, the first and last profiled steps), at the run's last
  step. Time-driven actions (checkpoints by minutes, a signal) are checked after each call."""

  def __init__(self, per_call: int, total: int, cuts: tuple[int, ...], at: tuple[int, ...] = ()):
    self.per_call, self.total, self.at = per_call, total, frozenset(at)
    self.cuts = tuple(p for p in cuts if p and p > 0)

  def end(self, step: int) -> int:
    """Steps done when the call that starts at `step` (steps done so far) returns."""
    for stop in range(step + 1, min(step + self.per_call, self.total) + 1):
      if stop == self.total or stop in self.at or any(stop % p == 0 for p in self.cuts):
        return stop
    return min(step + self.per_call, self.total)


class Batches:
  """Device batches drawn from the prefetcher: one step's [K, B/K, T+1], or n steps stacked
  [n, K, B/K, T+1] (the leading axis replicated) for a call of several steps."""

  def __init__(self, layout: mesh_lib.Layout, prefetch: data.Prefetcher):
    self.layout, self.prefetch = layout, prefetch
    self._held = [next(prefetch)[1]]  # the first step's batch, also used to compile

  def first(self) -> jax.Array:
    return mesh_lib.put_global(self._held[0], self.layout.batch)

  def take(self, n: int, pad_to: int = 1) -> jax.Array:
    """The next n steps' batches: one [K, B/K, T+1] with `pad_to` 1, else [pad_to, K, B/K, T+1]
    with the last batch repeated after the n drawn (the loop program runs only the first n)."""
    hosts = self._held + [next(self.prefetch)[1] for _ in range(n - len(self._held))]
    self._held = []
    if pad_to == 1:
      return mesh_lib.put_global(hosts[0], self.layout.batch)
    stacked = self.layout.sharding(jax.sharding.PartitionSpec(None, *self.layout.batch.spec))
    return mesh_lib.put_global(np.stack(hosts + hosts[-1:] * (pad_to - n)), stacked)


def _loop(progs: rounds_lib.Programs, rounds: rounds_lib.Rounds, tally: periodic.Tally,
          actions: list, flush_log: Callable[[], None], state: local_sgd.TrainState,
          batches: "Batches", calls: "Calls", start: int, total: int, poison: Callable,
          nan_step: int):
  """Steps `start` .. `total` - 1, a call of the compiled step at a time (`calls`): the inner
  steps, the previous logged record (`flush_log`), the outer syncs due, then each periodic
  action that is due (in order). Returns the final
  state and what the last step left (None if none ran). The trace annotations name each call by
  its first step, and its outer syncs, in a profile."""
  end, step = None, start
  n = calls.end(step) - step
  batch = batches.take(n, progs.per_call)
  while step < total:
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      if step == nan_step:
        state = poison(state)  # fault injection: one worker's parameters become NaN
      if progs.loop is None:
        state, m = progs.step(state, batch, *rounds.step_args(step))
      else:
        state, m = progs.steps(state, batch, n)  # m: the last step's metrics
      for _ in range(n):
        tally.inner_step(progs.step_comm.wire_bytes)
      # The previous logged step's record, while this call runs: its metrics are ready once this
      # call has started, and the syncs below may hold the host until this call ends (a donated
      # state is waited for on a CPU), which would put its line, and the tokens/s measured at
      # it, a whole call late.
      flush_log()
      stop = step + n
      last = stop == total
      with jax.profiler.TraceAnnotation("outer_syncs"):
        state, diag, scope, moved = progs.outer_syncs(state, stop - 1, last)
      tally.outer_sync(scope, moved, diag, progs.syncs_done)
      end = periodic.StepEnd(stop, last, state, m, diag, tally.point(stop))
      for action in actions:  # a checkpoint here reads the data position of step `stop`
        if action.due(end):
          action(end)
      step = stop
      if not last:
        n = calls.end(step) - step
        batch = batches.take(n, progs.per_call)  # prepared while the device works
  return state, end


def _finish(s: Setup, workdir: str, ckpt: checkpoint.Checkpointer, state: local_sgd.TrainState,
            progs: rounds_lib.Programs, tally: periodic.Tally, memory, eval_loss: float | None,
            last_record: dict, start: int, train_time: float, tag: str) -> dict[str, Any]:
  """Exports the global model, writes results.json and returns the results."""
  c = s.config
  faults.point("export")
  export_dir = _export(s, workdir, state)
  ckpt.close()
  total, tokens_per_step, sim = c.train.steps, tally.tokens_per_step, tally.sim
  tokens_per_sec = (total - start) * tokens_per_step / train_time
  rate_from = "this process's steps"
  if start >= total:  # finished from its final checkpoint: no step timed here, so the rate
    rates = [r["tokens_per_sec"] for r in _metrics(workdir) if r.get("tokens_per_sec")]
    if rates:  # is the median of the rates the run logged while it trained
      tokens_per_sec, rate_from = float(np.median(rates)), "metrics.jsonl (median)"
      train_time = total * tokens_per_step / tokens_per_sec
  results = {
      "algorithm": c.algorithm, "model_size": c.model.size,
      "non_embedding_params": model.non_embedding_params(s.model_cfg),
      "num_workers": s.layout.num_workers,
      "sync_every": c.local_sgd.sync_every if s.is_local_sgd else 1,
      "steps": total, "tokens": total * tokens_per_step,
      "flops": total * tokens_per_step * tally.flops_per_token,
      "final_train_loss": last_record.get("train_loss"), "eval_loss": eval_loss,
      "eval_every": _eval_every(s),
      "eval_params": ("global parameters right after an outer sync" if s.is_local_sgd
                      else "the model"),
      "tokens_per_sec": tokens_per_sec, "tokens_per_sec_from": rate_from,
      "train_seconds": train_time, "resumed_from": start,
      "comm_bytes": tally.comm_bytes, "comm_bytes_per_step": progs.step_comm.wire_bytes,
      "comm_bytes_per_sync": progs.sync_comm.wire_bytes, "export": export_dir,
      **({"sim_time": sim.seconds, "sim_comm_time": sim.comm_seconds,
          "sim_utilisation": sim.utilisation} if sim is not None else {"sim_time": None}),
  }
  if memory is not None:
    results.update(memory_fits=memory.fits, memory_gb=memory.total / 1e9,
                   memory_capacity_gb=memory.capacity / 1e9)
  if s.is_local_sgd:
    results["skipped_rounds"] = float(tally.skipped_rounds)
  why = verdict.failed_to_learn(
      results, s.model_cfg.vocab_size, skipped_steps=last_record.get("skipped_steps", 0),
      worker_steps=total * (s.layout.num_workers if s.is_local_sgd else 1),
      rounds=total // c.local_sgd.sync_every if s.is_local_sgd else 0)
  results["failed_to_learn"] = why is not None
  results["verdict"] = "learned" if why is None else f"failed to learn: {why}"
  faults.point("results")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  print(f"{tag} done: eval loss {eval_loss if eval_loss is None else round(eval_loss, 4)}, "
        f"{metrics_lib.format_count(results['tokens_per_sec'])} tok/s, "
        f"{metrics_lib.format_count(tally.comm_bytes)}B communicated per device, "
        f"{metrics_lib.format_duration(train_time)}; {results['verdict']}", flush=True)
  return results


def compare_algorithms(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       algorithms: tuple[str, ...] = ("local_sgd", "ddp")) -> dict[str, dict]:
  """Trains each algorithm on the same data and budget into `workdir/<algorithm>`, then prints a
  side-by-side table and writes `workdir/comparison.png` (eval loss against tokens) and
  `workdir/comparison.json`. `algorithms` may also be one name or a comma-separated string."""
  workdir = os.fspath(workdir)
  if isinstance(algorithms, str):
    algorithms = tuple(a.strip() for a in algorithms.split(",") if a.strip())
  unknown = [a for a in algorithms if a not in local_sgd.ALGORITHMS]
  if not algorithms or unknown:
    raise ValueError(f"algorithms={algorithms!r}: allowed one or more of "
                     f"{', '.join(local_sgd.ALGORITHMS)}.")
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
  if not isinstance(info.get("config"), dict) or "tokenizer" not in info:
    raise ValueError(f"{os.path.join(directory, 'model.json')} lacks the run's config or "
                     "tokenizer; re-export the model from its run (re-run its training command).")
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

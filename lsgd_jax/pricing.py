"""The clock applied to a training config: the simulated wall clock of a run (`sim_time`), the
model it prices, and whether a worker fits its device."""

from __future__ import annotations

import ml_collections

from lsgd_jax import clock as clock_lib
from lsgd_jax import faults, model
from lsgd_jax import mesh as mesh_lib


def tokens_per_device_step(c: ml_collections.ConfigDict, layout: mesh_lib.Layout) -> float:
  """Tokens one device processes per step: `clock.tokens_per_step`, else the run's own."""
  return float(c.clock.tokens_per_step or c.train.global_batch * c.data.seq_len
               / (layout.num_workers * layout.data_axis_size))


def sim_clock(c: ml_collections.ConfigDict, layout: mesh_lib.Layout,
              trained: model.ModelConfig) -> clock_lib.Clock | None:
  """The simulated wall clock of this run (lsgd_jax/clock.py); None with clock.device = "".

  Each step is priced at the tokens a device processes in it (or `clock.tokens_per_step`: a small
  proxy run priced at a production batch; utilisation depends on the model size only through
  link latency and the attention FLOPs, since compute and bytes both scale with N).
  Flat runs put every worker behind `clock.inter_link` (workers in different places);
  hierarchical runs put the workers of a cluster on `clock.cluster_link` and the clusters behind
  `clock.inter_link`. Each worker has |data| devices joined by the device's node link.
  """
  if not c.clock.device:
    return None
  priced = priced_model(c, trained)
  k, hier = layout.num_workers, layout.num_clusters > 1
  run = clock_lib.Run(
      algorithm="hierarchical" if hier else c.algorithm, params=model.total_params(priced),
      flops_per_token=model.train_flops_per_token(priced, c.data.seq_len),
      tokens_per_step=tokens_per_device_step(c, layout),
      devices_per_worker=layout.data_axis_size, workers=k,
      clusters=layout.num_clusters if hier else k,
      sync_every=c.local_sgd.cluster_sync_every if hier else c.local_sgd.sync_every,
      global_sync_every=c.local_sgd.sync_every if hier else 0,
      layout="two_stage" if layout.two_stage and c.algorithm == "local_sgd" else "flat")
  net = clock_lib.Network.for_device(c.clock.device, c.clock.inter_link,
                                     c.clock.cluster_link or None)
  if c.clock.inter_bandwidth:
    net = net.with_bandwidth("inter", c.clock.inter_bandwidth * 1e6 / 8)
  speeds = faults.parse_speeds(c.edge.speeds, k, c.seed)
  return clock_lib.Clock(run, c.clock.device, net, overlap=c.clock.overlap,
                         speeds=None if c.edge.speeds == "" else list(speeds),
                         policy=c.edge.policy)


def priced_model(c: ml_collections.ConfigDict, trained: model.ModelConfig) -> model.ModelConfig:
  """The model the clock prices: the trained one, or `clock.model_size` (a proxy run priced as a
  larger model: its loss curve is the proxy's, its clock the larger model's)."""
  if not c.clock.model_size:
    return trained
  return model.model_config(c.clock.model_size, trained.vocab_size, max(c.data.seq_len, 1),
                            trained.tie_embeddings, trained.dtype)


def memory_report(c: ml_collections.ConfigDict, layout: mesh_lib.Layout,
                  trained: model.ModelConfig, local_sgd: bool) -> clock_lib.MemoryReport | None:
  """Whether one worker's device (clock.device) holds the (priced) model, its gradients, AdamW
  moments, the outer state and the activations of its share of a step (None with clock.device
  = "")."""
  if not c.clock.device:
    return None
  m = priced_model(c, trained)
  tokens = tokens_per_device_step(c, layout)
  acts = clock_lib.activation_bytes(m.num_layers, m.d_model, m.num_heads, c.data.seq_len, tokens)
  return clock_lib.memory_check(model.total_params(m), c.clock.device, activations=acts,
                                outer_state=local_sgd,
                                outer_shards=layout.data_axis_size if layout.two_stage else 1)

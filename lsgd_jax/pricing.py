"""The clock applied to a training config: the simulated wall clock of a run (`sim_time`), the
model it prices, and whether a worker fits its device."""

from __future__ import annotations

import ml_collections
import numpy as np

from lsgd_jax import clock as clock_lib
from lsgd_jax import model, quantize
from lsgd_jax import mesh as mesh_lib


def tokens_per_device_step(proxy_tokens: int, global_batch: int, seq_len: int,
                           layout: mesh_lib.Layout) -> float:
  """Tokens one device processes per step: `proxy_tokens` (clock.tokens_per_step) if set, else the
  run's own."""
  return float(proxy_tokens or global_batch * seq_len / (layout.num_workers * layout.data_axis_size))


def sim_clock(clock_cfg: ml_collections.ConfigDict, layout: mesh_lib.Layout,
              priced: model.ModelConfig, *, algorithm: str, seq_len: int, tokens_per_step: float,
              sync_every: int, cluster_sync_every: int, speeds: np.ndarray | None,
              policy: str, streaming: dict | None = None) -> clock_lib.Clock | None:
  """The simulated wall clock of this run (lsgd_jax/clock.py); None with clock.device = "".

  `clock_cfg` is the config's `clock` section; `priced` the model it prices (`priced_model`).
  Each step is priced at `tokens_per_step` per device (see `tokens_per_device_step`: a small
  proxy run may be priced at a production batch; utilisation depends on the model size only
  through link latency and the attention FLOPs, since compute and bytes both scale with N).
  Flat runs put every worker behind `clock.inter_link` (workers in different places);
  hierarchical runs put the workers of a cluster on `clock.cluster_link` and the clusters behind
  `clock.inter_link`. Each worker has |data| devices joined by the device's node link. `speeds`:
  the workers' relative speeds (edge.speeds; None: all equal), under the straggler `policy`.
  `streaming`: the `clock.Run` fields of a streaming outer sync (`streaming_run`).
  """
  if not clock_cfg.device:
    return None
  k, hier = layout.num_workers, layout.num_clusters > 1
  run = clock_lib.Run(
      algorithm="hierarchical" if hier else algorithm, params=model.total_params(priced),
      flops_per_token=model.train_flops_per_token(priced, seq_len),
      tokens_per_step=tokens_per_step, devices_per_worker=layout.data_axis_size, workers=k,
      clusters=layout.num_clusters if hier else k,
      sync_every=cluster_sync_every if hier else sync_every,
      global_sync_every=sync_every if hier else 0,
      layout="two_stage" if layout.two_stage and algorithm == "local_sgd" else "flat",
      comm_overlap=clock_cfg.comm_overlap, comm_buckets=clock_cfg.comm_buckets,
      duplex=clock_cfg.duplex, **(streaming or {}))
  net = clock_lib.Network.for_device(clock_cfg.device, clock_cfg.inter_link,
                                     clock_cfg.cluster_link or None)
  if clock_cfg.inter_bandwidth:
    net = net.with_bandwidth("inter", clock_cfg.inter_bandwidth * 1e6 / 8)
  return clock_lib.Clock(run, clock_cfg.device, net, overlap=clock_cfg.overlap,
                         speeds=None if speeds is None else list(speeds), policy=policy)


def priced_model(model_size: str, seq_len: int, trained: model.ModelConfig) -> model.ModelConfig:
  """The model the clock prices: the trained one, or the preset `model_size` (clock.model_size: a
  proxy run priced as a larger model: its loss curve is the proxy's, its clock the larger
  model's)."""
  if not model_size:
    return trained
  return model.model_config(model_size, trained.vocab_size, max(seq_len, 1),
                            trained.tie_embeddings, trained.dtype)


def memory_report(device: str, layout: mesh_lib.Layout, priced: model.ModelConfig, *,
                  seq_len: int, tokens_per_step: float,
                  local_sgd: bool) -> clock_lib.MemoryReport | None:
  """Whether one worker's `device` (clock.device) holds the priced model, its gradients, AdamW
  moments, the outer state and the activations of its share of a step (None with device = "")."""
  if not device:
    return None
  m = priced
  acts = clock_lib.activation_bytes(m.num_layers, m.d_model, m.num_heads, seq_len,
                                    tokens_per_step)
  return clock_lib.memory_check(model.total_params(m), device, activations=acts,
                                outer_state=local_sgd,
                                outer_shards=layout.outer_shards)


def streaming_run(local_sgd_cfg: ml_collections.ConfigDict, algorithm: str) -> dict:
  """The `clock.Run` fields of a streaming outer sync (fragments, overlap, wire bytes per element)
  from the config's `local_sgd` section."""
  s = local_sgd_cfg
  if algorithm != "local_sgd" or s.num_clusters > 1:
    return {}
  return dict(fragments=s.num_fragments, overlap_steps=s.overlap_steps,
              outer_bytes_per_element=quantize.bytes_per_element(s.outer_dtype, s.outer_block))

"""Edge and multi-cluster report: scenarios trained for real, priced by the clock, and the clock's
tables (memory, multi-cluster utilisation, stragglers).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m experiments.edge --config=configs/edge.py --workdir=runs/edge --out=docs/edge

Trains every scenario of lsgd_jax.edge.SCENARIOS (or `--scenarios=a,b`) in WORKDIR/NAME (a
finished one is read back, an interrupted one resumes: re-run the same command), then writes
OUT/README.md, OUT/scenarios.png, OUT/multi_cluster.png, OUT/stragglers.png and OUT/summary.json.
`--report_only` redraws the report from finished runs without training.
"""

from __future__ import annotations

import json
import math
import os

from absl import flags
from ml_collections import config_flags

from experiments import cli
from lsgd_jax import clock, edge

_CONFIG = config_flags.DEFINE_config_file("config", "configs/edge.py", "Base config of the "
                                          "scenarios.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "One sub-folder per scenario.")
_OUT = flags.DEFINE_string("out", "docs/edge", "Report folder.")
_SCENARIOS = flags.DEFINE_list("scenarios", list(edge.SCENARIOS), "Scenarios to train.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only redraw the report from the runs.")
flags.mark_flags_as_required(["workdir"])

CLUSTER_PARAMS = (1e8, 1e9, 1e10)
CLUSTER_GBIT = (0.1, 1.0, 10.0, 100.0)
MEMORY_SIZES = ("25M", "100M", "400M", "800M")
MEMORY_DEVICES = ("phone", "rtx4090", "tpu-v5e", "h100")
TARGET = 0.9
UPLINK_MBIT = (1.0, 5.0, 20.0, 100.0, 1000.0)
UPLINK_H = (25, 100, 500)


def _table(header: list[str], rows: list[list[str]]) -> str:
  return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(r) + " |" for r in rows])


def _hours(h: float | None) -> str:
  if h is None:
    return "-"
  if math.isinf(h):
    return "never"
  return f"{h:.2f}" if h >= 0.1 else f"{60 * h:.1f} min"


def report(c, workdir: str, names: list[str], out: str) -> str:
  os.makedirs(out, exist_ok=True)
  rows = edge.summarize(workdir, names)
  mem = edge.memory_table(MEMORY_SIZES, MEMORY_DEVICES, seq_len=2048, tokens_per_step=4096)
  clusters = edge.cluster_table(CLUSTER_PARAMS, CLUSTER_GBIT, target=TARGET)
  strag = edge.straggler_table((1.0, 0.75, 0.5, 0.25, 0.1, 0.05))
  priced = _priced(c)
  uplink = edge.uplink_table(*priced[:3], UPLINK_MBIT, UPLINK_H, workers=c.local_sgd.num_workers,
                             device=c.clock.device, link=c.clock.inter_link)
  edge.plot_scenarios(workdir, names).savefig(os.path.join(out, "scenarios.png"), dpi=110)
  edge.plot_clusters(clusters, TARGET).savefig(os.path.join(out, "multi_cluster.png"), dpi=110)
  edge.plot_stragglers(strag).savefig(os.path.join(out, "stragglers.png"), dpi=110)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"scenarios": rows, "memory": mem, "multi_cluster": clusters,
               "stragglers": strag, "uplink": uplink}, f, indent=2, default=str)

  dev, link = clock.device(c.clock.device), clock.link(c.clock.inter_link)
  bw = c.clock.inter_bandwidth or link.bandwidth * 8 / 1e6
  scen = _table(
      ["scenario", "what", "final eval loss", "simulated hours", "utilisation",
       f"hours to loss {rows[0]['target_loss']:.3f}", "worker-rounds missed"],
      [[r["scenario"], r["what"], f"{r['eval_loss']:.3f}", _hours(r["sim_hours"]),
        _fmt_pct(r["utilisation"]), _hours(r["hours_to_target"]),
        _fmt_pct(r["missed"])] for r in rows])
  memtab = _table(["preset", "parameters"] + list(MEMORY_DEVICES),
                  [[r["size"], f"{r['params'] / 1e6:.0f}M"] + [
                      f"{'fits' if r[d]['fits'] else '**no**'} ({r[d]['gb']:.1f} GB)"
                      for d in MEMORY_DEVICES] for r in mem])
  cl = _table(["N", "inter-cluster Gbit/s", "W0 / W1", f"H for {100 * TARGET:.0f}%",
               "in-cluster all-reduce / compute", "DDP utilisation"],
              [[f"{r['params']:.0e}", f"{r['inter_gbit']:g}", f"{r['bandwidth_ratio']:,.0f}",
                _h(r["h_needed"]), _fmt_pct(r["step_comm_share"]),
                f"{100 * r['ddp_utilisation']:.1f}%"] for r in clusters])
  up = _table(["uplink Mbit/s", "DDP"] + [f"H = {h}" for h in UPLINK_H]
               + ["H for 50%", "H for 90%"],
               [[f"{r['mbit']:g}", _fmt_pct(r["ddp"])] + [_fmt_pct(r[f"H{h}"]) for h in UPLINK_H]
                + [_h(r["h_for_50"]), _h(r["h_for_90"])] for r in uplink])
  st = _table(["slowest speed", "wait: utilisation", "budget: utilisation",
               "budget: slowest worker's steps of 50", "budget: share of steps done"],
              [[f"{r['slowest']:g}", f"{100 * r['wait_utilisation']:.0f}%",
                f"{100 * r['budget_utilisation']:.0f}%", str(r["budget_slowest_steps"]),
                f"{100 * r['budget_step_share']:.0f}%"] for r in strag])
  text = f"""# Edge and multi-cluster training: where local SGD keeps the devices busy, and where it breaks

Generated by `python -m experiments.edge --config=configs/edge.py --workdir=runs/edge --out={out}`
(with `XLA_FLAGS=--xla_force_host_platform_device_count=8`); every number below is in
`summary.json` beside this file. The clock is a model with nominal figures
(`lsgd_jax/clock.py`), not a measurement.

## Scenarios trained for real, priced by the clock

{c.local_sgd.num_workers} workers on {c.local_sgd.num_workers} fake CPU devices train
{c.model.size} on {c.data.name} ({c.train.steps} steps, global batch {c.train.global_batch} x
{c.data.seq_len} tokens, local SGD H = {c.local_sgd.sync_every}, Nesterov outer step
lr {c.local_sgd.outer_lr}); DDP trains on the same data and budget. The clock prices each step as
the {c.clock.model_size or c.model.size} preset processing {c.clock.tokens_per_step or 'its'}
tokens per worker on a `{dev.name}` ({dev.peak_flops / 1e12:g} TFLOP/s peak at {dev.mfu:.0%} MFU,
{dev.memory_bytes / 1e9:g} GB) behind a `{c.clock.inter_link}` link ({bw:g} Mbit/s,
{1e3 * link.latency:g} ms per hop), flat ring all-reduce, no overlap. "Hours to loss" is the
simulated time until the held-out loss first reaches 1% above the final loss of
`{rows[0]['reference']}`
(linear between evaluations; "never" if it does not within the step budget): DDP passes that level
on its way down, so both algorithms are timed at the same loss.

![loss against simulated time](scenarios.png)

{scen}

## Uplink bandwidth: utilisation of the scenario's workers

The same priced workers ({priced[2]}) in a flat ring of {c.local_sgd.num_workers} over uplinks of
each bandwidth ({1e3 * link.latency:g} ms per hop): compute utilisation of DDP and of local SGD at
each H, and the H that 50% and 90% need (`clock.sync_every_needed`).

{up}

## Where multi-cluster local SGD keeps {100 * TARGET:.0f}% utilisation

Clusters of 8 H100s (NVLink inside a node, one cluster = one worker, 4 clusters), 16,384 tokens per
GPU per step, 6N FLOPs per token at 40% MFU, fp32 pseudo-gradients with the two-stage sync (each
GPU sends 1/8 of them over the inter-cluster link), 20 ms per inter-cluster hop. H is the number of
inner steps between outer syncs that keeps the GPUs computing {100 * TARGET:.0f}% of the time
(`clock.sync_every_needed`); W0 / W1 is the intra-node over the inter-cluster bandwidth; the
in-cluster all-reduce of every inner step (NVLink) is given as a share of the step's compute.

![H needed against bandwidth](multi_cluster.png)

{cl}

## Stragglers: wait for the slowest, or a fixed round time

One of 8 workers at a lower speed, H = 50, a step of 1 s at full speed, a 10 s outer sync
(`clock.heterogeneous_round`). Waiting idles the 7 fast workers; a fixed round time keeps them
busy, and the slow worker contributes the steps it managed (the outer mean is weighted by steps).

![stragglers](stragglers.png)

{st}

## Memory: which devices hold a worker

Per device: float32 parameters, gradients and both AdamW moments (16 bytes per parameter), the
outer parameters and momentum (8 bytes per parameter), and 16-bit activations of 4,096 tokens of
sequence 2048 kept for the backward pass without recomputation (Korthikanti et al. 2022, arXiv
2205.05198, eq. 1); vocabulary 32k (`clock.memory_check`). Every training run also prints this
verdict for its own device and model (`memory of one ... worker device`).

{memtab}
"""
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(text)
  return text


def _priced(c) -> tuple[float, float, float, str]:
  """(synced parameters, FLOPs per token, tokens per device-step, description) the clock prices,
  for one device per worker (the scenarios' layout)."""
  from lsgd_jax import model, pricing  # pylint: disable=import-outside-toplevel
  vocab = 257 if c.data.tokenizer == "byte" else c.data.vocab_size
  trained = model.model_config(c.model.size, vocab, c.data.seq_len, c.model.tie_embeddings)
  m = pricing.priced_model(c.clock.model_size, c.data.seq_len, trained)
  tokens = c.clock.tokens_per_step or (c.train.global_batch * c.data.seq_len
                                       / c.local_sgd.num_workers)
  n = model.total_params(m)
  return (float(n), model.train_flops_per_token(m, c.data.seq_len), float(tokens),
          f"{c.clock.model_size or c.model.size}, {n / 1e6:.1f}M parameters, "
          f"{tokens:,.0f} tokens per step on a {c.clock.device}")


def _h(h: float) -> str:
  return "unreachable" if math.isinf(h) else f"{math.ceil(h)}"


def _fmt_pct(v) -> str:
  return "-" if v is None else f"{100 * v:.1f}%"


def main(argv):
  del argv  # cli.run refuses positional arguments
  names = list(_SCENARIOS.value)
  if not names:
    raise ValueError("--scenarios is empty; allowed a comma list of: "
                     f"{', '.join(edge.SCENARIOS)}.")
  for n in names:
    edge.scenario_config(_CONFIG.value, n)  # unknown names fail before any training
  if not _REPORT_ONLY.value:
    edge.run_scenarios(_CONFIG.value, _WORKDIR.value, names)
  report(_CONFIG.value, _WORKDIR.value, names, _OUT.value)
  print(f"wrote {os.path.join(_OUT.value, 'README.md')}", flush=True)


if __name__ == "__main__":
  cli.run(main)

"""Streaming DiLoCo, eager updates and quantized outer gradients, trained for real and priced.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m experiments.streaming --config=configs/streaming.py --workdir=runs/streaming

Trains every run of RUNS (or `--runs=a,b`) from the same config, data and token budget in
WORKDIR/NAME (a finished run is read back, an interrupted one resumes), then writes OUT/README.md
(a table: final eval loss, bytes per device, simulated wall clock and utilisation),
OUT/loss_vs_time.png, OUT/loss_vs_bytes.png and OUT/summary.json. `--report_only` redraws from
finished runs.
"""

from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from experiments import cli
from lsgd_jax import metrics as metrics_lib
from lsgd_jax import report, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/streaming.py", "Base config.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "One sub-folder per run.")
_OUT = flags.DEFINE_string("out", "docs/streaming", "Report folder.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only redraw the report from the runs.")
flags.mark_flags_as_required(["workdir"])

_S = "local_sgd"
RUNS: dict[str, dict] = {
    "DDP": {"algorithm": "ddp"},
    "DiLoCo": {},
    "streaming P=2 tau=0": {"num_fragments": 2},
    "streaming P=2 tau=1": {"num_fragments": 2, "overlap_steps": 1, "merge_alpha": 0.5},
    "streaming P=2 tau=5": {"num_fragments": 2, "overlap_steps": 5, "merge_alpha": 0.5},
    "streaming P=4 tau=0": {"num_fragments": 4},
    "streaming P=4 tau=1": {"num_fragments": 4, "overlap_steps": 1, "merge_alpha": 0.5},
    "streaming P=4 tau=5": {"num_fragments": 4, "overlap_steps": 5, "merge_alpha": 0.5},
    "eager P=2 tau=5": {"num_fragments": 2, "overlap_steps": 5, "eager": True},
    "DiLoCo bf16": {"outer_dtype": "bfloat16"},
    "DiLoCo int8": {"outer_dtype": "int8"},
    "DiLoCo int4": {"outer_dtype": "int4"},
    "DiLoCo int4 + error feedback": {"outer_dtype": "int4", "error_feedback": True},
    "streaming P=4 tau=5 int4": {"num_fragments": 4, "overlap_steps": 5, "merge_alpha": 0.5,
                                 "outer_dtype": "int4"},
}
_RUNS = flags.DEFINE_list("runs", list(RUNS), "Runs to train.")


def _dir(name: str) -> str:
  return name.replace(" ", "_").replace("=", "").replace("+", "and")


def run_config(base, name: str):
  c = base.copy_and_resolve_references()
  for key, value in RUNS[name].items():
    if key == "algorithm":
      c.algorithm = value
    else:
      c[_S][key] = value
  return c


def _table(header, rows) -> str:
  return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(r) + " |" for r in rows])


def write_report(workdir: str, names: list[str], out: str) -> str:
  os.makedirs(out, exist_ok=True)
  curves, summary = {}, {}
  for name in names:
    d = os.path.join(workdir, _dir(name))
    with open(os.path.join(d, "results.json")) as f:
      summary[name] = json.load(f)
    curves[name] = [r for r in metrics_lib.read_jsonl(os.path.join(d, "metrics.jsonl"))
                    if "eval_loss" in r]
  ddp = summary.get("DDP", {}).get("eval_loss")
  rows = []
  for name, r in summary.items():
    rows.append([name, f"{r['eval_loss']:.4f}",
                 f"{r['eval_loss'] - ddp:+.4f}" if ddp is not None else "-",
                 metrics_lib.format_count(r["comm_bytes"]) + "B",
                 metrics_lib.format_count(r["comm_bytes_per_sync"]) + "B",
                 f"{r['sim_time'] / 60:.1f}", f"{100 * r['sim_utilisation']:.1f}%"])
  table = _table(["run", "final eval loss", "vs DDP", "bytes / device", "bytes / full sync",
                  "sim. minutes", "utilisation"], rows)
  for key, fname, label, scale in (("sim_time", "loss_vs_time.png", "simulated minutes", 1 / 60),
                                   ("comm_bytes", "loss_vs_bytes.png",
                                    "bytes sent per device", 1.0)):
    fig = report.new_figure((7.5, 5.0))
    ax = fig.add_subplot()
    for name, recs in curves.items():
      xs = [r.get(key, 0.0) * scale for r in recs]
      style = "-" if name.startswith(("DDP", "DiLoCo")) else "--"
      ax.plot(xs, [r["eval_loss"] for r in recs], style, marker=".", label=name)
    if key == "comm_bytes":
      ax.set_xscale("symlog", linthresh=1e6)
    ax.set_xlabel(label)
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, fname), dpi=120)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("# Streaming / eager / quantized runs (experiments/streaming.py)\n\n"
            "Generated; read docs/streaming.md for the set-up and the discussion.\n\n"
            + table + "\n\n![](loss_vs_time.png)\n\n![](loss_vs_bytes.png)\n")
  return table


def main(argv):
  del argv  # cli.run refuses positional arguments
  base = _CONFIG.value
  names = list(_RUNS.value)
  if not names:  # an empty report would replace the one in --out
    raise ValueError(f"--runs is empty; allowed a comma list of: {', '.join(RUNS)}.")
  for n in names:
    if n not in RUNS:
      raise ValueError(f"Unknown run {n!r}; allowed: {', '.join(RUNS)}.")
  if not _REPORT_ONLY.value:
    for name in names:
      train.train_and_evaluate(run_config(base, name), os.path.join(_WORKDIR.value, _dir(name)),
                               name=name)
  print(write_report(_WORKDIR.value, names, _OUT.value))


if __name__ == "__main__":
  cli.run(main)

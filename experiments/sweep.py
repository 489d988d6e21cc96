"""Runs a grid of training runs for a scaling-law study and fits the laws:

    python -m experiments.sweep --config=configs/scaling_cpu.py --workdir=DIR

One workdir per run (DIR/size=...,alg=...,...), DIR/results.csv (one row per finished run),
DIR/summary.md (a table per grid) and DIR/report/ (experiments/fit.py on the grids named in
`sweep.reports`).
Re-running the same command skips the finished runs and resumes the others. Any key can be
overridden, e.g. `--config.sweep.seeds="(0, 1)"`. `--dry_run` prints the plan and its cost
(`--hardware=8xH100 --mfu=0.4`) without training.
"""

import os

from absl import flags
from ml_collections import config_flags

from experiments import cli, distributed_flags
from lsgd_jax import sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: one sub-folder per run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the runs and their cost; train nothing.")
_HARDWARE = flags.DEFINE_enum("hardware", None, list(sweep.HARDWARE),
                              "With --dry_run: the hours on this hardware.")
_MFU = flags.DEFINE_float("mfu", 0.4, "With --hardware: the model FLOPs utilisation assumed.")
flags.register_validator("mfu", lambda v: 0 < v <= 1,
                         message="--mfu is a share of the peak: allowed (0, 1], e.g. 0.4.")
_RETRY_FAILED = flags.DEFINE_bool("retry_failed", False, "Re-run the runs that diverged before.")
_COLLECT_ONLY = flags.DEFINE_bool(
    "collect_only", False, "Train nothing: rebuild results.csv, summary.md and the reports from "
    "the runs that finished (safe beside a sweep that is still training).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Folder of JAX's persistent compilation cache ('': WORKDIR/"
    ".xla_cache; 'none': off). Runs that differ only in a setting one program does not see "
    "(a seed, the outer lr for the train step, the inner lr for the outer sync) reuse the "
    "compiled program instead of compiling it again: on small CPU runs compilation is most of "
    "the wall time.")


def main(argv):
  del argv  # cli.run refuses positional arguments
  if _DRY_RUN.value:
    print(sweep.describe(_CONFIG.value, sweep.plan(_CONFIG.value), _HARDWARE.value, _MFU.value))
    return
  if not _WORKDIR.value:
    raise ValueError("--workdir is required (except with --dry_run): the folder the runs go to.")
  distributed_flags.initialize()  # before anything touches devices
  if _CACHE.value != "none" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir",
                      _CACHE.value or os.path.join(_WORKDIR.value, ".xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  sweep.run_sweep(_CONFIG.value, _WORKDIR.value, retry_failed=_RETRY_FAILED.value,
                  collect_only=_COLLECT_ONLY.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)

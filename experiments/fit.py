"""Fits scaling laws to a sweep's results and writes plots and a report.

    python -m experiments.fit --results=results.csv --out=DIR [--form=pure|offset] [--n_boot=1000]
        [--grids=main,H]
    python -m experiments.fit --results=results.csv --out=DIR --study=v2

The CSV needs the columns algorithm, num_workers, sync_every, non_embedding_params, tokens, flops,
eval_loss (one row per run, as in a run's results.json); extra columns (model_size, seed, lr,
outer_optimizer, outer_lr, outer_momentum, ...) are allowed. Prints the fitted table and writes
DIR/report.md with loss_vs_params.png, loss_vs_compute.png, local_sgd_minus_ddp.png and
sync_every_ablation.png (each where the data allow it). Takes seconds on a CPU. `--grids` keeps
the rows of a sweep's results.csv (experiments/sweep.py) that belong to the named grids, e.g. the
scaling grid and the H ablation but not the outer-optimizer ablation at one size, which the
per-size tuning would otherwise treat as a hyper-parameter setting.
"""

from absl import flags

from experiments import cli
from lsgd_jax import report, study_report

_RESULTS = flags.DEFINE_string("results", None, "CSV file with one row per run.")
_OUT = flags.DEFINE_string("out", None, "Directory for report.md and the plots.")
_FORM = flags.DEFINE_enum("form", "pure", ["pure", "offset"],
                          "pure: L = (X_c / X)^alpha (the paper's); offset: L = E + A / X^alpha.")
_SYNC_EVERY = flags.DEFINE_integer("sync_every", None,
                                   "H of the local SGD runs to fit (default: the one covering "
                                   "the most sizes).")
_GRIDS = flags.DEFINE_list("grids", None,
                           "Keep only the rows of these sweep grids (column `grid`).")
_N_BOOT = flags.DEFINE_integer("n_boot", 1000, "Bootstrap resamples per interval.")
_LEVEL = flags.DEFINE_float("level", 0.95, "Interval level.")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_STUDY = flags.DEFINE_enum("study", None, ["v2"],
                           "v2: the tuned DDP-vs-local-SGD study's report (lsgd_jax.study_report: "
                           "tuning, gaps with noise intervals, L(N), L(D), frontier, ablations) "
                           "from a results.csv of configs/scaling_cpu_v2.py.")
flags.mark_flags_as_required(["results", "out"])


def main(argv):
  del argv  # cli.run refuses positional arguments
  if _STUDY.value and flags.FLAGS["level"].present:
    raise ValueError("--level applies to the plain fit; --study=v2's report states its own "
                     "intervals (95%).")
  cols = report.read_results(_RESULTS.value)
  if _STUDY.value == "v2":
    study = study_report.analyze(cols, n_boot=_N_BOOT.value, seed=_SEED.value)
    for path in study_report.write(study, _OUT.value):
      print(f"wrote {path}")
    return
  if _GRIDS.value:
    cols = report.select_grids(cols, _GRIDS.value)
  analysis = report.analyze(cols, form=_FORM.value, sync_every=_SYNC_EVERY.value,
                            n_boot=_N_BOOT.value, level=_LEVEL.value, seed=_SEED.value)
  print(analysis.table())
  for path in report.write_report(analysis, _OUT.value, source=_RESULTS.value):
    print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)

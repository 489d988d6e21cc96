"""Local SGD and DDP side by side on the same data and budget.

`python -m experiments.compare --config=configs/default.py --workdir=DIR` trains both, prints a
table (final eval loss, tokens/s, bytes communicated) and writes DIR/comparison.png.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import distributed_flags
from lsgd_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-folder per algorithm).")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["local_sgd", "ddp"], "Algorithms to compare.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO: dozens of lines a run
    logging.set_verbosity(logging.WARNING)
  try:
    distributed_flags.initialize()  # before anything touches devices
    train.compare_algorithms(_CONFIG.value, _WORKDIR.value, tuple(_ALGORITHMS.value))
  except (ValueError, FileNotFoundError, FloatingPointError) as e:  # the message, no traceback
    sys.exit(f"error: {e}")
  except train.Preempted as e:  # the checkpoint is saved; the same command resumes
    sys.exit(128 + e.signum)


if __name__ == "__main__":
  app.run(main)

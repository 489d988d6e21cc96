"""Local SGD and DDP side by side on the same data and budget.

`python -m experiments.compare --config=configs/default.py --workdir=DIR` trains both, prints a
table (final eval loss, tokens/s, bytes communicated) and writes DIR/comparison.png.
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli, distributed_flags
from lsgd_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-folder per algorithm).")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["local_sgd", "ddp"], "Algorithms to compare.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv  # cli.run refuses positional arguments
  distributed_flags.initialize()  # before anything touches devices
  train.compare_algorithms(_CONFIG.value, _WORKDIR.value, tuple(_ALGORITHMS.value))


if __name__ == "__main__":
  cli.run(main)

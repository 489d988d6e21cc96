"""Trains one run: `python -m experiments.train --config=configs/NAME.py[:ARG] --workdir=DIR`.

Any config key can be overridden: `--config.local_sgd.sync_every=50 --config.algorithm=ddp`.
Multi-process (several hosts, or processes on one host): every process runs the same command plus
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (WORKSPACE.md).
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli, distributed_flags
from lsgd_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv  # cli.run refuses positional arguments
  distributed_flags.initialize()  # before anything touches devices
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)

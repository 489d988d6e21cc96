"""Held-out loss and perplexity of an exported model.

  python -m experiments.evaluate --model=WORKDIR/export
"""

import json

from absl import flags

from experiments import cli
from lsgd_jax import train

_MODEL = flags.DEFINE_string("model", None, "An exported model folder (a run's workdir/export).")
flags.mark_flags_as_required(["model"])


def main(argv):
  del argv  # cli.run refuses positional arguments
  result = train.evaluate_exported(_MODEL.value)
  print(f"eval loss {result['eval_loss']:.4f}  perplexity {result['perplexity']:.2f}")
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)

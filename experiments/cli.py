"""What every training binary does around its work: quiet orbax's INFO logs unless --verbosity is
given, and turn bad input into a one-line message instead of a traceback."""

import contextlib
import sys

from absl import flags, logging

from lsgd_jax import train


@contextlib.contextmanager
def user_errors():
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO: dozens of lines a run
    logging.set_verbosity(logging.WARNING)
  try:
    yield
  except (ValueError, FileNotFoundError, FloatingPointError) as e:  # the message, no traceback
    sys.exit(f"error: {e}")
  except train.Preempted as e:  # the checkpoint is saved; the same command resumes
    sys.exit(128 + e.signum)

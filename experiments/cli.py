"""The one boundary every binary runs inside: `cli.run(main)` instead of `app.run(main)`.

- Bad flags, a config file that is missing or does not load, an unknown config key (with the
  closest known key), and every error raised by `main` (bad values, unreadable files, orbax and
  tensorstore failures, a full disk) end in one line `error: ...` on stderr and a non-zero exit
  (2: flags and config, 1: the rest); no traceback, no usage dump.
- `--traceback` shows the full traceback instead (for bug reports).
- A run stopped by SIGTERM / SIGINT exits with 128 + the signal after saying what happened: in a
  training loop its checkpoint is saved; anywhere else (setting up, between the runs of a sweep)
  it stops at once. Re-running the same command resumes.
- orbax's INFO logs (dozens of lines a run) are quiet unless --verbosity is given.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import sys
import threading
from typing import Callable

from absl import app, flags, logging

from lsgd_jax import workdir  # standard library only: the binaries without JAX stay without it

_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an error, print the full Python traceback "
                               "(for bug reports) instead of one line.")

# Errors that bad input causes: their message is the whole story.
USER_ERRORS = (ValueError, OSError, FloatingPointError, KeyError, app.UsageError, flags.Error)


def _root(e: BaseException) -> BaseException:
  """The deepest cause of a chain (ml_collections wraps a config file's own error twice)."""
  seen = set()
  while e.__cause__ is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__
  return e


def describe(e: BaseException) -> str:
  """One line for an exception: its message, or that of the error at the root of its chain."""
  root = _root(e)
  if isinstance(root, SyntaxError):
    return f"{root.filename}:{root.lineno}: {root.msg}"
  if isinstance(root, OSError) and root.filename is not None and root.strerror:
    return f"{root.filename}: {root.strerror}"
  errno_line = re.search(r"\[Errno \d+\] ([^:\n]+): '([^'\n]+)'", str(root))
  if "Failed loading config file" in str(root) and errno_line:
    return f"config file {errno_line.group(2)}: {errno_line.group(1)}"
  if isinstance(e, USER_ERRORS) and str(e):
    text = str(e)
  else:
    text = f"{type(root).__name__}: {root}"
  if isinstance(e, KeyError) and text.startswith(("'", '"')):
    text = text[1:-1]
  lines = [l.strip() for l in text.replace("\\n", "\n").splitlines() if l.strip()]
  return "; ".join(lines) if lines else type(e).__name__


def _config_override_message(e: BaseException, argv: list[str]) -> str | None:
  """'unknown config key train.stepz; did you mean train.steps?' for a bad --config.KEY."""
  text = str(_root(e)).replace("\\n", "\n")
  missing = re.search(r"""^[\\'"]*([A-Za-z_]\w*)""", text.strip())
  if missing is None:
    return None
  overrides = []
  for arg in argv[1:]:
    m = re.match(r"--?(\w+)\.([\w.]+)(=.*)?$", arg)
    if m:
      overrides.append((m.group(1), m.group(2)))
  for flag, path in overrides:
    parts = path.split(".")
    if missing.group(1) not in parts:
      continue
    if path.startswith("local_sgd.outer_kwargs."):
      return (f"--{flag}.{path}: outer_kwargs is set whole, as a dict of the optax optimizer's "
              f"arguments, e.g. --{flag}.local_sgd.outer_kwargs=\"{{'b1': 0.9}}\".")
    hint = re.search(r'Did you mean "(\w+)"', text)
    key = ".".join(parts[:parts.index(missing.group(1)) + 1])
    if hint:
      near = ".".join(parts[:parts.index(missing.group(1))] + [hint.group(1)])
      return f"unknown config key {key} (--{flag}.{path}); did you mean {near}?"
    return (f"unknown config key {key} (--{flag}.{path}); every key is listed with a comment in "
            "lsgd_jax/config.py.")
  return None


def _config_file_error(e: BaseException) -> str | None:
  """The error a config file's get_config raised (e.g. a bad `:ARG`), where ml_collections has
  folded the whole traceback into a flag error's text: its last line, without the type of the
  errors that bad input raises."""
  text = str(e).replace("\\n", "\n")
  if "Traceback (most recent call last)" not in text:
    return None
  last = [line.strip() for line in text.splitlines() if line.strip()][-1]
  kind, _, message = last.partition(": ")
  user = {t.__name__ for t in USER_ERRORS} | {"FileNotFoundError", "TypeError"}
  return message if kind in user and message else last


def _parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  try:
    rest = flag_values(argv)
    for name in list(flag_values):  # config files load lazily: load them now, inside the boundary
      value = flag_values[name].value
      if type(value).__name__ == "_ErrorConfig":
        value._ReportError()  # pylint: disable=protected-access
    return rest
  except Exception as e:  # noqa: BLE001  (flag parsing runs config files: anything can fail)
    if "--traceback" in argv:
      raise
    message = _config_override_message(e, argv) if not isinstance(e, flags.Error) else None
    if message is None:
      message = _config_file_error(e) or describe(e)
    if isinstance(e, flags.Error) and "must have a value other than None" in message:
      name = re.search(r"--(\w+)", message)
      message = f"--{name.group(1) if name else '?'} is required; see --help."
    _exit(message, 2)


def _no_library_error_tracebacks(record: std_logging.LogRecord) -> bool:
  """Drops orbax's error records (each with a traceback): the error they log is raised to the
  boundary and printed once, as one line (`--traceback` keeps them)."""
  return not (record.levelno >= std_logging.ERROR and
              "/orbax/" in record.pathname.replace(os.sep, "/"))


def _closed_loop(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _hush_closed_loop_callbacks() -> None:
  """After a failed background write, tensorstore's threads still call back into orbax's event
  loop, which is closed by then; each call prints a traceback ("Event loop is closed") through
  the interpreter's hooks. The write error itself is the run's one line: drop only those.
  Installed once per process (a second call would wrap the hooks again)."""
  if getattr(sys.excepthook, "hushes_closed_loop", False):
    return
  excepthook, threadhook, unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook
  sys.excepthook = lambda t, e, tb: None if _closed_loop(e) else excepthook(t, e, tb)
  threading.excepthook = lambda a: None if _closed_loop(a.exc_value) else threadhook(a)
  sys.unraisablehook = lambda u: None if _closed_loop(u.exc_value) else unraisable(u)
  sys.excepthook.hushes_closed_loop = True


def _exit(message: str, code: int):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def user_errors():
  """Turns any exception in its body into one line and a non-zero exit (see the docstring)."""
  if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if not (flags.FLAGS.is_parsed() and _TRACEBACK.value):
    # A failed background write (orbax / tensorstore on a full disk) is reported as the run's one
    # error line; asyncio and orbax's threads would also log its traceback once per failed task.
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    for handler in {logging.get_absl_handler(), *std_logging.getLogger().handlers}:
      handler.addFilter(_no_library_error_tracebacks)
    _hush_closed_loop_callbacks()
  try:
    yield
  except (SystemExit, GeneratorExit):
    raise
  except BaseException as e:  # noqa: BLE001  (the boundary: every error ends in one line)
    signum = getattr(e, "signum", None)
    if isinstance(signum, int) and signum > 0:  # Preempted, Interrupted: the run said what
      sys.exit(128 + signum)  #                   happened and how to resume
    if isinstance(e, KeyboardInterrupt):
      _exit("interrupted.", 128 + 2)
    if flags.FLAGS.is_parsed() and _TRACEBACK.value:
      raise
    message = describe(e)
    if not isinstance(e, USER_ERRORS) and type(e).__name__ != "FailedToLearn":
      message += " (unexpected: re-run with --traceback for the details and report it)"
    _exit(message, 1)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` inside the boundary: flag parsing included, tracebacks behind --traceback."""
  def guarded(argv):
    name = os.path.basename(argv[0]).removesuffix(".py")
    with user_errors(), workdir.stop_on_signal(f"[{name}]"):  # a signal outside a training loop
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
      main(argv)
  app.run(guarded, flags_parser=_parse_flags)

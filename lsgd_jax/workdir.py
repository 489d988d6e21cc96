"""A run's claim on its workdir: usable path, one run at a time, no stale temporaries.

`claim(workdir)` (a context manager, taken by `train.train_and_evaluate` before anything else):

- checks that the workdir is a directory this process can create and write, and says why not in
  one line (a file in the way, a read-only or impossible path, an empty name);
- takes an exclusive OS file lock on `workdir/.lock` (`fcntl.flock`): a second run on the same
  workdir stops at once with a line naming the holder's pid and host. The kernel drops the lock
  when its process dies, even by `kill -9`, so a killed run never leaves the workdir stuck;
- under the lock, removes the partial temporaries a killed or failed save leaves behind
  (orbax's `*.orbax-checkpoint-tmp*` folders, `*.tmp` files), which would otherwise keep a full
  disk full.

Only process 0 locks and cleans (the others of a multi-process run share its file system).

`stop_on_signal(tag)`: while a run sets up (builds the corpus, restores, compiles: before its
training loop, whose own flag then takes over), SIGTERM / SIGINT stop it at once with a line
saying so (`Interrupted`, exit 128 + the signal): nothing was trained since the last checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import signal
import socket
import threading
from typing import Iterator

LOCK_NAME = ".lock"
TEMP_PATTERNS = ("*.orbax-checkpoint-tmp*", "*.tmp")


class WorkdirBusy(ValueError):
  """Another live process holds the workdir's lock."""


def check_usable(workdir: str) -> str:
  """Creates `workdir` if needed and returns its absolute path; ValueError (one line) if it is
  not a writable directory."""
  if not isinstance(workdir, str) or not workdir.strip():
    raise ValueError(f"workdir {workdir!r} is empty; give a directory to write the run to, e.g. "
                     "--workdir=runs/tiny.")
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"workdir {workdir} is a file, not a directory; give a directory (new or "
                     "one a run wrote).")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"workdir {workdir} cannot be created ({e.strerror}); give a directory you "
                     "can write.") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir} is not writable by this user; give a directory you can "
                     "write.")
  return path


def remove_temporaries(workdir: str) -> list[str]:
  """Removes partial save temporaries under `workdir` (two levels deep); returns their paths."""
  found = []
  for depth in ("", "*", os.path.join("*", "*")):
    for pattern in TEMP_PATTERNS:
      found += glob.glob(os.path.join(workdir, depth, pattern))
  for path in sorted(set(found)):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.remove(path)
  return sorted(set(found))


def holder(workdir: str) -> str:
  """'pid N on HOST' of the lock file's last writer ('unknown' if unreadable)."""
  try:
    with open(os.path.join(workdir, LOCK_NAME)) as f:
      return f.read().strip() or "unknown"
  except OSError:
    return "unknown"


@contextlib.contextmanager
def claim(workdir: str, *, lead: bool = True) -> Iterator[str]:
  """Yields the absolute workdir while this process holds its lock (see the module docstring).
  `lead=False` (processes other than 0) only checks the path."""
  path = check_usable(workdir)
  if not lead:
    yield path
    return
  lock_path = os.path.join(path, LOCK_NAME)
  try:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise ValueError(f"workdir {workdir}: cannot create its lock file ({e.strerror}); give a "
                     "directory you can write.") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirBusy(f"workdir {workdir} is in use by another run ({holder(path)}); wait for "
                        "it to finish or stop it, or use another workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    for p in remove_temporaries(path):
      print(f"removed a partial save left by an earlier run: {p}", flush=True)
    yield path
  finally:
    os.close(fd)  # releases the lock (the file stays: removing it would race a waiting run)


class Interrupted(BaseException):
  """A signal stopped the run while it was setting up (no step taken: nothing to save). A
  BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(f"stopped by signal {signum} while setting up; re-run the same command.")


@contextlib.contextmanager
def stop_on_signal(tag: str) -> Iterator[None]:
  """SIGTERM / SIGINT raise `Interrupted` (after a line saying so) inside the block; main thread
  only (elsewhere signals cannot be handled)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    del frame
    print(f"{tag} stopped by signal {signum} while setting up (before training this attempt): "
          "nothing was lost since the last checkpoint; re-run the same command to resume.",
          flush=True)
    raise Interrupted(signum)
  old = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)

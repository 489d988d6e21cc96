"""Multi-process set-up: `initialize()` before anything touches devices.

One process per host (or per GPU), all running the same program. After `initialize()`,
`jax.devices()` lists every process's devices, `mesh.make_layout` builds one global mesh over them
(the `'worker'` axis across processes, slices or nodes), and every jitted step runs on all of them.

Where the settings come from, first match wins:
1. the arguments (the binaries pass `--coordinator_address --num_processes --process_id`);
2. the environment: `LSGD_COORDINATOR` (host:port of process 0), `LSGD_NUM_PROCESSES`,
   `LSGD_PROCESS_ID`;
3. detected: on Cloud TPU (libtpu installed), under Slurm with more than one task, or under
   Open MPI with more than one rank, `jax.distributed.initialize()` finds the hosts itself (GCE
   metadata, SLURM_* / OMPI_* variables); on a TPU VM where it finds no cluster the run stays
   single-process.
Nothing given and none detected: a single process; nothing is done. `LSGD_NUM_PROCESSES=1` forces
that. (Slurm and Open MPI on GPUs give each process one GPU: launch one task per GPU.)

On CPU (tests, laptops) the cross-process collectives are gloo over TCP
(`jax_cpu_collectives_implementation`: the default of JAX 0.10; set here where it is unset).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Mapping, Sequence, TypeVar

import jax

ENV_COORDINATOR = "LSGD_COORDINATOR"
ENV_NUM_PROCESSES = "LSGD_NUM_PROCESSES"
ENV_PROCESS_ID = "LSGD_PROCESS_ID"
T = TypeVar("T")


def _env_int(env: Mapping[str, str], key: str) -> int | None:
  value = env.get(key, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${key}={value!r} is not an integer.") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None,
            env: Mapping[str, str] | None = None) -> tuple[str | None, int | None, int | None]:
  """The (coordinator, process count, process id) from the arguments, else the environment;
  validated. Pure: touches no device."""
  env = os.environ if env is None else env
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(env, ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(env, ENV_PROCESS_ID)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be at least 1, got {num_processes}.")
  if process_id is not None and process_id < 0:
    raise ValueError(f"process_id must be non-negative, got {process_id}.")
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise ValueError(f"process_id={process_id} must be below num_processes={num_processes} "
                     f"(ids are 0 .. {num_processes - 1}).")
  if num_processes is not None and num_processes > 1 and coordinator_address is None:
    raise ValueError(f"num_processes={num_processes} needs a coordinator address (host:port of "
                     f"process 0): --coordinator_address or ${ENV_COORDINATOR}.")
  if coordinator_address is not None and ":" not in coordinator_address:
    raise ValueError(f"coordinator address {coordinator_address!r} must be host:port, e.g. "
                     "10.0.0.1:1234.")
  return coordinator_address, num_processes, process_id


def _on_cloud_tpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def _launcher_detected(env: Mapping[str, str]) -> bool:
  """Slurm (several tasks) or Open MPI (several ranks): JAX reads the rest from their variables."""
  slurm = "SLURM_JOB_ID" in env and (_env_int(env, "SLURM_NTASKS") or 1) > 1
  return slurm or (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1


def _cpu_collectives() -> None:
  """CPU processes talk through gloo unless the user chose otherwise."""
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               local_device_ids: int | Sequence[int] | None = None,
               initialization_timeout: int = 300) -> bool:
  """Joins this process to a multi-process run; returns whether the run is multi-process.

  Call once, before any JAX computation or `jax.devices()`. Single process (nothing given, no
  TPU, or one process): does nothing and returns False. Otherwise every process must call it with
  the same coordinator address and process count and its own id (on Cloud TPU, Slurm and Open MPI
  the three may be left out: JAX detects them).
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator_address, num_processes, process_id = resolve(coordinator_address, num_processes,
                                                            process_id)
  if num_processes == 1:
    return False
  explicit = coordinator_address is not None or num_processes is not None
  detected = _launcher_detected(os.environ)
  if not explicit and not detected and not _on_cloud_tpu():
    return False
  _cpu_collectives()
  if explicit:  # a missing coordinator or peer is otherwise minutes of silence, then an abort
    print(f"[distributed] process {process_id if process_id is not None else '?'} of "
          f"{num_processes if num_processes is not None else '?'}: joining the coordinator at "
          f"{coordinator_address or '(detected)'}, waiting up to {initialization_timeout} s for "
          "every process", flush=True)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
  except RuntimeError as e:
    if "backend" in str(e).lower():  # devices were touched first
      raise RuntimeError("distributed.initialize() must run before anything touches JAX devices "
                         "(jax.devices(), a jitted call, an array creation).") from e
    raise
  except ValueError:
    if explicit or detected:
      raise
    # libtpu is installed but JAX found no TPU cluster (e.g. a single-host VM): one process.
    logging.info("No TPU cluster detected; running as a single process.")
    return False
  if num_processes is not None and jax.process_count() != num_processes:
    raise ValueError(f"--num_processes={num_processes} here, but the coordinator at "
                     f"{coordinator_address} runs {jax.process_count()} processes: give every "
                     "process the same count.")
  return jax.process_count() > 1


def process_zero_first(fn: Callable[[], T]) -> T:
  """`fn()` on process 0, then, after a barrier, on the other processes.

  For work that fills a cache (the tfds corpus, a trained vocabulary, token arrays): on a shared
  disk process 0 builds it once and the others read it, instead of all building it at once
  (and, for a trained vocabulary, never with the risk of two hosts training different ones).
  One process: just `fn()`.
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("lsgd_jax: process 0 has built its caches")
  return out if jax.process_index() == 0 else fn()


def describe() -> str:
  """`process i of n, d local / D global devices`, for the first log line of a run."""
  return (f"process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global "
          f"{jax.devices()[0].platform} device(s)")

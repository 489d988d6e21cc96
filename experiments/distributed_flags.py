"""Flags of multi-process runs, shared by the binaries; `initialize()` runs before any device use.

Every process of a run gets the same `--coordinator_address` and `--num_processes` and its own
`--process_id`; left out, they come from $LSGD_COORDINATOR / $LSGD_NUM_PROCESSES / $LSGD_PROCESS_ID,
or (Cloud TPU, Slurm, Open MPI) are detected. See lsgd_jax/distributed.py and WORKSPACE.md.
"""

from absl import flags

from lsgd_jax import distributed

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 in a multi-process run (all processes "
    "pass the same); default $LSGD_COORDINATOR, or detected on Cloud TPU / Slurm.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (default $LSGD_NUM_PROCESSES; none: one, or "
    "detected on Cloud TPU / Slurm).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id, 0 .. num_processes - 1 (default $LSGD_PROCESS_ID).")


def initialize() -> bool:
  """Joins the multi-process run the flags describe (nothing for one process)."""
  return distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

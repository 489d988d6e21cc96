"""Checkpoints that hold everything needed to continue, and exported models.

One orbax `CheckpointManager` per run, under `workdir/checkpoints`. Each checkpoint has two items:
- `state`: the whole `TrainState` (global parameters and outer optimizer state, every worker's
  parameters and inner optimizer state, the step), saved and restored with its shardings;
- `meta`: JSON: the step, the data position, cumulative counters (bytes communicated, skipped
  rounds), the tokenizer's identity and the resolved config.

Resume order (train.py): build the run -> `restore_latest(abstract_state, check_meta)`, which
for the newest checkpoint reads `meta` first and checks the saved config against the current one
(`check_compatible`: an incompatible change stops the run before any state is read) and that the
stored shapes fit the run (a mismatch is an error, never "damage"), then restores the state and
verifies its checksum -> the tokenizer -> continue at `meta.step`, mid-round included (the
position in the round is `step % H`). The data stream is a pure function of (seed, step) or
carries its own position in `meta["data"]`.

Integrity: orbax writes each checkpoint to a temporary folder and renames it when complete, so a
save cut short never shows up as a step (workdir.claim removes the temporaries). `meta` holds a
checksum of every leaf of the state (`state_checksum`, computed on the devices); a checkpoint
whose bytes were damaged afterwards either fails to read or fails the checksum, and the previous
one is used, with a warning. A failed write (a full disk) stops the run with one line naming the
folder and the space a checkpoint needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lsgd_jax import faults
from lsgd_jax.config import async_save as _async_save
from lsgd_jax.config import base_config

# Changing one of these makes a saved state mean something else (or not fit): a clear error.
UNSAFE_KEYS = ("algorithm", "seed", "model.", "data.name", "data.path", "data.tokenizer",
               "data.vocab_size", "data.seq_len", "data.non_iid", "data.dirichlet_alpha",
               "data.val_fraction", "data.text_field", "data.domain_field",
               "train.global_batch", "optim.name", "local_sgd.num_workers",
               "local_sgd.outer_optimizer", "train.on_nonfinite")
# Keys under an unsafe prefix that change neither the state nor the function it computes.
SAFE_KEYS = ("model.attention_chunks",)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_compatible(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
  """Raises ValueError if resuming under `current` would misread the saved state; returns the
  safe changes (e.g. total steps, log interval) as readable lines."""
  unsafe, safe = config_changes(saved, current)
  if unsafe:
    raise ValueError("The checkpoint was written with a different configuration that changes "
                     "the state's shape or meaning: " + "; ".join(unsafe) +
                     ". Use a new workdir for the new configuration, or restore the old values.")
  return safe


def config_changes(saved: dict, current: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(unsafe, safe) differences between a saved config and `current`, as "key: old -> new"."""
  old = _flatten(saved)
  new = _flatten(json.loads(current.to_json_best_effort()))
  defaults = _flatten(json.loads(base_config().to_json_best_effort()))
  unsafe, safe = [], []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if a == b or (key not in old and key in defaults and b == defaults[key]):
      continue  # a key added to the schema since the save, at its default: nothing changed
    line = f"{key}: {a!r} -> {b!r}"
    (unsafe if key not in SAFE_KEYS and any(key == u or (u.endswith(".") and key.startswith(u))
                                            for u in UNSAFE_KEYS) else safe).append(line)
  return unsafe, safe


class CheckpointsDamaged(ValueError):
  """A run's checkpoints exist but none of them restores intact."""


class CheckpointWriteError(OSError):
  """A checkpoint or export could not be written (e.g. the disk is full)."""


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of an array as uint32 (one value per element)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 8:  # two words per element
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
                                      ).astype(jnp.uint32)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
  out = []
  for x in leaves:
    b = _bits(x).reshape(-1)
    weight = 2 * jnp.arange(b.size, dtype=jnp.uint32) + 1  # odd: each element counts, by place
    out.append(jnp.sum(b * weight, dtype=jnp.uint32))  # integer sums wrap: order-independent
  return out


def state_checksum(state: Any) -> list[int]:
  """One uint32 per leaf of `state`: a position-weighted sum of its bits, computed on the
  devices (every process gets the same numbers). Identical states give identical sums."""
  leaves = jax.tree.leaves(state)
  return [int(v) for v in jax.device_get(_checksums(leaves))]


def _nbytes(tree: Any) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


def _size(n: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n:.0f} B"


def _first_line(e: BaseException) -> str:
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def write_error(what: str, directory: str, needed: int, e: BaseException) -> CheckpointWriteError:
  """The one-line error of a failed write: where, why, and the space needed and free."""
  try:
    where = directory if os.path.isdir(directory) else os.path.dirname(directory)
    free = f"{_size(shutil.disk_usage(where).free)} free there"
  except OSError:
    free = "free space unknown"
  return CheckpointWriteError(f"cannot write {what} to {directory} ({_first_line(e)}); it needs "
                              f"about {_size(needed)} ({free}). Free some space (or fix the "
                              "folder) and re-run the same command to resume.")


def _shape_mismatch(stored: Any, abstract: Any) -> str | None:
  """'leaf PATH: stored (a, b) vs this run (c, d)' for the first leaf that differs, or None."""
  def flat(tree):  # NamedTuple fields and dict keys read alike: ['params']['w']
    return {re.sub(r"\.(\w+)", r"['\1']", jax.tree_util.keystr(k)): v
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  try:
    flat_s, flat_a = flat(stored), flat(abstract)
  except Exception:  # noqa: BLE001  (unreadable metadata: the restore itself will say)
    return None
  if len(flat_s) != len(flat_a):
    return f"the stored state has {len(flat_s)} arrays, this run's {len(flat_a)}"
  for (ks, vs), (ka, va) in zip(sorted(flat_s.items()), sorted(flat_a.items())):
    shape_s, shape_a = tuple(getattr(vs, "shape", ())), tuple(getattr(va, "shape", ()))
    if shape_s != shape_a:
      return f"array {ka}: stored shape {shape_s}, this run's {shape_a}"
  return None


def _cpu_array_handler() -> None:
  """On a CPU, saves each array from one replica. Orbax's default (outside GPUs) splits a
  replicated array into one slice per replica so that replicas write in parallel; on a host's
  fake devices that only compiles one tiny `slice` program per array and replica (128 programs,
  ~6 s of a tiny run's 30) and writes the same disk. Registered once, for every orbax save in
  the process; TPU and GPU keep orbax's default."""
  global _HANDLER_SET
  if _HANDLER_SET or jax.default_backend() != "cpu":
    return
  absl_logger = logging.getLogger("absl")  # orbax warns that it overrides its default: expected
  level, absl_logger.level = absl_logger.level, logging.ERROR
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    absl_logger.setLevel(level)
  _HANDLER_SET = True


_HANDLER_SET = False


class Checkpointer:
  """Saves on an interval in steps and in minutes, keeps the last `max_to_keep`. With minutes
  set, the first save is at `first_step` (the first outer sync), so an early crash loses at most
  one round instead of the first interval. `async_save`: write in the background (True), while
  the caller waits (False), or "auto" (or None): in the background except on a CPU (where the
  write shares the cores with training and its host copy of the state adds to the next steps'
  memory)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, every_steps: int = 0,
               every_minutes: float = 0.0, async_save: bool | str | None = "auto",
               first_step: int = 0):
    self.directory = os.path.abspath(directory)
    self.every_steps, self.every_minutes = every_steps, every_minutes
    self.first_step = first_step
    self._last_time = time.monotonic()
    self._needed = 0  # bytes of the last state saved (for the message of a failed write)
    self._pending = None  # step of the save that may still be writing in the background
    self._unreported = False  # a save started whose end `save_finished` has not reported
    async_save = _async_save(async_save)
    if async_save == "auto":
      async_save = jax.default_backend() != "cpu"
    _cpu_array_handler()
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def due(self, step: int) -> bool:
    if self.every_steps and step % self.every_steps == 0:
      return True
    if self.every_minutes and step == self.first_step:
      return True
    return bool(self.every_minutes) and (time.monotonic() - self._last_time
                                         >= 60 * self.every_minutes)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves (in the background if async) with the state's checksum in `meta`; every process
    must call it. A failed write raises CheckpointWriteError (here or at the next save / wait)."""
    if step in self.manager.all_steps():
      return
    faults.point("save", step)
    self.wait()  # a background write that failed is reported under its own step
    self._needed = _nbytes(state)
    meta = {**meta, "checksum": state_checksum(state)}
    with self._writing(step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))
    self._pending = step
    self._unreported = True
    self._last_time = time.monotonic()

  def save_finished(self) -> bool:
    """True once for each save, at the first call after its background write ended."""
    if not self._unreported or self.manager is None or self.manager.is_saving_in_progress():
      return False
    self._unreported = False
    return True

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """Turns a failed write into one CheckpointWriteError and removes its partial folder."""
    try:
      yield
    except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many types)
      from lsgd_jax import workdir  # pylint: disable=import-outside-toplevel
      if jax.process_index() == 0:
        workdir.remove_temporaries(self.directory)
      what = f"checkpoint {step}" if step is not None else "a checkpoint"
      raise write_error(what, self.directory, self._needed, e) from None

  def restore_latest(self, abstract_state: Any, check_meta=None) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores intact, or None.

    For each checkpoint, newest first: reads `meta`; `check_meta(meta)` may raise (e.g. an
    incompatible config: the error stops the resume before any state is read); a stored state
    whose shapes differ from `abstract_state` raises ValueError (the run does not fit it: not
    damage); a checkpoint that fails to read or fails its checksum is skipped with a warning.
    If there are checkpoints but none is intact, raises `CheckpointsDamaged` rather than start
    the run again from step 0 (which would throw its work away without a word).
    """
    damaged = []

    def skip(step: int, why: str) -> None:
      print(f"WARNING: checkpoint {step} is damaged ({why}); trying an older one.", flush=True)
      damaged.append(f"{step} ({why})")

    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = dict(self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])
      except Exception as e:  # noqa: BLE001  (any failure to read means: try the previous one)
        skip(step, f"its meta cannot be read: {_first_line(e)}")
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        stored = self.manager.item_metadata(step)["state"]
      except Exception:  # noqa: BLE001  (old orbax layouts: the restore below decides)
        stored = None
      mismatch = _shape_mismatch(stored, abstract_state) if stored is not None else None
      if mismatch:
        saved_devices = meta.get("devices")  # (checkpoints from before 2026-12-06: absent)
        moved = (f"it was written by a run on {saved_devices} devices and this run has "
                 f"{jax.device_count()} (fake CPU devices: XLA_FLAGS=--xla_force_host_platform_"
                 "device_count=N), or " if saved_devices and saved_devices != jax.device_count()
                 else "")
        raise ValueError(f"checkpoint {step} in {self.directory} holds a state of another shape "
                         f"than this run builds ({mismatch}): {moved}the run's layout or code "
                         "changed (e.g. mesh.num_devices, local_sgd.two_stage, "
                         "local_sgd.shard_outer: runs saved before 2026-12-06 hold the outer state "
                         "replicated, resume them with --config.local_sgd.shard_outer=False). Use "
                         "a new workdir, or the devices and settings it was written with.")
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
      except Exception as e:  # noqa: BLE001
        skip(step, _first_line(e))
        continue
      if "checksum" in meta and state_checksum(state) != list(meta["checksum"]):
        skip(step, "its state does not match the checksum written with it")
        continue
      return state, meta
    if damaged:
      raise CheckpointsDamaged(
          f"every checkpoint in {self.directory} is damaged: {'; '.join(damaged)}. "
          "Resuming would start the run again from step 0. To do that, move the folder aside "
          "(or delete it) and re-run; to keep the work, put back intact copies of its files.")
    return None

  def wait(self) -> None:
    """Waits for the save in flight, if any; its failure raises CheckpointWriteError naming it."""
    with self._writing(self._pending):
      self.manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    """Waits for saves in flight and releases the manager; safe to call twice."""
    if self.manager is not None:
      manager, self.manager = self.manager, None
      try:
        with self._writing(self._pending):
          manager.wait_until_finished()
      finally:
        self._pending = None
        manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the target of a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---------------------------------------------------------------------------------------------
# Exported models: the global parameters alone, loadable without the training state.


def export_model(directory: str, params: Any, model_cfg: Any, extra: dict | None = None) -> str:
  """Writes `directory/params` (orbax) and `directory/model.json` (architecture, tokenizer)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  directory = os.path.abspath(directory)
  _cpu_array_handler()
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(os.path.join(directory, "params"), params, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
      with open(os.path.join(directory, "model.json") + ".tmp", "w") as f:
        json.dump({"model": dataclasses.asdict(model_cfg), **(extra or {})}, f, indent=2)
      os.replace(os.path.join(directory, "model.json") + ".tmp",
                 os.path.join(directory, "model.json"))
  except Exception as e:  # noqa: BLE001
    raise write_error("the exported model", directory, _nbytes(params), e) from None
  finally:
    ckptr.close()
  return directory


def export_present(directory: str) -> bool:
  """Whether `directory` holds a whole export (model.json readable, the parameters' metadata
  readable), without reading the parameters themselves onto a device."""
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  try:
    with open(os.path.join(directory, "model.json")) as f:
      json.load(f)
    meta = ckptr.metadata(os.path.join(directory, "params"))  # (a missing folder: empty)
    return getattr(meta, "item_metadata", None) is not None
  except Exception:  # noqa: BLE001  (missing files, JSON, orbax / tensorstore errors)
    return False
  finally:
    ckptr.close()


def load_model(directory: str):
  """(ModelConfig, params, info) of an exported model, parameters on the default device."""
  from lsgd_jax import model as model_lib
  directory = os.path.abspath(directory)
  path = os.path.join(directory, "model.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not an exported model (no model.json); export one "
                            "with lsgd_jax.checkpoint.export_model or a finished training run's "
                            "workdir/export.")
  try:
    with open(path) as f:
      info = json.load(f)
    cfg = model_lib.ModelConfig(**info["model"])
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{path} is not a valid model description ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}); re-export the model from its run "
                     "(re-run its training command).") from None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # any topology can load it
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0))))
  ckptr = ocp.StandardCheckpointer()
  try:
    params = ckptr.restore(os.path.join(directory, "params"), abstract)
  except Exception as e:  # noqa: BLE001  (orbax / tensorstore: truncated or edited files)
    raise ValueError(f"the parameters in {os.path.join(directory, 'params')} cannot be read "
                     f"({_first_line(e)}); the export is incomplete or damaged: delete {directory} "
                     "and re-run the training command of its workdir to export it again.") from None
  finally:
    ckptr.close()
  return cfg, params, info

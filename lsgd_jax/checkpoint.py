"""Checkpoints that hold everything needed to continue, and exported models.

One orbax `CheckpointManager` per run, under `workdir/checkpoints`. Each checkpoint has two items:
- `state`: the whole `TrainState` (global parameters and outer optimizer state, every worker's
  parameters and inner optimizer state, the step), saved and restored with its shardings;
- `meta`: JSON: the step, the data position, cumulative counters (bytes communicated, skipped
  rounds), the tokenizer's identity and the resolved config.

Resume order (train.py): build the run -> `restore_latest(abstract_state)` -> check the saved
config against the current one (`check_compatible`) and the tokenizer -> continue at `meta.step`,
mid-round included (the position in the round is `step % H`). The data stream is a pure function
of (seed, step) or carries its own position in `meta["data"]`.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a save cut
short never shows up as a step; a checkpoint damaged afterwards fails to restore and the previous
one is used, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from lsgd_jax.config import base_config

# Changing one of these makes a saved state mean something else (or not fit): a clear error.
UNSAFE_KEYS = ("algorithm", "seed", "model.", "data.name", "data.path", "data.tokenizer",
               "data.vocab_size", "data.seq_len", "data.non_iid", "data.dirichlet_alpha",
               "train.global_batch", "optim.name", "local_sgd.num_workers",
               "local_sgd.outer_optimizer", "train.on_nonfinite")


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
  old = _flatten(saved)
  new = _flatten(json.loads(current.to_json_best_effort()))
  defaults = _flatten(json.loads(base_config().to_json_best_effort()))
  unsafe, safe = [], []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if a == b or (key not in old and key in defaults and b == defaults[key]):
      continue  # a key added to the schema since the save, at its default: nothing changed
    line = f"{key}: {a!r} -> {b!r}"
    (unsafe if any(key == u or (u.endswith(".") and key.startswith(u))
                   for u in UNSAFE_KEYS) else safe).append(line)
  if unsafe:
    raise ValueError("The checkpoint was written with a different configuration that changes "
                     "the state's shape or meaning:\n  " + "\n  ".join(unsafe) +
                     "\nUse a new workdir for the new configuration, or restore the old values.")
  return safe


class Checkpointer:
  """Saves on an interval in steps and in minutes, keeps the last `max_to_keep`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, every_steps: int = 0,
               every_minutes: float = 0.0, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps, self.every_minutes = every_steps, every_minutes
    self._last_time = time.monotonic()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def due(self, step: int) -> bool:
    if self.every_steps and step % self.every_steps == 0:
      return True
    return bool(self.every_minutes) and (time.monotonic() - self._last_time
                                         >= 60 * self.every_minutes)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an (asynchronous) save; every process must call it."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))
    self._last_time = time.monotonic()

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores; damaged ones are skipped with a warning."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])
      except Exception as e:  # noqa: BLE001  (any failure to read means: try the previous one)
        logging.warning("Checkpoint at step %d in %s cannot be restored (%s: %s); trying the "
                        "previous one.", step, self.directory, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
        print(f"WARNING: checkpoint {step} is damaged ({type(e).__name__}); using an older one.",
              flush=True)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for saves in flight and releases the manager; safe to call twice."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the target of a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---------------------------------------------------------------------------------------------
# Exported models: the global parameters alone, loadable without the training state.


def export_model(directory: str, params: Any, model_cfg: Any, extra: dict | None = None) -> str:
  """Writes `directory/params` (orbax) and `directory/model.json` (architecture, tokenizer)."""
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "params"), params, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    import dataclasses
    with open(os.path.join(directory, "model.json"), "w") as f:
      json.dump({"model": dataclasses.asdict(model_cfg), **(extra or {})}, f, indent=2)
  return directory


def load_model(directory: str):
  """(ModelConfig, params, info) of an exported model, parameters on the default device."""
  from lsgd_jax import model as model_lib
  directory = os.path.abspath(directory)
  path = os.path.join(directory, "model.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not an exported model (no model.json); export one "
                            "with lsgd_jax.checkpoint.export_model or a finished training run's "
                            "workdir/export.")
  with open(path) as f:
    info = json.load(f)
  cfg = model_lib.ModelConfig(**info["model"])
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # any topology can load it
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0))))
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), abstract)
  return cfg, params, info

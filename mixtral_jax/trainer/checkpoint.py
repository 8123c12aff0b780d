"""Orbax checkpoints of the train state plus the data iterator position.

Layout under `directory` (= <workdir>/checkpoints):
  <step>/state/   model + optimizer state (nested dict of arrays, orbax StandardSave)
  <step>/data/    data iterator state (JSON, orbax JsonSave)
The step of a checkpoint is the number of optimizer updates applied (and batches consumed).
A checkpoint that fails to restore is moved to <workdir>/corrupt_checkpoints/<step> and the
previous one is tried, with a logged warning. If checkpoints exist but none restores, `restore_latest`
raises rather than letting a resumed run start from scratch.
"""
from __future__ import annotations

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointRestoreError(RuntimeError):
  """The workdir holds checkpoints but none of them could be restored."""


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree):
  # orbax stores plain arrays; typed PRNG keys travel as their raw key data.
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract(x):
  if _is_key(x):
    x = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=sharding)


def _from_saveable(restored, target):
  def f(r, t):
    if _is_key(t):
      return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
    return r
  return jax.tree.map(f, restored, target)


class Checkpointer:
  """Periodic (optionally async) checkpoints with max_to_keep and fallback on corrupt ones."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._corrupt_dir = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = self._new_manager()

  def _new_manager(self):
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict | None):
    """Starts saving `state` (pytree of arrays) and the JSON `data_state` at `step`.

    Returns once the arrays are copied off the device, so the caller may donate them next.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        data=ocp.args.JsonSave(data_state if data_state is not None else {})), force=True)

  def restore_latest(self, target_state, *, quarantine: bool = True):
    """Restores the newest readable checkpoint into the structure/shardings of `target_state`.

    Returns (step, state, data_state), or None when the directory holds no checkpoint.
    Raises CheckpointRestoreError when checkpoints exist but none restores. With `quarantine`,
    unreadable checkpoints newer than the restored one are moved aside (readers pass False).
    """
    self._manager.wait_until_finished()
    # Step folders orbax no longer recognizes (e.g. metadata deleted) still count as checkpoints
    # that must restore or be reported: a resumed run never silently starts from scratch.
    on_disk = {int(n) for n in os.listdir(self.directory) if n.isdigit()} if os.path.isdir(
        self.directory) else set()
    steps = sorted(set(self._manager.all_steps()) | on_disk, reverse=True)
    if not steps:
      return None
    abstract = jax.tree.map(_abstract, target_state)
    errors = []
    for step in steps:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        state = _from_saveable(restored["state"], target_state)
        data_state = restored["data"]
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        log.warning("checkpoint at step %d in %s could not be restored (%s: %s); "
                    "falling back to the previous checkpoint", step, self.directory,
                    type(e).__name__, str(e)[:500])
        continue
      if errors and quarantine:
        self._quarantine([s for s in steps if s > step])
      return step, state, data_state
    raise CheckpointRestoreError(
        f"{self.directory} holds checkpoints at steps {sorted(steps)} but none could be restored; "
        "refusing to start from scratch. Errors:\n" + "\n".join(e[:1000] for e in errors))

  def _quarantine(self, steps):
    # Moves unreadable checkpoints aside so the steps can be saved again (and inspected later).
    if jax.process_index() == 0:
      os.makedirs(self._corrupt_dir, exist_ok=True)
      for s in steps:
        src = os.path.join(self.directory, str(s))
        if os.path.exists(src):
          dst = os.path.join(self._corrupt_dir, str(s))
          if os.path.exists(dst):
            shutil.rmtree(dst)
          shutil.move(src, dst)
          log.warning("moved unreadable checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("mixtral_jax.checkpoint.quarantine")
    self._manager.close()
    self._manager = self._new_manager()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

"""Orbax checkpoints of the train state plus the data iterator position: the trainer owns this layout.

Layout under `directory` (= <workdir>/checkpoints):
  <step>/state/   model + optimizer state: the pure dict of nnx.split((model, optimizer))[1], i.e.
                  {0: model state, 1: optimizer state} (nested dict of arrays, orbax StandardSave)
  <step>/data/    data iterator state (JSON, orbax JsonSave)
`save_model_checkpoint` writes a step in this layout from a model alone (fresh optimizer: convert
uses it); `restore_model` reads back the model only (key 0), never building the optimizer state.
The step of a checkpoint is the number of optimizer updates applied (and batches consumed).
A checkpoint that fails to restore is moved to <workdir>/corrupt_checkpoints/<step> and the
previous one is tried, with a logged warning. If checkpoints exist but none restores, `restore_latest`
raises rather than letting a resumed run start from scratch.
"""
from __future__ import annotations

import logging
import math
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MODEL_KEY = "0"  # the model's subtree of the saved state (the optimizer's is "1")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


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

  def restore_latest(self, target_state, *, quarantine: bool = True, subtree: str | None = None):
    """Restores the newest readable checkpoint into the structure/shardings of `target_state`.

    subtree: restore only this top-level key of the saved state (e.g. MODEL_KEY), `target_state`
    being that subtree's target; the rest of the checkpoint is never read.
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
    if subtree is None:
      state_args = ocp.args.StandardRestore(abstract)
    else:  # orbax partial restore: only the leaves of {subtree: target} are read
      item = {subtree: abstract}
      state_args = ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)
    errors = []
    for step in steps:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=state_args, data=ocp.args.JsonRestore()))
        state = restored["state"] if subtree is None else restored["state"][subtree]
        state = _from_saveable(state, target_state)
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


def initial_data_state(config) -> dict:
  """The state of the default data iterator before its first batch ({} without a data source)."""
  from mixtral_jax.data.pipeline import make_train_iterator
  try:
    return make_train_iterator(config, seed=config.seed, shard_index=jax.process_index(),
                               shard_count=jax.process_count()).get_state()
  except Exception as e:  # noqa: BLE001 - no data source configured: the trainer starts one fresh
    log.warning("no initial data iterator state (%s: %s); saving {}", type(e).__name__, e)
    return {}


def save_model_checkpoint(model, config, workdir: str, step: int = 0, data_state: dict | None = None):
  """Writes `model` as the trainer checkpoint <workdir>/checkpoints/<step>, with the optimizer
  freshly initialised from config.train and the data iterator's initial state (default), so
  `mixtral_jax.train` resumes (fine-tunes) from it and `restore_model` reads it. Call it under the
  model's mesh (`jax.set_mesh`): the optimizer state is created sharded like the parameters."""
  from mixtral_jax.trainer import optim
  tx, _ = optim.make_optimizer(config.train)
  _, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  ckpt = Checkpointer(checkpoint_dir(workdir), max_to_keep=config.train.max_to_keep, async_save=False)
  try:
    ckpt.save(step, nnx.to_pure_dict(state),
              initial_data_state(config) if data_state is None else data_state)
  finally:
    ckpt.close()


def _default_model_fn(model_config, *, rngs):
  from mixtral_jax.model.transformer import Transformer
  return Transformer(model_config, rngs=rngs)


def restore_model(config, workdir: str, mesh=None, model_fn=_default_model_fn):
  """The model of the latest restorable checkpoint in <workdir>/checkpoints, on `mesh` (default:
  the config's). Builds the model abstractly and reads only its subtree of the checkpoint: no
  optimizer state is allocated. Reads only: a checkpoint that fails is skipped, never moved.
  Returns (model, step); raises FileNotFoundError when the workdir has no checkpoint."""
  if not (os.path.isdir(checkpoint_dir(workdir))
          and any(n.isdigit() for n in os.listdir(checkpoint_dir(workdir)))):
    # Checked before building anything, and nothing is created in the workdir.
    raise FileNotFoundError(f"workdir: no checkpoint under {checkpoint_dir(workdir)}; "
                            "train first (python -m mixtral_jax.train ...)")
  from mixtral_jax import sharding
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    abstract = nnx.eval_shape(lambda: model_fn(config.model, rngs=nnx.Rngs(config.seed)))
  graphdef, state = nnx.split(abstract)

  def target(x):  # each leaf with its parameter's spec on the concrete mesh (replicated if none)
    s = getattr(x, "sharding", None)
    spec = tuple(s.spec) if isinstance(s, NamedSharding) else ()
    # orbax needs even splits (jit pads uneven ones, e.g. 1 kv head over tensor=4): replicate those dims
    even = []
    for d, axes in zip(x.shape, spec):
      n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else (axes or ())))
      even.append(axes if d % n == 0 else None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(*even)))

  ckpt = Checkpointer(checkpoint_dir(workdir), max_to_keep=config.train.max_to_keep, async_save=False)
  try:
    restored = ckpt.restore_latest(jax.tree.map(target, nnx.to_pure_dict(state)), quarantine=False,
                                   subtree=MODEL_KEY)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"workdir: no checkpoint under {checkpoint_dir(workdir)}; "
                            "train first (python -m mixtral_jax.train ...)")
  step, pure, _ = restored
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), step

"""The training loop: sharded state, one jitted train step with donated state, checkpoints, metrics.

  metrics = train(config, workdir)

A run whose workdir already holds checkpoints resumes from the latest readable one (model, optimizer,
router biases and data position), so the loss trajectory continues as if never interrupted.

What a run can trust:
- one run per workdir (<workdir>/lock, see trainer/workdir.py) and its config in
  <workdir>/config.json; resuming with a different model config is refused, naming the fields;
- a non-finite loss or gradient norm stops training at that step (NonFiniteError) and nothing
  non-finite is ever saved: the last good checkpoint stays;
- SIGTERM / SIGINT finish the current step, save a checkpoint and raise TrainingInterrupted
  (a second signal acts at once, as if no handler were installed).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mixtral_jax import config as config_lib
from mixtral_jax import sharding
from mixtral_jax.data.tokenizer import PAD
from mixtral_jax.trainer import checkpoint as ckpt_lib
from mixtral_jax.trainer import metrics as metrics_lib
from mixtral_jax.trainer import optim
from mixtral_jax.trainer import workdir as workdir_lib

log = logging.getLogger(__name__)

# Environment variables that mean "this process is one of several in a cluster".
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def is_multiprocess_env(env=None) -> bool:
  """True under a multi-process launcher (JAX coordinator, SLURM, Open MPI, multi-host TPU slice)."""
  env = os.environ if env is None else env
  if any(env.get(k) for k in _CLUSTER_ENV):
    return True
  def count(name):
    try:
      return int(env.get(name, "1"))
    except ValueError:
      return 1
  if env.get("SLURM_JOB_ID") and count("SLURM_NTASKS") > 1:
    return True
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  # (libtpu may leave a warning sentence in this variable: hostnames have no spaces.)
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip() and " " not in h]
  return len(hosts) > 1


def maybe_initialize_distributed():
  """jax.distributed.initialize() in a multi-process cluster; nothing on a single host."""
  if is_multiprocess_env() and not jax.distributed.is_initialized():
    # JAX_NUM_PROCESSES / JAX_PROCESS_ID: a launch without a cluster manager (one host, tests);
    # otherwise jax detects them (TPU slice, SLURM, Open MPI).
    kw = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
      kw = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kw)


def default_model_fn(model_config, *, rngs):
  from mixtral_jax.model.transformer import Transformer  # late: tests may train other models
  return Transformer(model_config, rngs=rngs)


def default_data_fn(config, *, seed, shard_index, shard_count):
  from mixtral_jax.data.pipeline import make_train_iterator
  return make_train_iterator(config, seed=seed, shard_index=shard_index, shard_count=shard_count)


def task_names(config) -> list[str]:
  """batch['task_id'] -> task name (the data pipeline's global numbering)."""
  from mixtral_jax.data import pipeline
  del config  # the ids are global, the same for every config
  return list(pipeline.task_names())


def create_train_state(config, mesh, model_fn: Callable = default_model_fn):
  """Model and optimizer created sharded on `mesh`: (graphdef, state, state shardings, lr schedule).

  Parameters are created inside jit under the mesh, so each device only materializes its shard.
  `nnx.merge(graphdef, state)` gives back (model, optimizer).
  """
  tx, schedule = optim.make_optimizer(config.train)

  @nnx.jit
  def create():
    model = model_fn(config.model, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  with jax.set_mesh(mesh):
    model, optimizer = create()
  graphdef, state = nnx.split((model, optimizer))
  replicated = NamedSharding(mesh, P())
  # Scalars (optimizer step, counts) come back committed to one device: replicate them on the mesh.
  def on_mesh(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh == mesh:
      return s
    return replicated
  shardings = jax.tree.map(on_mesh, state)
  state = jax.device_put(state, shardings)
  return graphdef, state, shardings, schedule


# The trainer's checkpoint layout lives in checkpoint.py; the model-only restore with it.
restore_model = ckpt_lib.restore_model


def loss_and_metrics(logits_BTV, aux, batch, num_tasks: int):
  """Masked next-token cross-entropy over lm_mask plus the model's (already weighted) aux losses.

  Returns (loss, metrics): metrics hold per-task answer-token accuracy counts over loss_mask.
  """
  targets_BT = batch["targets"]
  lm_mask_BT = batch.get("lm_mask", batch.get("loss_mask")).astype(jnp.float32)
  ans_mask_BT = batch.get("loss_mask", lm_mask_BT).astype(jnp.float32)
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
  lm_loss = jnp.sum(ce_BT * lm_mask_BT) / jnp.maximum(jnp.sum(lm_mask_BT), 1.0)
  aux_losses = dict(aux.get("losses", {}))
  loss = lm_loss + sum(aux_losses.values(), jnp.float32(0.0))
  correct_BT = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32) * ans_mask_BT
  correct_B, count_B = correct_BT.sum(-1), ans_mask_BT.sum(-1)
  onehot_BK = jax.nn.one_hot(batch["task_id"], num_tasks, dtype=jnp.float32)
  seq_ok_B = ((correct_B == count_B) & (count_B > 0)).astype(jnp.float32)
  metrics = {
      "loss": loss, "lm_loss": lm_loss,
      **{f"aux_loss/{k}": v for k, v in aux_losses.items()},
      "task_correct": jnp.einsum("B,BK->K", correct_B, onehot_BK),
      "task_count": jnp.einsum("B,BK->K", count_B, onehot_BK),
      "task_seq_correct": jnp.einsum("B,BK->K", seq_ok_B, onehot_BK),
      "task_seq_count": jnp.einsum("B,BK->K", (count_B > 0).astype(jnp.float32), onehot_BK),
  }
  return loss, metrics


def make_train_step(config, graphdef, shardings, schedule, num_tasks: int):
  """jit(train_step)(state, batch) -> (state, metrics), state donated.

  One step: forward, loss, grads (nnx.Param only), AdamW update, then the aux-loss-free router bias
  update from the global expert loads of this batch (cfg.moe.use_bias).
  """
  m = config.model
  use_bias = bool(m.moe.use_bias) and m.num_dense_layers < m.num_layers
  rate = float(m.moe.bias_update_rate)
  answers_only = config.train.get("loss_on", "all") == "answers"

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      # PAD positions (a short example padded to seq_len, e.g. under a length curriculum) would
      # all route alike: they are left out of the router's load and balance losses.
      logits_BTV, _, aux = model.forward(batch["inputs"], mask_BT=batch["inputs"] != PAD)
      # loss_on="answers": the next-token loss counts only the answer tokens (loss_mask).
      loss_batch = {**batch, "lm_mask": batch["loss_mask"]} if answers_only else batch
      with jax.named_scope("loss"):
        loss, metrics = loss_and_metrics(logits_BTV, aux, loss_batch, num_tasks)
      return loss, (metrics, aux["load"])

    lr = schedule(optimizer.step[...])
    (_, (metrics, load_LE)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    with jax.named_scope("optimizer"):  # a profile's optimizer share (benchmarks/train_step.py)
      optimizer.update(model, grads)
    if use_bias:
      from mixtral_jax.model import router
      # Under jit the load is a global-view sum over the data-sharded batch: all shards' tokens.
      router.update_bias(model, jax.lax.stop_gradient(load_LE), rate)
    # grad_norm before clipping; lr of this update; load [L_moe, E] summed over the global batch.
    metrics.update(grad_norm=optax.tree.norm(grads), lr=lr, load=load_LE)
    new_state = jax.lax.with_sharding_constraint(nnx.state((model, optimizer)), shardings)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)


def shard_batch(batch: dict, mesh) -> dict:
  """Host batch (this process's rows) -> global arrays split over ('data', 'fsdp') on dim 0."""
  def put(x):
    x = jnp.asarray(x) if not hasattr(x, "ndim") else x
    spec = sharding.logical_to_spec(("batch",) + (None,) * (x.ndim - 1))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
  return {k: put(v) for k, v in batch.items()}


def _pure(state):
  return nnx.to_pure_dict(state)


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient norm or parameter; nothing of it was saved."""


class TrainingInterrupted(RuntimeError):
  """SIGTERM / SIGINT stopped training after a checkpoint was saved; rerun to resume."""

  def __init__(self, message: str, signum: int, step: int):
    super().__init__(message)
    self.signum, self.step = signum, step


class StopOnSignal:
  """While active, the first SIGTERM/SIGINT only sets `requested`; a second one gets the handler
  that was installed before (default: terminate; SIGINT: KeyboardInterrupt), at once.

  Installs nothing outside the main thread (signal handlers live there).
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self.requested: int | None = None
    self._previous: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested is None:
      self.requested = signum
      log.warning("%s: finishing this step, saving a checkpoint, then stopping (send it again to "
                  "stop at once, without saving)", signal.Signals(signum).name)
      return
    self._restore()
    signal.raise_signal(signum)

  def _restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}

  def __exit__(self, *exc):
    self._restore()


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _param_shapes(config, model_fn):
  """The parameters' shapes (tree of ShapeDtypeStruct) of config.model, without allocating them."""
  with jax.set_mesh(sharding.make_mesh(config.mesh)):
    abstract = nnx.eval_shape(lambda: model_fn(config.model, rngs=nnx.Rngs(0)))
  return jax.tree.map(lambda x: (x.shape, str(x.dtype)), nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def check_against_recorded(config, workdir: str, *, allow=(), model_fn: Callable = default_model_fn,
                           flag: str = "--allow_config_change"):
  """Refuses a model config that differs from <workdir>/config.json (ConfigMismatchError listing
  the fields); differences in `allow` pass when the parameters keep their shapes. No-op without a
  recorded config. Returns the recorded config (or None)."""
  recorded = workdir_lib.read_config(workdir)
  allowed = workdir_lib.check_model_unchanged(recorded, config, allow=allow, workdir=workdir,
                                              flag=flag)
  if allowed:
    old = ml_collections.ConfigDict(config.to_dict())
    old.model = recorded.model
    if _param_shapes(old, model_fn) != _param_shapes(config, model_fn):
      raise workdir_lib.ConfigMismatchError(
          f"workdir {workdir}: {', '.join(allowed)} change the parameters' shapes or structure; "
          f"{flag} covers only fields that leave them unchanged. Train in a new --workdir.")
    log.warning("workdir %s: running with changed %s", workdir,
                ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in allowed.items()))
  return recorded


def train(config, workdir: str, *, model_fn: Callable = default_model_fn,
          data_fn: Callable = default_data_fn, progress: bool = True,
          allow_config_change=()) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its checkpoints); returns the last logged metrics.

  model_fn(model_config, rngs=) builds the model (default: Transformer); data_fn(config, seed=,
  shard_index=, shard_count=) the resumable batch iterator (default: data.pipeline). Both follow the
  contracts in docs/DESIGN.md. allow_config_change: model fields (e.g. 'attention_impl') that may
  differ from the workdir's recorded config; they must leave the parameters' shapes unchanged.
  Raises WorkdirLockedError (another run holds the workdir), ConfigMismatchError, NonFiniteError
  (divergence: nothing non-finite saved) and TrainingInterrupted (SIGTERM/SIGINT, checkpoint saved).
  """
  maybe_initialize_distributed()
  config_lib.validate(config, jax.device_count())  # before anything compiles or is written
  primary = jax.process_index() == 0
  with workdir_lib.lock(workdir, enabled=primary), StopOnSignal() as stop:
    recorded = check_against_recorded(config, workdir, allow=allow_config_change,
                                      model_fn=model_fn)
    if recorded is not None:
      changed = {**workdir_lib.config_diff(recorded, config, "train"),
                 **workdir_lib.config_diff(recorded, config, "data")}
      if changed:
        log.info("workdir %s: resuming with %s", workdir,
                 ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    if primary:
      workdir_lib.write_config(workdir, config)
    return _train(config, workdir, model_fn, data_fn, progress, primary, stop)


def _train(config, workdir, model_fn, data_fn, progress, primary, stop):
  t = config.train
  mesh = sharding.make_mesh(config.mesh)
  graphdef, state, shardings, schedule = create_train_state(config, mesh, model_fn)
  names = task_names(config)
  train_step = make_train_step(config, graphdef, shardings, schedule, len(names))

  data_it = data_fn(config, seed=config.seed, shard_index=jax.process_index(),
                    shard_count=jax.process_count())
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=t.max_to_keep,
                               async_save=t.async_checkpointing)
  start = 0
  try:
    restored = ckpt.restore_latest(_pure(state))
  except Exception:
    ckpt.close()
    raise
  if restored is not None:
    start, pure, data_state = restored
    nnx.replace_by_pure_dict(state, pure)
    data_it.set_state(data_state)
    log.info("resumed from step %d in %s", start, workdir)

  from mixtral_jax.model.transformer import count_params
  params = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)  # views of the same arrays
  flops_per_token = 6.0 * count_params(params, config.model)["active_matmul"]
  logger = metrics_lib.MetricsLogger(
      workdir, total_steps=t.steps, start_step=start, log_every=t.log_every, task_names=names,
      tokens_per_step=t.batch_size * t.seq_len, flops_per_token=flops_per_token,
      peak_flops=metrics_lib.peak_flops_per_second(), enabled=primary, progress=progress)

  def check(step, bad):
    if bad is not None:
      value = logger.last.get(bad, float("nan"))
      good = ckpt.all_steps()
      raise NonFiniteError(
          f"training diverged: {bad} is {value} at step {step}; stopped without saving. "
          + (f"The last good checkpoint is step {good[-1]} in {ckpt.directory}. " if good else
             "No checkpoint was saved. ")
          + "Try a lower train.learning_rate, a longer warmup or train.grad_clip.")

  pending = None
  try:
    for step in range(start, t.steps):
      batch = shard_batch(next(data_it), mesh)
      with jax.set_mesh(mesh):
        state, step_metrics = train_step(state, batch)
      if pending is not None:
        check(pending[0], logger.record(*pending))  # step N-1's metrics, read while step N runs
      pending = (step + 1, step_metrics)
      stopping = _stop_agreed(stop.requested, step + 1, t.log_every)
      if stopping or (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
        check(pending[0], logger.record(*pending))  # never save past an unchecked step
        pending = None
        if not bool(_all_finite(state)):
          raise NonFiniteError(f"training diverged: a parameter or optimizer state is non-finite "
                               f"after step {step + 1}; stopped without saving it.")
        # The iterator has yielded exactly step + 1 batches here: its state matches the model's.
        ckpt.save(step + 1, _pure(state), data_it.get_state())
      if stopping:
        logger.flush(step + 1)
        ckpt.wait()
        name = signal.Signals(stop.requested or signal.SIGTERM).name
        raise TrainingInterrupted(
            f"{name}: stopped after step {step + 1} of {t.steps} and saved a checkpoint in "
            f"{ckpt.directory}; rerun the same command to resume.", stop.requested or 15, step + 1)
    if pending is not None:
      check(pending[0], logger.record(*pending))
  finally:
    logger.close()
    ckpt.close()
  if logger.last:
    return dict(logger.last)
  return _last_logged(workdir) or {"step": start}  # nothing left to run: the finished run's metrics


def _stop_agreed(requested, step: int, every: int) -> bool:
  """Whether every process stops after `step`: the signal flag, agreed over processes every
  `every` steps in a multi-process job (they must all save the same step)."""
  if jax.process_count() == 1:
    return requested is not None
  if step % every:
    return False
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.int32(requested is not None))
  return bool(np.any(flags))


def _last_logged(workdir) -> dict | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  return json.loads(lines[-1]) if lines else None

"""The training loop: sharded state, one jitted train step with donated state, checkpoints, metrics.

  metrics = train(config, workdir)

A run whose workdir already holds checkpoints resumes from the latest readable one (model, optimizer,
router biases and data position), so the loss trajectory continues as if never interrupted.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mixtral_jax import config as config_lib
from mixtral_jax import sharding
from mixtral_jax.trainer import checkpoint as ckpt_lib
from mixtral_jax.trainer import metrics as metrics_lib
from mixtral_jax.trainer import optim

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
  return list(pipeline.task_names(config))


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


def restore_model(config, workdir: str, mesh=None):
  """The model of the latest restorable checkpoint in <workdir>/checkpoints, on `mesh` (default:
  the config's). Reads only: a checkpoint that fails is skipped, never moved. Returns (model, step);
  raises FileNotFoundError when the workdir has no checkpoint."""
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  graphdef, state, _, _ = create_train_state(config, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               max_to_keep=config.train.max_to_keep, async_save=False)
  try:
    restored = ckpt.restore_latest(_pure(state), quarantine=False)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"workdir: no checkpoint under {os.path.join(workdir, 'checkpoints')}; "
                            "train first (python -m mixtral_jax.train ...)")
  step, pure, _ = restored
  nnx.replace_by_pure_dict(state, pure)
  model, _ = nnx.merge(graphdef, state)
  return model, step


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
      logits_BTV, _, aux = model.forward(batch["inputs"])
      # loss_on="answers": the next-token loss counts only the answer tokens (loss_mask).
      loss_batch = {**batch, "lm_mask": batch["loss_mask"]} if answers_only else batch
      loss, metrics = loss_and_metrics(logits_BTV, aux, loss_batch, num_tasks)
      return loss, (metrics, aux["load"])

    lr = schedule(optimizer.step[...])
    (_, (metrics, load_LE)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
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


def train(config, workdir: str, *, model_fn: Callable = default_model_fn,
          data_fn: Callable = default_data_fn, progress: bool = True) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its checkpoints); returns the last logged metrics.

  model_fn(model_config, rngs=) builds the model (default: Transformer); data_fn(config, seed=,
  shard_index=, shard_count=) the resumable batch iterator (default: data.pipeline). Both follow the
  contracts in docs/DESIGN.md.
  """
  maybe_initialize_distributed()
  config_lib.validate(config, jax.device_count())  # before anything compiles
  t = config.train
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0
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
  pending = None
  try:
    for step in range(start, t.steps):
      batch = shard_batch(next(data_it), mesh)
      with jax.set_mesh(mesh):
        state, step_metrics = train_step(state, batch)
      if pending is not None:
        logger.record(*pending)  # step N-1's metrics, read while step N runs
      pending = (step + 1, step_metrics)
      if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
        # The iterator has yielded exactly step + 1 batches here: its state matches the model's.
        ckpt.save(step + 1, _pure(state), data_it.get_state())
    if pending is not None:
      logger.record(*pending)
  finally:
    logger.close()
    ckpt.close()
  if logger.last:
    return dict(logger.last)
  return _last_logged(workdir) or {"step": start}  # nothing left to run: the finished run's metrics


def _last_logged(workdir) -> dict | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  return json.loads(lines[-1]) if lines else None

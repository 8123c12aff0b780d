"""Optimizer: AdamW with linear warmup + cosine decay, after global-norm gradient clipping."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_schedule(train_config) -> optax.Schedule:
  """Learning rate at step s (the s-th update, 0-based).

  Linear warmup 0 -> learning_rate over `warmup_steps`, then cosine decay to
  `learning_rate * end_lr_fraction` at step `steps`; held there afterwards.
  """
  peak = float(train_config.learning_rate)
  end = peak * float(train_config.end_lr_fraction)
  warmup = int(train_config.warmup_steps)
  decay = max(int(train_config.steps) - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    # warmup reaches `peak` at step == warmup (step 0 already gets a non-zero lr when warmup == 0).
    warm = peak * jnp.minimum(step + 1.0, warmup) / max(warmup, 1)
    frac = jnp.clip((step - warmup) / decay, 0.0, 1.0)
    cos = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup, warm, cos)

  return schedule


def _decay_mask(params):
  # No weight decay on norm scales and other vectors (the usual AdamW practice). Decided by name
  # as well as rank: scan_layers stacks a norm scale [D] into [layers, D].
  def decay(path, p):
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return getattr(p, "ndim", 0) >= 2 and "scale" not in names
  return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(train_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule): clip_by_global_norm(grad_clip) then AdamW(schedule, b1, b2, weight_decay).

  grad_clip <= 0 disables clipping.
  """
  t = train_config
  schedule = make_schedule(t)
  parts = []
  if t.grad_clip and t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(t.b1), b2=float(t.b2),
                           weight_decay=float(t.weight_decay), mask=_decay_mask))
  return optax.chain(*parts), schedule

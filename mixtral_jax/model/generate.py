"""Incremental decoding: prefill a prompt into per-layer caches, then one token per step.

`prefill` and `decode_step` are pure functions of (model state, cache, tokens) jitted with the
cache donated; `generate` loops them with greedy, temperature or top-p (nucleus) sampling.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(nnx.jit, donate_argnums=(2,))
def _forward_cached(model, tokens_BT, cache, positions_BT):
  logits, cache, _ = model.forward(tokens_BT, positions_BT, cache)
  return logits, cache


def prefill(model, tokens_BT, max_len: int, dtype=None):
  """Runs the prompt through a fresh cache of `max_len` positions.

  Returns (logits f32 [B, T, V], cache). The logits equal model(tokens_BT).
  """
  B, T = tokens_BT.shape
  if T > max_len:
    raise ValueError(f"max_len={max_len} is shorter than the prompt ({T} tokens)")
  cache = model.init_cache(B, max_len, dtype)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return _forward_cached(model, tokens_BT, cache, positions)


def decode_step(model, tokens_B1, position: int | jax.Array, cache):
  """One new token per row at absolute `position`. Returns (logits f32 [B, V], cache)."""
  B = tokens_B1.shape[0]
  positions = jnp.full((B, 1), position, jnp.int32)
  logits, cache = _forward_cached(model, tokens_B1, cache, positions)
  return logits[:, -1], cache


def _check_sampling(temperature, top_p):
  # `not (x >= 0)` also rejects NaN, which passes every ordered comparison's negation.
  if not (0.0 < top_p <= 1.0):
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if not (temperature >= 0.0) or not math.isfinite(temperature):
    raise ValueError(f"temperature must be finite and >= 0, got {temperature}")


def sample(logits_BV, rng, *, temperature: float = 0.0, top_p: float = 1.0):
  """Greedy when temperature == 0; otherwise temperature sampling restricted to the smallest
  set of tokens whose probability mass reaches top_p."""
  _check_sampling(temperature, top_p)
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # Keep a token while the mass before it is < top_p (the top token is always kept).
    keep = (cum - probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model, prompt_BT, max_new_tokens: int, *, rng=None, temperature: float = 0.0,
             top_p: float = 1.0, max_len: int | None = None):
  """Returns int32 [B, T + max_new_tokens]: the prompt followed by the generated tokens.

  prompt_BT: int token ids in [0, vocab_size), T >= 1. max_len: cache positions (default
  T + max_new_tokens). Raises ValueError naming a bad argument.
  """
  if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1:
    raise ValueError(f"prompt_BT: expected [batch, length >= 1] token ids, got shape "
                     f"{prompt_BT.shape}")
  if not jnp.issubdtype(prompt_BT.dtype, jnp.integer):
    raise ValueError(f"prompt_BT: expected integer token ids, got {prompt_BT.dtype}")
  vocab = model.cfg.vocab_size
  lo, hi = int(jnp.min(prompt_BT)), int(jnp.max(prompt_BT))
  if lo < 0 or hi >= vocab:
    raise ValueError(f"prompt_BT: token ids must be in [0, vocab_size={vocab}), got "
                     f"{lo if lo < 0 else hi}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
  _check_sampling(temperature, top_p)
  B, T = prompt_BT.shape
  if max_len is None:
    max_len = T + max_new_tokens
  if not isinstance(max_len, int) or max_len <= 0:
    raise ValueError(f"max_len must be a positive int, got {max_len!r}")
  if max_len < T + max_new_tokens - 1:
    # A cache write past max_len would be clamped onto the last slot: wrong outputs, no error.
    raise ValueError(f"max_len={max_len} cannot hold the prompt ({T}) plus {max_new_tokens} "
                     "new tokens")
  rng = rng if rng is not None else jax.random.key(0)
  logits, cache = prefill(model, prompt_BT, max_len)
  out = [prompt_BT]
  next_logits = logits[:, -1]
  for step in range(max_new_tokens):
    rng, key = jax.random.split(rng)
    token_B = sample(next_logits, key, temperature=temperature, top_p=top_p)
    out.append(token_B[:, None])
    if step + 1 < max_new_tokens:
      next_logits, cache = decode_step(model, token_B[:, None], T + step, cache)
  return jnp.concatenate(out, axis=1)

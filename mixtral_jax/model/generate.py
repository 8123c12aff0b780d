"""Incremental decoding: prefill a prompt into per-layer caches, then one token per step.

`prefill` and `decode_step` are pure functions of (model state, cache, tokens) jitted with the
cache donated; `generate` loops them with greedy, temperature or top-p (nucleus) sampling, for a
rectangular prompt batch or for prompts of different lengths (`prompt_lengths`; every decode step
still writes one position shared by all rows, so no cache needs per-row positions).
"""
from __future__ import annotations

import functools
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
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


def _state_decode_step(graphdef):
  """`decode_step` as a plain jax.jit of (state, tokens, cache, positions) for one graphdef."""
  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(state, tokens_B1, cache, positions_B1):
    logits, cache, _ = nnx.merge(graphdef, state).forward(tokens_B1, positions_B1, cache)
    return logits[:, -1], cache
  return step


# model -> (graphdef, jitted step): a later generate() on the same model reuses the compiled
# step while the model's structure is unchanged (its parameters may have changed: they are an
# argument). A GraphDef holds the ConfigDict, so it can be compared but not hashed.
_DECODERS = weakref.WeakKeyDictionary()


class _Decoder:
  """`decode_step` for a loop over one model: the model is split once, so each step is one
  jax.jit call. (nnx.jit flattens the model's graph on every call: on the H200 that was ~9 ms
  of a 10 ms decode step of a 4-layer model at M2 dims, benchmarks/decode_model.py.) The model
  must not change while the decoder is used."""

  def __init__(self, model):
    graphdef, self.state = nnx.split(model)
    cached = _DECODERS.get(model)
    if cached is None or cached[0] != graphdef:
      cached = _DECODERS[model] = (graphdef, _state_decode_step(graphdef))
    self.step = cached[1]

  def __call__(self, tokens_B1, position, cache):
    positions = jnp.full((tokens_B1.shape[0], 1), position, jnp.int32)
    return self.step(self.state, tokens_B1, cache, positions)


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


def _check_prompt_lengths(prompt_lengths, B: int, T: int) -> np.ndarray:
  lengths = np.asarray(prompt_lengths)
  if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"prompt_lengths: expected ints of shape ({B},), one per prompt row, got "
                     f"{lengths.dtype} of shape {lengths.shape}")
  if lengths.min() < 1 or lengths.max() > T:
    bad = lengths[(lengths < 1) | (lengths > T)][0]
    raise ValueError(f"prompt_lengths: each length must be in [1, T={T}], got {bad}")
  return lengths.astype(np.int32)


def generate(model, prompt_BT, max_new_tokens: int, *, rng=None, temperature: float = 0.0,
             top_p: float = 1.0, max_len: int | None = None, prompt_lengths=None,
             pad_id: int = 0):
  """Generates `max_new_tokens` tokens after each prompt row.

  prompt_BT: int token ids [B, T], T >= 1. max_len: cache positions (default: what the longest
  row needs). Raises ValueError naming a bad argument.

  prompt_lengths None (every row T tokens long): returns int32 [B, T + max_new_tokens], the
  prompt followed by the generated tokens.

  prompt_lengths int [B] (each in [1, T]): row b's prompt is prompt_BT[b, :lengths[b]]; the rest
  of the row is padding, never read. Returns (tokens int32 [B, max(lengths) + max_new_tokens],
  out_lengths int32 [B] = lengths + max_new_tokens): row b holds its prompt, then its
  max_new_tokens tokens, then `pad_id`. The common prefix of min(lengths) tokens is prefilled
  together; after it every decode step writes one shared position for all rows (a row still
  inside its prompt is fed its own prompt token there), so ring and recurrent caches never see a
  pad. That costs max(lengths) + max_new_tokens - min(lengths) - 1 decode steps for the batch.
  Greedy rows equal `generate` on that row alone (with dropless MoE; capacity dispatch drops
  tokens over the whole batch); sampling splits one key per position for the whole batch, so a
  sampled row differs from the row generated alone (lengths all T: the same draws as None).
  """
  if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1:
    raise ValueError(f"prompt_BT: expected [batch, length >= 1] token ids, got shape "
                     f"{prompt_BT.shape}")
  if not jnp.issubdtype(prompt_BT.dtype, jnp.integer):
    raise ValueError(f"prompt_BT: expected integer token ids, got {prompt_BT.dtype}")
  B, T = prompt_BT.shape
  lengths = None if prompt_lengths is None else _check_prompt_lengths(prompt_lengths, B, T)
  vocab = model.cfg.vocab_size
  checked_BT = prompt_BT
  if lengths is not None:  # only the tokens inside each row's prompt are read: pads may be anything
    checked_BT = jnp.where(jnp.arange(T)[None] < jnp.asarray(lengths)[:, None], prompt_BT, 0)
  lo, hi = int(jnp.min(checked_BT)), int(jnp.max(checked_BT))
  if lo < 0 or hi >= vocab:
    raise ValueError(f"prompt_BT: token ids must be in [0, vocab_size={vocab}), got "
                     f"{lo if lo < 0 else hi}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
  _check_sampling(temperature, top_p)
  longest = T if lengths is None else int(lengths.max())
  if max_len is None:
    max_len = longest + max_new_tokens
  if not isinstance(max_len, int) or max_len <= 0:
    raise ValueError(f"max_len must be a positive int, got {max_len!r}")
  if max_len < longest + max_new_tokens - 1:
    # A cache write past max_len would be clamped onto the last slot: wrong outputs, no error.
    raise ValueError(f"max_len={max_len} cannot hold the prompt ({longest}) plus "
                     f"{max_new_tokens} new tokens")
  rng = rng if rng is not None else jax.random.key(0)
  if lengths is not None:
    return _generate_ragged(model, prompt_BT, lengths, max_new_tokens, rng, max_len, pad_id,
                            temperature=temperature, top_p=top_p)
  logits, cache = prefill(model, prompt_BT, max_len)
  step_fn = _Decoder(model)
  out = [prompt_BT]
  next_logits = logits[:, -1]
  for step in range(max_new_tokens):
    rng, key = jax.random.split(rng)
    token_B = sample(next_logits, key, temperature=temperature, top_p=top_p)
    out.append(token_B[:, None])
    if step + 1 < max_new_tokens:
      next_logits, cache = step_fn(token_B[:, None], T + step, cache)
  return jnp.concatenate(out, axis=1)


def _generate_ragged(model, prompt_BT, lengths, max_new_tokens, rng, max_len, pad_id, **sampling):
  """`generate` with per-row prompt lengths (validated): see its docstring."""
  lengths_B = jnp.asarray(lengths)
  end_B = lengths_B + max_new_tokens
  prompt_BT = prompt_BT.astype(jnp.int32)
  T = prompt_BT.shape[1]
  if max_new_tokens == 0:
    pad_BT = jnp.arange(T)[None] >= lengths_B[:, None]
    return jnp.where(pad_BT, pad_id, prompt_BT)[:, :int(lengths.max())], end_B
  L0 = int(lengths.min())
  total = int(lengths.max()) + max_new_tokens  # output positions 0..total-1
  logits, cache = prefill(model, prompt_BT[:, :L0], max_len)
  step_fn = _Decoder(model)
  next_logits = logits[:, -1]
  out = [prompt_BT[:, :L0]]
  for p in range(L0, total):
    # One key per position, split as in the rectangular loop (equal lengths: the same draws).
    rng, key = jax.random.split(rng)
    sampled_B = sample(next_logits, key, **sampling)
    # Teacher forcing while a row is inside its prompt; its own samples after.
    token_B = jnp.where(p < lengths_B, prompt_BT[:, min(p, T - 1)], sampled_B)
    out.append(jnp.where(p < end_B, token_B, pad_id)[:, None])
    if p + 1 < total:
      # Rows past their end keep decoding their own samples: harmless, masked to pad_id above.
      next_logits, cache = step_fn(token_B[:, None], p, cache)
  return jnp.concatenate(out, axis=1), end_B

"""Sliding-window causal attention: the query at p sees keys at p - window < j <= p."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mixtral_jax.model.attention.common import (
    EMPTY_POSITION, SoftmaxAttentionBase, attention_core)


@struct.dataclass
class RingCache:
  """The last `window` keys/values; slot p % window holds position p (`positions_W`, or empty)."""
  k_BWKH: jax.Array
  v_BWKH: jax.Array
  positions_W: jax.Array  # int32; EMPTY_POSITION where nothing was written yet


class SlidingWindowAttention(SoftmaxAttentionBase):
  """Causal GQA attention limited to cfg.window tokens; decode memory is O(window)."""

  def __call__(self, x_BTD, positions_BT, cache: RingCache | None = None):
    """x [B, T, D], positions int32 [B, T] -> (y [B, T, D], cache, {})."""
    window = self.cfg.window
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_BT)
    if cache is None:
      k_BSKH, v_BSKH, k_pos = k_BTKH, v_BTKH, positions_BT
    else:
      # Attend over ring + the new chunk before overwriting: a long prefill chunk needs keys
      # its own later tokens evict.
      k_BSKH = jnp.concatenate([cache.k_BWKH.astype(k_BTKH.dtype), k_BTKH], axis=1)
      v_BSKH = jnp.concatenate([cache.v_BWKH.astype(v_BTKH.dtype), v_BTKH], axis=1)
      k_pos = jnp.concatenate([cache.positions_W, positions_BT[0].astype(jnp.int32)])[None]
      n = min(x_BTD.shape[1], window)  # only the last `window` new tokens survive
      new_pos = positions_BT[0, -n:].astype(jnp.int32)
      slots = new_pos % window
      cache = RingCache(
          k_BWKH=cache.k_BWKH.at[:, slots].set(k_BTKH[:, -n:].astype(cache.k_BWKH.dtype)),
          v_BWKH=cache.v_BWKH.at[:, slots].set(v_BTKH[:, -n:].astype(cache.v_BWKH.dtype)),
          positions_W=cache.positions_W.at[slots].set(new_pos))
    y_BTNH = attention_core(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                            k_positions_BS=k_pos, window=window,
                            implementation=self.cfg.attention_impl)
    return self.o_proj(y_BTNH), cache, {}

  def init_cache(self, batch: int, max_len: int, dtype=None) -> RingCache:
    """max_len is unused: the ring holds cfg.window positions."""
    del max_len
    shape = (batch, self.cfg.window, self.cfg.num_kv_heads, self.cfg.head_dim)
    dtype = dtype or self.dtype
    return RingCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                     jnp.full((self.cfg.window,), EMPTY_POSITION, jnp.int32))

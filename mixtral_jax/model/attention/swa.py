"""Sliding-window causal attention: the query at p sees keys at p - window < j <= p."""
from __future__ import annotations

import jax.numpy as jnp

from mixtral_jax.model.attention.cache import RingCache
from mixtral_jax.model.attention.common import SoftmaxAttentionBase, attention_core


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
      k_pos = jnp.concatenate([cache.positions, positions_BT[0].astype(jnp.int32)])[None]
      cache = cache.write(k_BTKH, v_BTKH, positions_BT[0, 0])
    y_BTNH = attention_core(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                            k_positions_BS=k_pos, window=window,
                            implementation=self.cfg.attention_impl)
    return self.o_proj(y_BTNH), cache, {}

  def init_cache(self, batch: int, max_len: int, dtype=None) -> RingCache:
    """max_len is unused: the ring holds cfg.window positions."""
    del max_len
    return RingCache.zeros(batch, self.cfg.window, self.cfg.num_kv_heads, self.cfg.head_dim,
                           dtype or self.dtype)

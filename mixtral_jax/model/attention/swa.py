"""Sliding-window causal attention: the query at p sees keys at p - window < j <= p.

Under a Pallas attention_impl the training forward runs on the block-sparse kernel with the
window (tiles outside it skipped, tiles on its edge masked token by token: O(T * window) work and
memory). A prefill chunk of T >= window tokens is split by what its queries read: query i >=
window - 1 of the chunk sees only keys of the chunk itself (the kernel, T == S), the first
window - 1 queries also read the ring, on the XLA path over ring + the chunk's first window - 1
keys ([window, 2 * window] logits, independent of T). Decode steps (T == 1) attend over ring +
token on XLA: O(window) per step.
"""
from __future__ import annotations

import jax.numpy as jnp

from mixtral_jax.model.attention.cache import RingCache
from mixtral_jax.model.attention.common import (SoftmaxAttentionBase, attention_core,
                                                check_implementation)


class SlidingWindowAttention(SoftmaxAttentionBase):
  """Causal GQA attention limited to cfg.window tokens; decode memory is O(window)."""

  def __call__(self, x_BTD, positions_BT, cache: RingCache | None = None):
    """x [B, T, D], positions int32 [B, T] -> (y [B, T, D], cache, {})."""
    window, impl = self.cfg.window, self.cfg.attention_impl
    kw = dict(window=window, implementation=impl, kernel_block=self.cfg.attention_block)
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_BT)
    if cache is None:
      y_BTNH = attention_core(q_BTNH, k_BTKH, v_BTKH, q_positions_BT=positions_BT,
                              k_positions_BS=positions_BT, **kw)
      return self.o_proj(y_BTNH), cache, {}
    t = x_BTD.shape[1]
    # Attend over ring + the new chunk before overwriting: a long prefill chunk needs keys
    # its own later tokens evict.
    k_BSKH = jnp.concatenate([cache.k_BWKH.astype(k_BTKH.dtype), k_BTKH], axis=1)
    v_BSKH = jnp.concatenate([cache.v_BWKH.astype(v_BTKH.dtype), v_BTKH], axis=1)
    k_pos = jnp.concatenate([cache.positions, positions_BT[0].astype(jnp.int32)])[None]
    if t >= window and check_implementation(impl):
      head = window - 1  # queries of the chunk that can still see ring keys
      y_BTNH = attention_core(q_BTNH, k_BTKH, v_BTKH, q_positions_BT=positions_BT,
                              k_positions_BS=positions_BT, **kw)
      if head:
        w = cache.capacity
        y_head = attention_core(q_BTNH[:, :head], k_BSKH[:, :w + head], v_BSKH[:, :w + head],
                                q_positions_BT=positions_BT[:, :head],
                                k_positions_BS=k_pos[:, :w + head], window=window)
        y_BTNH = jnp.concatenate([y_head, y_BTNH[:, head:]], axis=1)
    else:
      y_BTNH = attention_core(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                              k_positions_BS=k_pos, **kw)
    cache = cache.write(k_BTKH, v_BTKH, positions_BT[0, 0])
    return self.o_proj(y_BTNH), cache, {}

  def init_cache(self, batch: int, max_len: int, dtype=None) -> RingCache:
    """max_len is unused: the ring holds cfg.window positions."""
    del max_len
    return RingCache.zeros(batch, self.cfg.window, self.cfg.num_kv_heads, self.cfg.head_dim,
                           dtype or self.dtype)

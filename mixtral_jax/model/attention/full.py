"""Causal GQA softmax attention over every earlier position (MiniMax-M2 / Mixtral style)."""
from __future__ import annotations

from mixtral_jax.model.attention.common import (KVCache, SoftmaxAttentionBase, attention_core,
                                                decode_core)


class FullAttention(SoftmaxAttentionBase):
  """y = o_proj(softmax(q k^T / sqrt(H) + causal) v); cache: `KVCache` with max_len slots.

  A decode step (cache, T == 1) under a Pallas attention_impl runs on `dense_decode`
  (`decode_core`); everything else on `attention_core`."""

  def __call__(self, x_BTD, positions_BT, cache: KVCache | None = None):
    """x [B, T, D], positions int32 [B, T] -> (y [B, T, D], cache, {})."""
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_BT)
    k_BSKH, v_BSKH, k_pos, cache = self.keys(k_BTKH, v_BTKH, positions_BT, cache)
    y_BTNH = None
    if cache is not None and x_BTD.shape[1] == 1:
      y_BTNH = decode_core(q_BTNH, k_BSKH, v_BSKH, positions_BT,
                           implementation=self.cfg.attention_impl,
                           block_kv=self.cfg.attention_block, scale=self.scale)
    if y_BTNH is None:
      y_BTNH = attention_core(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                              k_positions_BS=k_pos, implementation=self.cfg.attention_impl,
                              kernel_block=self.cfg.attention_block)
    return self.o_proj(y_BTNH), cache, {}

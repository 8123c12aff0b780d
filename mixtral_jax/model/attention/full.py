"""Causal GQA softmax attention over every earlier position (MiniMax-M2 / Mixtral style)."""
from __future__ import annotations

from mixtral_jax.model.attention.common import KVCache, SoftmaxAttentionBase, attention_core


class FullAttention(SoftmaxAttentionBase):
  """y = o_proj(softmax(q k^T / sqrt(H) + causal) v); cache: `KVCache` with max_len slots."""

  def __call__(self, x_BTD, positions_BT, cache: KVCache | None = None):
    """x [B, T, D], positions int32 [B, T] -> (y [B, T, D], cache, {})."""
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_BT)
    k_BSKH, v_BSKH, k_pos, cache = self.keys(k_BTKH, v_BTKH, positions_BT, cache)
    y_BTNH = attention_core(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                            k_positions_BS=k_pos, implementation=self.cfg.attention_impl,
                            kernel_block=self.cfg.attention_block)
    return self.o_proj(y_BTNH), cache, {}

"""MoBA: training-free mixture-of-block attention (Lu et al. 2025).

Keys are cut into blocks of cfg.moba.block_size slots. Each query scores every complete past
block by q . mean(k over the block) and attends, with exact causal softmax, to the cfg.moba.top_k
best blocks; its own block always counts as one of them (causally masked inside) and future
blocks are never chosen.

Selection is per KV group (not per query head): the group's query is the mean of its G heads'
queries, i.e. the block score is the sum of the G per-head affinities. One selection per group
gives the [B, K, T, C] block mask a block-sparse kernel consumes, and each selected K/V block is
read once for all G heads that share it.
"""
from __future__ import annotations

import jax.numpy as jnp

from mixtral_jax.kernels.block_sparse_attention.selection import select_blocks
from mixtral_jax.model.attention.common import (
    KVCache, SoftmaxAttentionBase, attention_core, pad_to_blocks)


def moba_selection(q_BTNH, k_BSKH, q_positions_BT, *, block_size: int, top_k: int):
  """Per-query block selection bool [B, K, T, C] (key slot s is in block s // block_size; slot s =
  position s). The kernels' `masks.moba_block_mask` is the per-q-tile tile mask of the same gating."""
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  qg_BTKH = q_BTNH.astype(jnp.float32).reshape(b, t, k, n // k, h).mean(axis=3)
  k_BCLKH = pad_to_blocks(k_BSKH.astype(jnp.float32), block_size, axis=1).reshape(
      b, -1, block_size, k, h)
  kmean_BCKH = k_BCLKH.mean(axis=2)  # only complete past blocks are used, so padding is harmless
  scores_BKTC = jnp.einsum("BTKH,BCKH->BKTC", qg_BTKH, kmean_BCKH)
  c = scores_BKTC.shape[-1]
  past_BTC = jnp.arange(c) < (q_positions_BT // block_size)[..., None]  # complete blocks only
  scores_BKTC = jnp.where(past_BTC[:, None], scores_BKTC, -jnp.inf)
  mask, _ = select_blocks(scores_BKTC, (q_positions_BT // block_size)[:, None], top_k=top_k,
                          local_blocks=1)
  return mask


class MoBAAttention(SoftmaxAttentionBase):
  """Causal GQA attention restricted to the top-k key blocks per query and KV group."""

  def __call__(self, x_BTD, positions_BT, cache: KVCache | None = None):
    """x [B, T, D], positions int32 [B, T] -> (y [B, T, D], cache, {})."""
    bs = self.cfg.moba.block_size
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_BT)
    k_BSKH, v_BSKH, k_pos, cache = self.keys(k_BTKH, v_BTKH, positions_BT, cache)
    block_mask_BKTC = moba_selection(q_BTNH, k_BSKH.astype(q_BTNH.dtype), positions_BT,
                                      block_size=bs, top_k=self.cfg.moba.top_k)
    y_BTNH = attention_core(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                            k_positions_BS=k_pos, block_mask_BKTC=block_mask_BKTC,
                            block_kv=bs, implementation=self.cfg.attention_impl)
    return self.o_proj(y_BTNH), cache, {}

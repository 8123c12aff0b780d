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
from mixtral_jax.model.attention.cache import MoBACache
from mixtral_jax.model.attention.common import (
    SoftmaxAttentionBase, attention_core, decode_core, pad_to_blocks)


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
  """Causal GQA attention restricted to the top-k key blocks per query and KV group.

  Cache: `MoBACache` (keys, values and each block's mean key). A decode step (T == 1) under a
  Pallas attention_impl scores blocks from the cached means and attends to the chosen blocks on
  the decode kernels (`common.decode_core`); everything else on `attention_core`."""

  def __call__(self, x_BTD, positions_BT, cache: MoBACache | None = None):
    """x [B, T, D], positions int32 [B, T] -> (y [B, T, D], cache, {})."""
    bs = self.cfg.moba.block_size
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_BT)
    if cache is None:
      k_BSKH, v_BSKH, k_pos = k_BTKH, v_BTKH, positions_BT
    else:
      cache = cache.write(k_BTKH, v_BTKH, positions_BT[0, 0])
      k_BSKH, v_BSKH, k_pos = cache.kv.k_BSKH, cache.kv.v_BSKH, cache.positions[None]
      if x_BTD.shape[1] == 1:
        y_BTNH = decode_core(q_BTNH, k_BSKH, v_BSKH, positions_BT,
                             implementation=self.cfg.attention_impl, block_kv=bs,
                             scale=self.scale, moba_cfg=self.cfg.moba, mean_BCKH=cache.mean_BCKH)
        if y_BTNH is not None:
          return self.o_proj(y_BTNH), cache, {}
    block_mask_BKTC = moba_selection(q_BTNH, k_BSKH.astype(q_BTNH.dtype), positions_BT,
                                      block_size=bs, top_k=self.cfg.moba.top_k)
    y_BTNH = attention_core(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                            k_positions_BS=k_pos, block_mask_BKTC=block_mask_BKTC,
                            block_kv=bs, implementation=self.cfg.attention_impl)
    return self.o_proj(y_BTNH), cache, {}

  def init_cache(self, batch: int, max_len: int, dtype=None) -> MoBACache:
    return MoBACache.zeros(batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim,
                           dtype or self.dtype, block_size=self.cfg.moba.block_size)

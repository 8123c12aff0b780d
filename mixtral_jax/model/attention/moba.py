"""MoBA: training-free mixture-of-block attention (Lu et al. 2025).

Keys are cut into blocks of cfg.moba.block_size slots. Each query scores every complete past
block by q . mean(k over the block) and attends, with exact causal softmax, to the cfg.moba.top_k
best blocks; its own block always counts as one of them (causally masked inside) and future
blocks are never chosen.

Selection is per KV group (not per query head): the group's query is the mean of its G heads'
queries, i.e. the block score is the sum of the G per-head affinities. One selection per group
gives the [B, K, T, C] block mask a block-sparse kernel consumes, and each selected K/V block is
read once for all G heads that share it.

Under a Pallas attention_impl (training forward, and a prefill whose cache is the chunk) the
selection is made in query chunks as index lists [B, K, T, top_k] (never the [T, S] token mask)
and attention runs on `kernels.msa_attention.msa_attention`: the per-query sparse attention over
selected blocks that MSA layers use, only with MoBA's mean-key gating instead of an indexer. A
q-tile union tile mask on the block-sparse kernel was the alternative; it would compute every
block any of a tile's 128 queries picked (up to 128 * top_k per tile), and it would need a
per-query mask inside partial tiles, which that kernel does not have.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.kernels.block_sparse_attention.selection import select_blocks
from mixtral_jax.model.attention.cache import MoBACache
from mixtral_jax.model.attention.common import (
    SoftmaxAttentionBase, attention_core, check_implementation, decode_core,
    log_fallback_once, pad_to_blocks)

SELECT_CHUNK = 2048  # queries scored at a time on the kernel path: [B, K, chunk, C] f32 scores


def _mean_keys(k_BSKH, block_size):
  """Block means [B, C, K, H] f32 (only complete past blocks are used, so padding is harmless)."""
  b, _, k, h = k_BSKH.shape
  k_BCLKH = pad_to_blocks(k_BSKH.astype(jnp.float32), block_size, axis=1).reshape(
      b, -1, block_size, k, h)
  return k_BCLKH.mean(axis=2)


def _select(q_BTNH, kmean_BCKH, q_positions_BT, block_size, top_k):
  """(block mask [B, K, T, C], index lists [B, K, T, min(top_k, C)]) of MoBA's gating."""
  b, t, n, h = q_BTNH.shape
  k = kmean_BCKH.shape[2]
  qg_BTKH = q_BTNH.astype(jnp.float32).reshape(b, t, k, n // k, h).mean(axis=3)
  scores_BKTC = jnp.einsum("BTKH,BCKH->BKTC", qg_BTKH, kmean_BCKH)
  c = scores_BKTC.shape[-1]
  past_BTC = jnp.arange(c) < (q_positions_BT // block_size)[..., None]  # complete blocks only
  scores_BKTC = jnp.where(past_BTC[:, None], scores_BKTC, -jnp.inf)
  return select_blocks(scores_BKTC, (q_positions_BT // block_size)[:, None], top_k=top_k,
                       local_blocks=1)


def moba_selection(q_BTNH, k_BSKH, q_positions_BT, *, block_size: int, top_k: int):
  """Per-query block selection bool [B, K, T, C] (key slot s is in block s // block_size; slot s =
  position s). The kernels' `masks.moba_block_mask` is the per-q-tile tile mask of the same gating."""
  return _select(q_BTNH, _mean_keys(k_BSKH, block_size), q_positions_BT, block_size, top_k)[0]


def moba_indices(q_BTNH, k_BSKH, q_positions_BT, *, block_size: int, top_k: int,
                 chunk: int = SELECT_CHUNK):
  """`moba_selection` as index lists int32 [B, K, T, min(top_k, C)] (-1 = empty slot), scored
  `chunk` queries at a time so that no [T, C] (let alone [T, S]) tensor exists. Not
  differentiable (the selection is discrete)."""
  q_BTNH, k_BSKH = jax.lax.stop_gradient(q_BTNH), jax.lax.stop_gradient(k_BSKH)
  kmean_BCKH = _mean_keys(k_BSKH, block_size)
  b, t = q_BTNH.shape[:2]
  if t <= chunk:
    return _select(q_BTNH, kmean_BCKH, q_positions_BT, block_size, top_k)[1]
  n = -(-t // chunk)
  q_ = jnp.moveaxis(pad_to_blocks(q_BTNH, chunk, axis=1).reshape(b, n, chunk, *q_BTNH.shape[2:]),
                    1, 0)
  pos = jnp.moveaxis(pad_to_blocks(q_positions_BT, chunk, axis=1).reshape(b, n, chunk), 1, 0)
  idx = jax.lax.map(lambda a: _select(a[0], kmean_BCKH, a[1], block_size, top_k)[1], (q_, pos))
  return jnp.moveaxis(idx, 0, 2).reshape(b, idx.shape[2], n * chunk, -1)[:, :, :t]


# msa_attention has no Mosaic GPU kernel: a Mosaic GPU model runs MoBA on its Triton kernel.
_MSA_IMPLS = {"pallas_tpu": "pallas_tpu", "pallas_triton": "pallas_triton",
              "pallas_mosaic_gpu": "pallas_triton", None: None}


def moba_kernel_attention(q_BTNH, k_BSKH, v_BSKH, positions_BT, *, block_size, top_k,
                          implementation, scale):
  """MoBA attention of a whole chunk (T == S) on `msa_attention`, or None (the caller then takes
  the XLA path) for 'xla', a CPU default, or a cache longer than the chunk (logged once)."""
  if not check_implementation(implementation):
    return None
  if k_BSKH.shape[1] != q_BTNH.shape[1]:
    log_fallback_once(implementation, "moba over a cache longer than the chunk")
    return None
  from mixtral_jax.kernels import msa_attention as msa_kernels
  indices_BKTk = moba_indices(q_BTNH, k_BSKH, positions_BT, block_size=block_size, top_k=top_k)
  return msa_kernels.msa_attention(
      q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype), indices_BKTk,
      block_size=block_size, sm_scale=scale, implementation=_MSA_IMPLS[implementation],
      interpret=jax.default_backend() == "cpu")


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
    y_BTNH = moba_kernel_attention(q_BTNH, k_BSKH, v_BSKH, positions_BT, block_size=bs,
                                   top_k=self.cfg.moba.top_k,
                                   implementation=self.cfg.attention_impl, scale=self.scale)
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

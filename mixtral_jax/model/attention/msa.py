"""MiniMax Sparse Attention (MiniMax-M3): an indexer picks key blocks, softmax attends to them.

Indexer (HF `MiniMaxM3VLIndexer`): one index query per GQA group (index heads = num_kv_heads),
one shared index key per token, both RMSNorm'd and rotated. The rotation is the main attention's
cos/sin cut to index_head_dim, exactly as the HF reference does (`cos[..., :index_head_dim]`):
with index_head_dim >= rotary_dim that is the main rope on the first rotary_dim dims (there is
no separate index rotary width). Block score = max over the block's keys at positions <= the
query of q_idx . k_idx; the cfg.msa.local_blocks blocks ending at the query's own block are always
kept; top cfg.msa.top_k blocks per query (per GQA group, or one shared choice with
selection='max_heads'); then exact causal softmax attention over the chosen blocks.

Under a Pallas attention_impl: a decode step (cache, T == 1) makes the same selection and attention
on the decode kernels (`common.decode_core`); the training forward and a prefill (T > 1) run on
`kernels.msa_attention` (`kernel_forward`: block-max index scores straight to [B, K, T, C], top-k,
KV-outer sparse attention, and the KL over the selected tokens only), so no [T, S] tensor exists.
Both assume slot = position (a full forward's positions are 0..T-1).

KL loss (weight cfg.msa.kl_loss_weight): KL(p_main || p_idx) per query and group over the tokens
of the selected blocks, where p_main is the main branch's attention averaged over the group's heads
(stop-gradient) and p_idx = softmax(q_idx . k_idx / sqrt(index_head_dim)). The indexer reads a
stop-gradient copy of x, so this loss trains the indexer only and the indexer nothing else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.kernels.block_sparse_attention.selection import select_blocks
from mixtral_jax.model import layers
from mixtral_jax.model.attention.cache import MSACache
from mixtral_jax.model.attention.common import (
    SoftmaxAttentionBase, attention_core, decode_core, pad_to_blocks, token_mask)


class Indexer(nnx.Module):
  """Index queries [B, T, K, I] and index keys [B, T, I] (I = cfg.msa.index_head_dim)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, k, i = cfg.d_model, cfg.num_kv_heads, cfg.msa.index_head_dim
    pdt = layers.dtype_of(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=layers.dtype_of(cfg.dtype), param_dtype=pdt)
    self.q_proj = layers.Linear((d, k, i), ("embed", "kv_heads", "index_dim"), "BTD,DKI->BTKI", **kw)
    self.k_proj = layers.Linear((d, i), ("embed", "index_dim"), "BTD,DI->BTI", **kw)
    nkw = dict(eps=cfg.norm_eps, zero_centered=cfg.norm_zero_centered, names=("index_dim",),
               rngs=rngs, param_dtype=pdt)
    self.q_norm = layers.RMSNorm(i, **nkw)
    self.k_norm = layers.RMSNorm(i, **nkw)
    self.index_dim = i

  def __call__(self, x_BTD, cos_BTR, sin_BTR):
    cos, sin = cos_BTR[..., :self.index_dim], sin_BTR[..., :self.index_dim]
    q_BTKI = layers.apply_rope(self.q_norm(self.q_proj(x_BTD)), cos, sin)
    k_BTI = layers.apply_rope(self.k_norm(self.k_proj(x_BTD))[:, :, None], cos, sin)[:, :, 0]
    return q_BTKI, k_BTI


def index_scores(q_BTKI, k_BSI, q_positions_BT, k_positions_BS):
  """Token scores [B, K, T, S] in float32, -inf at keys after the query."""
  s_BKTS = jnp.einsum("BTKI,BSI->BKTS", q_BTKI.astype(jnp.float32), k_BSI.astype(jnp.float32))
  future = k_positions_BS[:, None, None, :] > q_positions_BT[:, None, :, None]
  return jnp.where(future, -jnp.inf, s_BKTS)


def msa_selection(scores_BKTS, q_positions_BT, msa_cfg):
  """Block max of the token scores, then HF top-k selection: the per-query block selection bool
  [B, K, T, C]. (The kernels' `masks.msa_block_mask` turns per-q-tile index lists into a tile mask.)"""
  bs = msa_cfg.block_size
  b, k, t, _ = scores_BKTS.shape
  blocks_BKTC = pad_to_blocks(scores_BKTS, bs, axis=-1, value=-jnp.inf).reshape(
      b, k, t, -1, bs).max(axis=-1)
  if msa_cfg.selection == "max_heads":
    blocks_BKTC = blocks_BKTC.max(axis=1, keepdims=True)
  mask_BKTC, _ = select_blocks(blocks_BKTC, (q_positions_BT // bs)[:, None],
                               top_k=msa_cfg.top_k, local_blocks=msa_cfg.local_blocks)
  return jnp.broadcast_to(mask_BKTC, (b, k) + mask_BKTC.shape[2:])


def indexer_kl(q_BTNH, k_BSKH, scores_BKTS, mask_BKTS, *, scale: float, index_scale: float):
  """Mean over (B, K, T) of KL(group-mean main attention || indexer softmax) on mask_BKTS."""
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  q_BTKGH = jax.lax.stop_gradient(q_BTNH).reshape(b, t, k, n // k, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, jax.lax.stop_gradient(k_BSKH).astype(
      q_BTNH.dtype), preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask_BKTS[:, :, None], logits, -jnp.inf)
  p_BKTS = jax.nn.softmax(logits, axis=-1).mean(axis=2)
  log_q = jax.nn.log_softmax(jnp.where(mask_BKTS, scores_BKTS * index_scale, -jnp.inf), axis=-1)
  kl = jnp.where(mask_BKTS & (p_BKTS > 0), p_BKTS * (jnp.log(p_BKTS) - log_q), 0.0)
  return kl.sum(axis=-1).mean()


# Kernel families of kernels.msa_attention per attention_impl (no Mosaic GPU kernel: Triton).
_KERNEL_IMPLS = {"pallas_tpu": "pallas_tpu", "pallas_triton": "pallas_triton",
                 "pallas_mosaic_gpu": "pallas_triton", None: None}


def kernel_forward(q_BTNH, k_BSKH, v_BSKH, iq_BTKI, ik_BSI, msa_cfg, *, implementation, scale,
                   q_offset=None, with_kl=False):
  """MSA on `kernels.msa_attention`: (y [B, T, N, H], kl scalar or None).

  Query i sits at position i + q_offset (default S - T), key slot j at position j. The same
  selection as `msa_selection` (block max of index scores, top-k, local blocks forced) and the
  same KL as `indexer_kl`, without [T, S] tensors. On CPU the Pallas kernels run in interpret mode.
  """
  from mixtral_jax.kernels import msa_attention as ma

  m = msa_cfg
  impl = _KERNEL_IMPLS[implementation]
  bs = m.block_size
  kw = dict(implementation=impl, interpret=jax.default_backend() == "cpu",
            block_sizes=ma.BlockSizes(rows=max(16, min(128, bs))))
  indices_BKTk = ma.msa_select(iq_BTKI, ik_BSI, block_size=bs, top_k=m.top_k,
                               local_blocks=m.local_blocks, selection=m.selection,
                               q_offset=q_offset, **kw)
  y_BTNH = ma.msa_attention(q_BTNH, k_BSKH, v_BSKH.astype(k_BSKH.dtype), indices_BKTk,
                            block_size=bs, sm_scale=scale, q_offset=q_offset, **kw)
  kl = None
  if with_kl:
    kl = ma.msa_indexer_kl(q_BTNH, k_BSKH, iq_BTKI, ik_BSI, indices_BKTk, block_size=bs,
                           scale=scale, index_scale=m.index_head_dim ** -0.5, implementation=impl)
  return y_BTNH.astype(q_BTNH.dtype), kl


class MSAAttention(SoftmaxAttentionBase):
  """Block-sparse causal GQA attention with a learned block indexer (MiniMax-M3 sparse layers)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.indexer = Indexer(cfg, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, cache: MSACache | None = None):
    """x [B, T, D], positions int32 [B, T] -> (y [B, T, D], cache, {"msa_kl": w * kl} or {})."""
    m = self.cfg.msa
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_BT)
    cos, sin = self.rope(positions_BT)
    iq_BTKI, ik_BTI = self.indexer(jax.lax.stop_gradient(x_BTD), cos, sin)
    full_forward = cache is None  # training or evaluation over whole sequences: no cache
    if full_forward:
      k_BSKH, v_BSKH, k_pos, ik_BSI = k_BTKH, v_BTKH, positions_BT, ik_BTI
    else:
      cache = cache.write(k_BTKH, v_BTKH, ik_BTI, positions_BT[0, 0])
      k_BSKH, v_BSKH, k_pos, ik_BSI = (cache.kv.k_BSKH, cache.kv.v_BSKH, cache.positions[None],
                                       cache.index_k_BSI)
    if not full_forward and x_BTD.shape[1] == 1:
      y_BTNH = decode_core(q_BTNH, k_BSKH, v_BSKH, positions_BT,
                           implementation=self.cfg.attention_impl,
                           block_kv=self.cfg.attention_block, scale=self.scale, msa_cfg=m,
                           index_q_BTKI=iq_BTKI, index_k_BSI=ik_BSI)
      if y_BTNH is not None:
        return self.o_proj(y_BTNH), cache, {}
    want_kl = bool(m.kl_loss_weight) and full_forward  # the indexer trains on full forwards only
    if self.cfg.attention_impl != "xla" and x_BTD.shape[1] > 1:
      y_BTNH, kl = kernel_forward(
          q_BTNH, k_BSKH, v_BSKH, iq_BTKI, ik_BSI, m, implementation=self.cfg.attention_impl,
          scale=self.scale, q_offset=None if full_forward else positions_BT[0, 0], with_kl=want_kl)
      return self.o_proj(y_BTNH), cache, {"msa_kl": m.kl_loss_weight * kl} if want_kl else {}
    k_pos = jnp.broadcast_to(k_pos, (x_BTD.shape[0], k_BSKH.shape[1]))
    scores_BKTS = index_scores(iq_BTKI, ik_BSI, positions_BT, k_pos)
    block_mask_BKTC = msa_selection(scores_BKTS, positions_BT, m)
    y_BTNH = attention_core(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                            k_positions_BS=k_pos, block_mask_BKTC=block_mask_BKTC,
                            block_kv=m.block_size, implementation=self.cfg.attention_impl)
    losses = {}
    if want_kl:
      mask_BKTS = token_mask(positions_BT, k_pos, block_mask_BKTC=block_mask_BKTC,
                             block_kv=m.block_size)
      kl = indexer_kl(q_BTNH, k_BSKH, scores_BKTS, mask_BKTS, scale=self.scale,
                      index_scale=m.index_head_dim ** -0.5)
      losses["msa_kl"] = m.kl_loss_weight * kl
    return self.o_proj(y_BTNH), cache, losses

  def init_cache(self, batch: int, max_len: int, dtype=None) -> MSACache:
    dtype = dtype or self.dtype
    return MSACache(kv=super().init_cache(batch, max_len, dtype),
                    index_k_BSI=jnp.zeros((batch, max_len, self.cfg.msa.index_head_dim), dtype))

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

Approximate decode selection (cfg.msa.decode_selection 'mean' | 'minmax', default 'exact'): a
decode step scores the complete past blocks from per-block summaries of the index keys kept in
the `MSACache` (the mean index key, or Quest's per-channel min/max bound), reading ~1/block_size
of the index keys, then makes the same top-k with the local blocks forced and the same sparse
attention. A decode-time choice only: the training forward, evaluation and a prefill (T > 1)
stay exact. `summary_recall` measures how much of the exact top-k it keeps
(benchmarks/summary_recall.py).

KL loss (weight cfg.msa.kl_loss_weight): KL(p_main || p_idx) per query and group over the tokens
of the selected blocks, where p_main is the main branch's attention averaged over the group's heads
(stop-gradient) and p_idx = softmax(q_idx . k_idx / sqrt(index_head_dim)). The indexer reads a
stop-gradient copy of x, so this loss trains the indexer only and the indexer nothing else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.kernels.block_sparse_attention.selection import local_blocks_mask, select_blocks
from mixtral_jax.kernels.decode_attention.reference import block_summaries
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
  return select_from_block_scores(blocks_BKTC, q_positions_BT, msa_cfg)


def select_from_block_scores(blocks_BKTC, q_positions_BT, msa_cfg):
  """Top-k of block scores [B, K, T, C] (-inf = not selectable) with the local blocks forced,
  shared over groups for selection='max_heads': bool [B, K, T, C]."""
  b, k = blocks_BKTC.shape[:2]
  if msa_cfg.selection == "max_heads":
    blocks_BKTC = blocks_BKTC.max(axis=1, keepdims=True)
  mask_BKTC, _ = select_blocks(blocks_BKTC, (q_positions_BT // msa_cfg.block_size)[:, None],
                               top_k=msa_cfg.top_k, local_blocks=msa_cfg.local_blocks)
  return jnp.broadcast_to(mask_BKTC, (b, k) + mask_BKTC.shape[2:])


def summary_block_scores(iq_BTKI, summaries, q_positions_BT, *, kind, block_size):
  """Approximate block scores [B, K, T, C] f32 from summaries of the index keys
  (`BlockSummaries` [B, C, 1, I], see `MSACache`): kind 'mean' q_idx . the block's mean index
  key; 'minmax' Quest's bound sum_i max(q_i * min_i, q_i * max_i), an upper bound of the exact
  block max. Only complete blocks before the query's own block are scored (-inf elsewhere: the
  selection forces the local blocks)."""
  q_BTKI = iq_BTKI.astype(jnp.float32)
  if kind == "mean":
    mean_BCI = summaries.mean_BCKH[:, :, 0].astype(jnp.float32)
    scores_BKTC = jnp.einsum("BTKI,BCI->BKTC", q_BTKI, mean_BCI)
  elif kind == "minmax":
    min_BCI = summaries.min_BCKH[:, :, 0].astype(jnp.float32)
    max_BCI = summaries.max_BCKH[:, :, 0].astype(jnp.float32)
    scores_BKTC = (jnp.einsum("BTKI,BCI->BKTC", jnp.maximum(q_BTKI, 0.0), max_BCI)
                   + jnp.einsum("BTKI,BCI->BKTC", jnp.minimum(q_BTKI, 0.0), min_BCI))
  else:
    raise ValueError(f"kind: unknown {kind!r}; expected 'mean' or 'minmax'")
  c = scores_BKTC.shape[-1]
  past_BTC = jnp.arange(c) < (q_positions_BT // block_size)[..., None]
  return jnp.where(past_BTC[:, None], scores_BKTC, -jnp.inf)


def summary_selection(iq_BTKI, summaries, q_positions_BT, msa_cfg, kind=None):
  """The approximate (block-summary) selection bool [B, K, T, C] of cfg.msa.decode_selection
  (or `kind`): `summary_block_scores`, then the same top-k as `msa_selection`."""
  kind = kind or msa_cfg.decode_selection
  blocks_BKTC = summary_block_scores(iq_BTKI, summaries, q_positions_BT, kind=kind,
                                     block_size=msa_cfg.block_size)
  return select_from_block_scores(blocks_BKTC, q_positions_BT, msa_cfg)


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
    approximate = False
    if not full_forward and x_BTD.shape[1] == 1:
      y_BTNH = decode_core(q_BTNH, k_BSKH, v_BSKH, positions_BT,
                           implementation=self.cfg.attention_impl,
                           block_kv=self.cfg.attention_block, scale=self.scale, msa_cfg=m,
                           index_q_BTKI=iq_BTKI, index_k_BSI=ik_BSI,
                           index_summaries=cache.index_summaries)
      if y_BTNH is not None:
        return self.o_proj(y_BTNH), cache, {}
      approximate = cache.index_summaries is not None
    want_kl = bool(m.kl_loss_weight) and full_forward  # the indexer trains on full forwards only
    if self.cfg.attention_impl != "xla" and x_BTD.shape[1] > 1:
      y_BTNH, kl = kernel_forward(
          q_BTNH, k_BSKH, v_BSKH, iq_BTKI, ik_BSI, m, implementation=self.cfg.attention_impl,
          scale=self.scale, q_offset=None if full_forward else positions_BT[0, 0], with_kl=want_kl)
      return self.o_proj(y_BTNH), cache, {"msa_kl": m.kl_loss_weight * kl} if want_kl else {}
    k_pos = jnp.broadcast_to(k_pos, (x_BTD.shape[0], k_BSKH.shape[1]))
    if approximate:  # a decode step with decode_selection mean/minmax: no index key is read
      block_mask_BKTC = summary_selection(iq_BTKI, cache.index_summaries, positions_BT, m)
    else:
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
    m = self.cfg.msa
    return MSACache.zeros(batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim,
                          m.index_head_dim, dtype or self.dtype,
                          decode_selection=m.get("decode_selection", "exact"),
                          block_size=m.block_size)


def summary_recall(index_q_BTKI, index_k_BSI, q_positions_BT, msa_cfg, kind, *, chunk=32):
  """How much of MSA's exact top-k the block-summary selection `kind` ('mean' | 'minmax') keeps.

  index_q_BTKI: the index queries of T (sampled) query tokens at q_positions_BT int32 [B, T];
  index_k_BSI: the index keys of the whole sequence (slot s = position s, S > every query
  position). Complete blocks are summarized once (`block_summaries`: a complete block's summary
  is the same whatever the query). For each (row, group, query): E = the exact selection
  (`msa_selection`), A = the summary selection (`summary_selection`), F = the forced local blocks
  (in both). Queries are scored `chunk` at a time ([B, K, chunk, S] f32 index scores at most).
  Returns f32 scalars: recall = sum |E & A| / sum |E|; recall_unforced = sum |(E & A) - F| /
  sum |E - F| (the forced blocks are recalled trivially); exact_unforced = mean |E - F|, the
  number of blocks per (query, group) that recall_unforced is over.
  """
  bs = msa_cfg.block_size
  b, t = q_positions_BT.shape
  s = index_k_BSI.shape[1]
  summaries = block_summaries(index_k_BSI[:, :, None], jnp.full((b,), s, jnp.int32),
                              block_size=bs)
  k_pos_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  n = -(-t // chunk)
  valid_BT = jnp.arange(n * chunk) < t
  pad = lambda x: pad_to_blocks(x, chunk, axis=1)
  iq_NBCKI = jnp.moveaxis(pad(index_q_BTKI).reshape(b, n, chunk, *index_q_BTKI.shape[2:]), 1, 0)
  pos_NBC = jnp.moveaxis(pad(q_positions_BT).reshape(b, n, chunk), 1, 0)
  valid_NC = valid_BT.reshape(n, chunk)

  def counts(args):
    iq_BTKI, pos_BT, valid_T = args
    exact_BKTC = msa_selection(index_scores(iq_BTKI, index_k_BSI, pos_BT, k_pos_BS), pos_BT,
                               msa_cfg)
    approx_BKTC = summary_selection(iq_BTKI, summaries, pos_BT, msa_cfg, kind)
    c = exact_BKTC.shape[-1]
    free_BKTC = ~local_blocks_mask((pos_BT // bs)[:, None], c, msa_cfg.local_blocks)
    exact_BKTC &= valid_T[None, None, :, None]
    hit_BKTC = exact_BKTC & approx_BKTC
    return jnp.stack([hit_BKTC.sum(), exact_BKTC.sum(), (hit_BKTC & free_BKTC).sum(),
                      (exact_BKTC & free_BKTC).sum()]).astype(jnp.float32)

  hit, total, hit_free, total_free = jax.lax.map(counts, (iq_NBCKI, pos_NBC, valid_NC)).sum(0)
  groups = b * index_q_BTKI.shape[2] * t
  return {"recall": hit / total,
          "recall_unforced": jnp.where(total_free > 0, hit_free / total_free, jnp.nan),
          "exact_unforced": total_free / groups}

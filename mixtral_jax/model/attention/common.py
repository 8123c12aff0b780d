"""Pieces shared by the softmax attention variants (full, swa, moba, msa).

- `SoftmaxAttentionBase`: q/k/v/o projections (HF names), QK-norm and partial rotary.
- `attention_core`: causal GQA softmax attention with an optional sliding window and an optional
  per-query block selection. Every variant describes its mask with these few structured
  arguments (positions, window, block mask) instead of a dense mask, so a block-sparse kernel
  (`mixtral_jax.kernels.block_sparse_attention`) can replace the XLA path behind the same call.
- `softmax_attention`: the plain dense reference (explicit boolean mask; rows that see no key give
  zeros, as the kernels' reference).
- `decode_core`: the single-token decode step of `full` and `msa` layers on the decode kernels
  (`mixtral_jax.kernels.decode_attention`) under a Pallas `attention_impl`.
- `expand_block_mask`: a per-query block selection [B, K, T, C] -> token mask. The selection
  itself (top-k with forced local blocks, index lists <-> block masks) is the kernels' vocabulary:
  `mixtral_jax.kernels.block_sparse_attention.selection`.
- `KVCache` (from cache.py, with the cache protocol): linear key/value cache.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.model import layers
from mixtral_jax.model.attention.cache import EMPTY_POSITION, KVCache  # noqa: F401 - re-exported

class SoftmaxAttentionBase(nnx.Module):
  """Projections, QK-norm and rope shared by the softmax attention variants.

  qk_norm 'full' (MiniMax-M2): one RMSNorm over the whole q projection [N*H] and one over k [K*H].
  qk_norm 'per_head' (MiniMax-M3 / Gemma): one RMSNorm over head_dim, shared by all heads.
  Both use zero-centered weights (scale 1 + w) when cfg.norm_zero_centered.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.dtype = layers.dtype_of(cfg.dtype)
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=layers.dtype_of(cfg.param_dtype))
    self.q_proj = layers.Linear((d, n, h), ("embed", "heads", "head_dim"), "BTD,DNH->BTNH", **kw)
    self.k_proj = layers.Linear((d, k, h), ("embed", "kv_heads", "head_dim"), "BTD,DKH->BTKH", **kw)
    self.v_proj = layers.Linear((d, k, h), ("embed", "kv_heads", "head_dim"), "BTD,DKH->BTKH", **kw)
    self.o_proj = layers.Linear((n, h, d), ("heads", "head_dim", "embed"), "BTNH,NHD->BTD", **kw)
    nkw = dict(eps=cfg.norm_eps, zero_centered=cfg.norm_zero_centered, rngs=rngs,
               param_dtype=layers.dtype_of(cfg.param_dtype))
    if cfg.qk_norm == "full":
      self.q_norm = layers.RMSNorm(n * h, names=("heads",), **nkw)
      self.k_norm = layers.RMSNorm(k * h, names=("kv_heads",), **nkw)
    elif cfg.qk_norm == "per_head":
      self.q_norm = layers.RMSNorm(h, names=("head_dim",), **nkw)
      self.k_norm = layers.RMSNorm(h, names=("head_dim",), **nkw)
    else:
      self.q_norm = self.k_norm = None
    self.scale = h ** -0.5

  def rope(self, positions_BT):
    """cos, sin [B, T, rotary_dim] of the main attention."""
    return layers.rope_cos_sin(positions_BT, self.cfg.rotary_dim, self.cfg.rope_theta)

  def qkv(self, x_BTD, positions_BT):
    """Returns q [B,T,N,H], k [B,T,K,H], v [B,T,K,H]: normed (per cfg.qk_norm) and rotated."""
    q_BTNH, k_BTKH, v_BTKH = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
    if self.cfg.qk_norm == "full":
      # M2 normalizes the concatenated heads before splitting them.
      q_BTNH = self.q_norm(q_BTNH.reshape(*q_BTNH.shape[:2], -1)).reshape(q_BTNH.shape)
      k_BTKH = self.k_norm(k_BTKH.reshape(*k_BTKH.shape[:2], -1)).reshape(k_BTKH.shape)
    elif self.cfg.qk_norm == "per_head":
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    cos, sin = self.rope(positions_BT)
    return layers.apply_rope(q_BTNH, cos, sin), layers.apply_rope(k_BTKH, cos, sin), v_BTKH

  def keys(self, k_BTKH, v_BTKH, positions_BT, cache: KVCache | None):
    """(k [B,S,K,H], v, key positions, cache): this chunk's own keys without a cache; with one,
    the whole cache after writing the chunk at its first position."""
    if cache is None:
      return k_BTKH, v_BTKH, positions_BT, None
    cache = cache.write(k_BTKH, v_BTKH, positions_BT[0, 0])
    return cache.k_BSKH, cache.v_BSKH, cache.positions_1S, cache

  def init_cache(self, batch: int, max_len: int, dtype=None):
    return KVCache.zeros(batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim,
                         dtype or self.dtype)


def softmax_attention(q_BTNH, k_BSKH, v_BSKH, mask, *, scale=None, return_probs=False):
  """Plain dense GQA softmax attention: the reference every other path must match.

  mask: bool, True = may attend, broadcastable to [B, K, G, T, S] (e.g. [B, 1, 1, T, S] or
  [B, K, 1, T, S]). A query row that sees no key gets zero probabilities and output zeros (the
  kernels' `masked_attention_reference` semantics). Logits and softmax in float32.
  Returns y [B, T, N, H] in q's dtype (and the probabilities [B, K, G, T, S] if return_probs).
  """
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  scale = h ** -0.5 if scale is None else scale
  q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH.astype(q_BTNH.dtype),
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask, logits, -jnp.inf)
  # softmax with an empty row -> 0 instead of NaN (the max of an empty row is taken as 0).
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  probs_BKGTS = p / jnp.where(denom == 0.0, 1.0, denom)
  y_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH)
  y_BTNH = y_BTKGH.reshape(b, t, n, h).astype(q_BTNH.dtype)
  return (y_BTNH, probs_BKGTS) if return_probs else y_BTNH


def token_mask(q_positions_BT, k_positions_BS, *, window=None, block_mask_BKTC=None,
               block_kv=None):
  """Boolean mask [B, K or 1, T, S]: causal by position, optional window, optional blocks.

  window W: query at p sees keys at p-W < j <= p. block_mask_BKTC: per query, which key
  blocks (block c = key slots [c*block_kv, (c+1)*block_kv)) it may attend to.
  """
  qp = q_positions_BT[:, None, :, None]
  kp = k_positions_BS[:, None, None, :]
  mask = kp <= qp
  if window is not None:
    mask &= kp > qp - window
  if block_mask_BKTC is not None:
    mask = mask & expand_block_mask(block_mask_BKTC, block_kv, k_positions_BS.shape[-1])
  return mask


def attention_core(q_BTNH, k_BSKH, v_BSKH, *, q_positions_BT, k_positions_BS, window=None,
                   block_mask_BKTC=None, block_kv=None, implementation="xla", kernel_block=128):
  """Causal GQA softmax attention over keys at `k_positions_BS`, optionally windowed/block-sparse.

  q [B,T,N,H]; k, v [B,S,K,H]; positions int32 (k_positions broadcastable to [B, S]; unwritten
  cache slots carry EMPTY_POSITION). block_mask_BKTC bool [B, K, T, ceil(S / block_kv)]: the
  key blocks each query of each kv group selected (its own block is always among them).
  implementation: 'xla' builds the dense mask and calls `softmax_attention`. A Pallas kernel
  ('pallas_tpu' | 'pallas_triton' | 'pallas_mosaic_gpu' | None = best for the backend; on CPU they
  run in interpret mode) serves the causal self-attention of a whole chunk (T == S: the training
  forward, a prefill that fills its cache, the in-chunk part of an SWA prefill), with or without a
  sliding window (the kernel masks partial tiles token by token), with tiles of `kernel_block`;
  lengths need not be block multiples. Per-query block selections (MoBA/MSA layers run their own
  kernels) and caches longer than the chunk stay on the XLA path (logged once). Returns y [B, T, N, H].
  """
  if implementation != "xla":  # a named kernel, or None: the backend's best (XLA on CPU)
    y = _kernel_attention(q_BTNH, k_BSKH, v_BSKH, window, block_mask_BKTC, implementation,
                          kernel_block)
    if y is not None:
      return y
  k_positions_BS = jnp.broadcast_to(k_positions_BS, (q_BTNH.shape[0], k_BSKH.shape[1]))
  mask_BKTS = token_mask(q_positions_BT, k_positions_BS, window=window,
                         block_mask_BKTC=block_mask_BKTC, block_kv=block_kv)
  return softmax_attention(q_BTNH, k_BSKH, v_BSKH, mask_BKTS[:, :, None])


_FALLBACK_LOGGED = set()


def log_fallback_once(implementation, reason):
  """One WARNING per (implementation, reason): a kernel path that takes XLA instead."""
  if (implementation, reason) not in _FALLBACK_LOGGED:
    _FALLBACK_LOGGED.add((implementation, reason))
    logging.warning("attention_impl=%s: %s needs token-level masks; using the XLA path",
                    implementation, reason)


def check_implementation(implementation):
  """Raises for an unknown attention_impl; returns whether it resolves to a kernel here."""
  from mixtral_jax import kernels

  if implementation is not None and implementation not in kernels.IMPLEMENTATIONS:
    raise ValueError(f"attention implementation: unknown {implementation!r}; expected one of "
                     f"{kernels.IMPLEMENTATIONS} or None")
  return (implementation or kernels.default_implementation()) != "xla"


def _kernel_attention(q_BTNH, k_BSKH, v_BSKH, window, block_mask_BKTC, implementation, block):
  """The block-sparse kernel on the causal (windowed) tile mask, or None where it cannot be exact."""
  from mixtral_jax import kernels

  on_kernel = check_implementation(implementation)
  b, t, _, _ = q_BTNH.shape
  s, kv_heads = k_BSKH.shape[1], k_BSKH.shape[2]
  reason = ("per-query block selection" if block_mask_BKTC is not None else
            "a cache longer than the chunk (decode)" if s != t else None)
  if reason is not None:
    log_fallback_once(implementation, reason)
    return None
  if not on_kernel:
    return None
  # implementation None stays None: the kernel API then falls back (Mosaic GPU -> Triton -> XLA)
  # where a kernel rejects the shapes or dtype. The API drops the tiles outside the causal window.
  n = -(-t // block)
  mask = jnp.ones((b, kv_heads, n, n), jnp.bool_)
  return kernels.block_sparse_attention(
      q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype), mask, block_q=block,
      block_kv=block, causal=True, window=window, implementation=implementation,
      interpret=jax.default_backend() == "cpu")


# The decode package has no Mosaic GPU kernel: a Mosaic GPU model decodes on the Triton kernels.
_DECODE_IMPLS = {"pallas_tpu": "pallas_tpu", "pallas_triton": "pallas_triton",
                 "pallas_mosaic_gpu": "pallas_triton", None: None}


def decode_core(q_BTNH, k_BSKH, v_BSKH, positions_BT, *, implementation, block_kv, scale,
                msa_cfg=None, index_q_BTKI=None, index_k_BSI=None, index_summaries=None,
                moba_cfg=None, mean_BCKH=None):
  """One new token per row (T == 1) over a linear cache on the decode kernels, or None (the
  caller then takes `attention_core`'s XLA path) for attention_impl 'xla' or a cache whose
  length is not a multiple of the kernel block (logged once).

  q [B, 1, N, H]; k, v [B, S, K, H] with the new token already written at slot positions[b, 0]
  (slot s = position s, so lengths = positions + 1). Dense GQA decode (`dense_decode`, tiles of
  block_kv slots) without msa_cfg; with it, MSA decode: index block scores of index_q
  [B, 1, K, I] against index_k [B, S, I], top-k blocks of msa_cfg.block_size with the local
  blocks forced (per GQA group, or the max over groups for selection='max_heads', exactly as
  `msa.msa_selection`), attention over the selected blocks only; with index_summaries (the
  `MSACache`'s, under msa_cfg.decode_selection 'mean' | 'minmax') the block scores come from the
  summaries instead (`msa_summary_block_scores`: on the summary kernel for 'minmax' with
  'max_heads', jnp otherwise) and index_k is not read. With moba_cfg, MoBA decode:
  block scores from the cached block means mean_BCKH f32 [B, C, K, H] (group-mean query . mean
  key over complete past blocks, `summary_block_scores` kind 'mean'), top-k with the own block
  forced (exactly `moba.moba_selection`), attention over those blocks. On CPU the Pallas
  kernels run in interpret mode. Returns y [B, 1, N, H] in q's dtype.
  """
  if implementation == "xla":
    return None
  from mixtral_jax.kernels import decode_attention as da

  impl = _DECODE_IMPLS[implementation]
  block = (msa_cfg.block_size if msa_cfg is not None else moba_cfg.block_size
           if moba_cfg is not None else block_kv)
  s = k_BSKH.shape[1]
  if s % block:
    reason = f"cache length {s} not a multiple of the decode kernel block {block}"
    if (implementation, reason) not in _FALLBACK_LOGGED:
      _FALLBACK_LOGGED.add((implementation, reason))
      logging.warning("attention_impl=%s: %s; decoding on the XLA path", implementation, reason)
    return None
  lengths_B = positions_BT[:, 0].astype(jnp.int32) + 1
  kw = dict(implementation=impl, interpret=jax.default_backend() == "cpu")
  q_BNH = q_BTNH[:, 0]
  if moba_cfg is not None:
    summaries = da.BlockSummaries(mean_BCKH, None, None)  # MoBA reads the means only
    scores_BKC = da.summary_block_scores(q_BNH, summaries, lengths_B, kind="mean",
                                         block_size=block, force_own=True, **kw)
    blocks_BKJ, _ = da.select_forced(scores_BKC, top_k=moba_cfg.top_k,
                                     chunk=da.BlockSizes().select_chunk, lengths_B=lengths_B,
                                     block_size=block)
    y_BNH = da.sparse_decode(q_BNH, k_BSKH, v_BSKH, lengths_B, blocks_BKJ, block_size=block,
                             sm_scale=scale, **kw)
    return y_BNH[:, None]
  if msa_cfg is None:
    y_BNH = da.dense_decode(q_BNH, k_BSKH, v_BSKH, lengths_B, sm_scale=scale,
                            block_sizes=da.BlockSizes(block_kv=block), **kw)
    return y_BNH[:, None]
  # msa_decode's steps, spelled out so that selection='max_heads' shares one choice over groups.
  if index_summaries is not None:
    scores_BKC = da.msa_summary_block_scores(
        index_q_BTKI[:, 0], index_summaries, lengths_B, kind=msa_cfg.decode_selection,
        block_size=block, selection=msa_cfg.selection, **kw)
  else:
    scores_BKC = da.msa_block_scores(index_q_BTKI[:, 0], index_k_BSI, lengths_B,
                                     block_size=block, **kw)
    if msa_cfg.selection == "max_heads":
      scores_BKC = jnp.broadcast_to(scores_BKC.max(axis=1, keepdims=True), scores_BKC.shape)
  indices_BKJ = da.select_top_blocks(scores_BKC, lengths_B, block_size=block,
                                     top_k=msa_cfg.top_k, local_blocks=msa_cfg.local_blocks,
                                     chunk=da.BlockSizes().select_chunk)
  y_BNH = da.sparse_decode(q_BNH, k_BSKH, v_BSKH, lengths_B, indices_BKJ, block_size=block,
                           sm_scale=scale, **kw)
  return y_BNH[:, None]


def expand_block_mask(block_mask_BKTC, block_kv: int, num_keys: int):
  """Block mask [B, K, T, C] -> token mask [B, K, T, S] (key slot s lies in block s // block_kv)."""
  return jnp.repeat(block_mask_BKTC, block_kv, axis=-1)[..., :num_keys]


def pad_to_blocks(x, block: int, axis: int, value=0):
  """Pads `axis` up to a multiple of `block`."""
  pad = -x.shape[axis] % block
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)

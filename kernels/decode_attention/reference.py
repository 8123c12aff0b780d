"""Pure-jnp decode attention: the 'xla' implementation and the oracle of every kernel here.

Decode = one new token per row (q_len 1). Shapes: B batch, S cache slots (slot s = position s),
K kv heads, G = N // K query heads per kv head, H head dim, I index dim, C = ceil(S / block)
key blocks, J selected blocks per (row, kv head). Row b holds `lengths[b]` tokens; its new
token sits at position lengths[b] - 1 (already written) and attends to positions < lengths[b].

Block selection reproduces the model's prefill/decode selection (mixtral_jax.model.attention
msa.py / moba.py + block_sparse_attention.selection.select_blocks) op for op, so the same inputs give the same blocks.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..block_sparse_attention import selection

# Finite stand-in for -inf in running maxima: empty splits combine to weight 0 without NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def cdiv(a, b):
  return -(-a // b)


def _pad_axis(x, block, axis, value):
  pad = -x.shape[axis] % block
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def dense_decode_reference(q_BNH, k_BSKH, v_BSKH, lengths_B, *, sm_scale):
  """Softmax attention of each row's new token over its first lengths[b] keys.

  Returns [B, N, H] in q's dtype (float32 logits and softmax); a row of length 0 gives zeros.
  """
  s = k_BSKH.shape[1]
  mask_BS = jnp.arange(s)[None, :] < lengths_B[:, None]
  return masked_decode_reference(q_BNH, k_BSKH, v_BSKH, mask_BS[:, None], sm_scale=sm_scale)


def masked_decode_reference(q_BNH, k_BSKH, v_BSKH, mask_BKS, *, sm_scale):
  """Decode attention under a token mask bool [B, K or 1, S] shared by a kv head's G heads."""
  b, n, h = q_BNH.shape
  kh = k_BSKH.shape[2]
  q_BKGH = q_BNH.reshape(b, kh, n // kh, h).astype(jnp.float32)
  logits_BKGS = jnp.einsum("BKGH,BSKH->BKGS", q_BKGH, k_BSKH.astype(jnp.float32)) * sm_scale
  mask_BK1S = mask_BKS[:, :, None]
  logits_BKGS = jnp.where(mask_BK1S, logits_BKGS, MASK_VALUE)
  m_BKG1 = jnp.max(logits_BKGS, axis=-1, keepdims=True)
  p_BKGS = jnp.where(mask_BK1S, jnp.exp(logits_BKGS - m_BKG1), 0.0)
  l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
  p_BKGS = p_BKGS / jnp.where(l_BKG1 == 0.0, 1.0, l_BKG1)
  o_BKGH = jnp.einsum("BKGS,BSKH->BKGH", p_BKGS, v_BSKH.astype(jnp.float32))
  return o_BKGH.reshape(b, n, h).astype(q_BNH.dtype)


def sparse_decode_reference(q_BNH, k_BSKH, v_BSKH, lengths_B, indices_BKJ, *, block_size,
                            sm_scale):
  """Decode attention over the listed key blocks only (block c = slots [c*bs, (c+1)*bs)).

  indices_BKJ int32: block ids per (row, kv head), -1 = unused slot; keys at positions >=
  lengths[b] stay hidden. Returns [B, N, H] in q's dtype.
  """
  s = k_BSKH.shape[1]
  c = cdiv(s, block_size)
  onehot_BKJC = (indices_BKJ[..., None] == jnp.arange(c)) & (indices_BKJ[..., None] >= 0)
  block_BKC = jnp.any(onehot_BKJC, axis=-2)
  mask_BKS = jnp.repeat(block_BKC, block_size, axis=-1)[..., :s]
  mask_BKS &= (jnp.arange(s)[None, :] < lengths_B[:, None])[:, None]
  return masked_decode_reference(q_BNH, k_BSKH, v_BSKH, mask_BKS, sm_scale=sm_scale)


def select_top_blocks(scores_BKC, lengths_B, *, block_size, top_k, local_blocks=1, chunk=None):
  """Top-k blocks per (row, kv head), as `block_sparse_attention.selection.select_blocks`
  with T = 1.

  scores_BKC float32 with blocks the query may not pick already -inf. The `local_blocks` blocks
  ending at the query's own block are forced (+inf); -inf blocks are never selected.
  chunk: top-k within chunks of `chunk` blocks first, then over their winners (the same set,
  same tie order: lower block id first; a cheaper top-k on long rows where it pays).
  Returns indices int32 [B, K, min(top_k, C)], -1 for unused slots.
  """
  b, kh, c = scores_BKC.shape
  q_block_B1 = ((lengths_B - 1) // block_size)[:, None]
  scores_BKC = jnp.where(selection.local_blocks_mask(q_block_B1, c, local_blocks), jnp.inf,
                         scores_BKC)
  k = min(top_k, c)
  if not (chunk and c % chunk == 0 and c > chunk and chunk >= k):
    return selection.topk_indices(scores_BKC, k)
  part_s, part_i = jax.lax.top_k(scores_BKC.reshape(b, kh, c // chunk, chunk), k)
  part_i = part_i + (jnp.arange(c // chunk) * chunk)[:, None]
  top_scores, pos = jax.lax.top_k(part_s.reshape(b, kh, -1), k)
  indices = jnp.take_along_axis(part_i.reshape(b, kh, -1), pos, axis=-1)
  return jnp.where(top_scores == -jnp.inf, -1, indices).astype(jnp.int32)


def index_block_scores_reference(index_q_BKI, index_k_BSI, lengths_B, *, block_size):
  """MSA block scores [B, K, C] f32: max over each block's keys at positions < lengths[b] of
  q_idx . k_idx (the new token's index query per kv group), -inf for blocks with no such key.

  Same ops as `msa.index_scores` + `msa.msa_selection` at T = 1, so the scores are identical.
  """
  b, s, _ = index_k_BSI.shape
  q_BTKI = index_q_BKI[:, None]
  s_BKTS = jnp.einsum("BTKI,BSI->BKTS", q_BTKI.astype(jnp.float32),
                      index_k_BSI.astype(jnp.float32))
  k_pos_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
  future = k_pos_BS[:, None, None, :] > (lengths_B - 1)[:, None, None, None]
  s_BKTS = jnp.where(future, -jnp.inf, s_BKTS)
  kk = s_BKTS.shape[1]
  blocks_BKTC = _pad_axis(s_BKTS, block_size, -1, -jnp.inf).reshape(
      b, kk, 1, -1, block_size).max(axis=-1)
  return blocks_BKTC[:, :, 0]


class BlockSummaries(NamedTuple):
  """Per-block key summaries kept beside a KV cache (block c = slots [c*bs, (c+1)*bs)).

  mean_BCKH: float32 mean key of the block (MoBA). min_BCKH / max_BCKH: per-channel bounds
  (Quest) in the keys' dtype (exact). A block is summarized over its filled slots; only
  complete blocks are ever scored, so a partial block's values are provisional.
  """
  mean_BCKH: jax.Array
  min_BCKH: jax.Array
  max_BCKH: jax.Array


def _summarize(k_BCLKH, valid_BCL):
  """Summaries of blocks [B, C, L, K, H] whose slots `valid_BCL` are filled."""
  v = valid_BCL[..., None, None]
  mean = jnp.where(v, k_BCLKH.astype(jnp.float32), 0.0).mean(axis=2)
  big = jnp.asarray(jnp.inf, k_BCLKH.dtype)
  kmin = jnp.where(v, k_BCLKH, big).min(axis=2)
  kmax = jnp.where(v, k_BCLKH, -big).max(axis=2)
  return mean, kmin, kmax


def block_summaries(k_BSKH, lengths_B, *, block_size):
  """Summaries of every block of the cache (a prefill builds them once). C = ceil(S / bs)."""
  b, s, kh, h = k_BSKH.shape
  k_BCLKH = _pad_axis(k_BSKH, block_size, 1, 0).reshape(b, -1, block_size, kh, h)
  pos_CL = jnp.arange(k_BCLKH.shape[1] * block_size).reshape(-1, block_size)
  return BlockSummaries(*_summarize(k_BCLKH, pos_CL[None] < lengths_B[:, None, None]))


def update_block_summaries(summaries, k_BSKH, lengths_B, *, block_size):
  """Re-summarizes each row's newest block (the one holding position lengths[b] - 1) from the
  cache: one block read per row and step, so a block is exact from the step it fills on."""
  b, s, kh, h = k_BSKH.shape
  if s % block_size:
    k_BSKH = _pad_axis(k_BSKH, block_size, 1, 0)
  c_B = (jnp.maximum(lengths_B, 1) - 1) // block_size

  def one_row(k_SKH, c, length):
    blk_LKH = jax.lax.dynamic_slice_in_dim(k_SKH, c * block_size, block_size, axis=0)
    valid_L = c * block_size + jnp.arange(block_size) < length
    return _summarize(blk_LKH[None, None], valid_L[None, None])

  new = jax.vmap(one_row)(k_BSKH, c_B, lengths_B)
  rows = jnp.arange(b)
  return BlockSummaries(*(old.at[rows, c_B].set(n[:, 0, 0].astype(old.dtype))
                          for old, n in zip(summaries, new)))


def _past_blocks_BC(lengths_B, num_blocks, block_size):
  """Complete blocks before the query's own block (the only ones summaries score)."""
  return jnp.arange(num_blocks)[None, :] < ((lengths_B - 1) // block_size)[:, None]


def moba_block_scores_reference(q_BNH, mean_BCKH, lengths_B, *, block_size):
  """MoBA scores [B, K, C] f32: group-mean query . block mean key, -inf off complete past blocks
  (as `moba.moba_block_mask` at T = 1)."""
  b, n, h = q_BNH.shape
  c, kh = mean_BCKH.shape[1], mean_BCKH.shape[2]
  qg_BKH = q_BNH.astype(jnp.float32).reshape(b, kh, n // kh, h).mean(axis=2)
  scores_BKC = jnp.einsum("BKH,BCKH->BKC", qg_BKH, mean_BCKH.astype(jnp.float32))
  return jnp.where(_past_blocks_BC(lengths_B, c, block_size)[:, None], scores_BKC, -jnp.inf)


def quest_block_scores_reference(q_BNH, min_BCKH, max_BCKH, lengths_B, *, block_size):
  """Quest scores [B, K, C] f32: max over the group's heads of the upper bound
  sum_h max(q_h * min_h, q_h * max_h) on q . k over the block's keys; -inf off complete past
  blocks."""
  b, n, h = q_BNH.shape
  c, kh = min_BCKH.shape[1], min_BCKH.shape[2]
  q_BKGH = q_BNH.astype(jnp.float32).reshape(b, kh, n // kh, h)
  qpos, qneg = jnp.maximum(q_BKGH, 0.0), jnp.minimum(q_BKGH, 0.0)
  bound_BKGC = (jnp.einsum("BKGH,BCKH->BKGC", qpos, max_BCKH.astype(jnp.float32))
                + jnp.einsum("BKGH,BCKH->BKGC", qneg, min_BCKH.astype(jnp.float32)))
  scores_BKC = bound_BKGC.max(axis=2)
  return jnp.where(_past_blocks_BC(lengths_B, c, block_size)[:, None], scores_BKC, -jnp.inf)


def msa_summary_block_scores_reference(index_q_BKI, summaries, lengths_B, *, kind, block_size):
  """Approximate MSA block scores [B, K, C] f32 per index group from summaries of the shared
  index keys (`BlockSummaries` with one kv head: [B, C, 1, I]): kind 'mean' q_k . mean key,
  'minmax' Quest's bound sum_i max(q_ki * min_i, q_ki * max_i) >= the block's exact max score;
  -inf off complete past blocks. One einsum against the [C, I] summaries for all K groups."""
  c = (summaries.mean_BCKH if kind == "mean" else summaries.min_BCKH).shape[1]
  q_BKI = index_q_BKI.astype(jnp.float32)
  if kind == "mean":
    mean_BCI = summaries.mean_BCKH[:, :, 0].astype(jnp.float32)
    scores_BKC = jnp.einsum("BKI,BCI->BKC", q_BKI, mean_BCI)
  else:
    min_BCI = summaries.min_BCKH[:, :, 0].astype(jnp.float32)
    max_BCI = summaries.max_BCKH[:, :, 0].astype(jnp.float32)
    scores_BKC = (jnp.einsum("BKI,BCI->BKC", jnp.maximum(q_BKI, 0.0), max_BCI)
                  + jnp.einsum("BKI,BCI->BKC", jnp.minimum(q_BKI, 0.0), min_BCI))
  return jnp.where(_past_blocks_BC(lengths_B, c, block_size)[:, None], scores_BKC, -jnp.inf)

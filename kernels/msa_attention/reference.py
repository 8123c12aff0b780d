"""Pure-jnp MSA pieces: the 'xla' implementation and the reference the kernels are tested against.

Conventions (shared by every module of this package): queries are the last T of S positions, so
query i sits at position i + S - T and key slot j at position j (training and a prefill that fills
its cache: T == S). Key block c holds key slots [c * block_size, (c + 1) * block_size).

Nothing here builds a [T, S] tensor: every function maps over chunks of `chunk` queries
(lax.map), so memory is O(chunk x S) for the block scores and O(chunk x top_k x block_size) for
attention and the KL loss. Shapes: q [B, T, N, H], k/v [B, S, K, H], index q [B, T, K, I],
index k [B, S, I], block scores [B, K, T, C], index lists [B, K, T, k] int32 (-1 = empty slot).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..block_sparse_attention import selection

# Finite stand-in for -inf: keeps rows with nothing visible free of inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _pad_axis(x, multiple, axis, value=0):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _map_query_chunks(fn, chunk, t, *xs_time_axis):
  """fn(start, *chunks) over query chunks; xs given as (array, time axis). Returns stacked outputs
  [num_chunks, ...] (the caller moves/trims them)."""
  chunk = min(chunk, t)
  padded = [(_pad_axis(x, chunk, ax), ax) for x, ax in xs_time_axis]
  n = -(-t // chunk)
  split = [jnp.moveaxis(x.reshape(x.shape[:ax] + (n, chunk) + x.shape[ax + 1:]), ax, 0)
           for x, ax in padded]
  return jax.lax.map(lambda a: fn(a[0] * chunk, *a[1:]), (jnp.arange(n),) + tuple(split)), chunk


def _unchunk(y, axis, t):
  """[n, ..., chunk, ...] (chunk at `axis` of the per-chunk result) -> [..., n*chunk, ...][:t]."""
  y = jnp.moveaxis(y, 0, axis)
  y = y.reshape(y.shape[:axis] + (-1,) + y.shape[axis + 2:])
  return jax.lax.slice_in_dim(y, 0, t, axis=axis)


def block_scores_reference(q_idx_BTKI, k_idx_BSI, *, block_size: int, chunk: int = 256,
                           q_offset=None):
  """Block max of the index scores q_idx . k_idx over each block's keys at positions <= the query.

  Query i sits at position i + q_offset (default S - T; a traced scalar is fine). Returns float32
  [B, K, T, C], C = ceil(S / block_size); -inf for blocks wholly in the future.
  """
  b, t, kh, _ = q_idx_BTKI.shape
  s = k_idx_BSI.shape[1]
  q_offset = s - t if q_offset is None else q_offset
  c = -(-s // block_size)
  k_f32 = k_idx_BSI.astype(jnp.float32)
  k_pos = jnp.arange(c * block_size)

  def one(start, q_BtKI):
    s_BKtS = jnp.einsum("BTKI,BSI->BKTS", q_BtKI.astype(jnp.float32), k_f32)
    s_BKtS = _pad_axis(s_BKtS, block_size, axis=-1, value=-jnp.inf)
    q_pos = start + jnp.arange(q_BtKI.shape[1]) + q_offset
    s_BKtS = jnp.where(k_pos[None, :] <= q_pos[:, None], s_BKtS, -jnp.inf)
    return s_BKtS.reshape(b, kh, -1, c, block_size).max(axis=-1)

  y, _ = _map_query_chunks(one, chunk, t, (q_idx_BTKI, 1))
  return _unchunk(y, 2, t)


def select_blocks(scores_BKTC, *, block_size: int, top_k: int, local_blocks: int = 1,
                  num_keys: int | None = None, q_offset=None):
  """Top-k key blocks per query row, by the shared rule (`block_sparse_attention.selection`).

  The `local_blocks` blocks ending at the query's own block are forced; blocks whose score is
  -inf are never selected. Query i sits at position i + q_offset, by default i + num_keys - T
  (num_keys defaults to C * block_size: pass S when S is not a multiple of block_size; q_offset
  may be traced). Returns int32 [B, K, T, k], k = min(top_k, C), -1 for unused slots.
  """
  t, c = scores_BKTC.shape[-2:]
  s = c * block_size if num_keys is None else num_keys
  q_offset = s - t if q_offset is None else q_offset
  row_block_T = (jnp.arange(t) + q_offset) // block_size
  _, indices = selection.select_blocks(scores_BKTC, row_block_T, top_k=top_k,
                                       local_blocks=local_blocks)
  return indices


def _gather_blocks(x_BKCbX, indices_BKtk):
  """Blocks [B, K, C, bs, X] picked by indices [B, K, t, k] (-1 read as block 0) -> [B, K, t, k, bs, X]."""
  b, kh, tq, k = indices_BKtk.shape
  flat = jnp.maximum(indices_BKtk, 0).reshape(b, kh, tq * k)
  g = jnp.take_along_axis(x_BKCbX, flat[:, :, :, None, None], axis=2)
  return g.reshape(b, kh, tq, k, *x_BKCbX.shape[3:])


def _key_blocks(x_BSKX, block_size):
  """[B, S, K, X] -> [B, K, C, bs, X] (S zero-padded to whole blocks)."""
  x = _pad_axis(x_BSKX, block_size, axis=1)
  b, sp, kh, xd = x.shape
  return jnp.moveaxis(x, 2, 1).reshape(b, kh, sp // block_size, block_size, xd)


def _selected_mask(indices_BKtk, start, q_offset, s, block_size):
  """bool [B, K, t, k, bs]: real slot, key inside S, key position <= query position."""
  tq = indices_BKtk.shape[2]
  k_pos = indices_BKtk[..., None] * block_size + jnp.arange(block_size)
  q_pos = (start + jnp.arange(tq) + q_offset)[:, None, None]
  return (indices_BKtk[..., None] >= 0) & (k_pos < s) & (k_pos <= q_pos)


def sparse_attention_reference(q_BTNH, k_BSKH, v_BSKH, indices_BKTk, *, block_size: int,
                               sm_scale: float, chunk: int = 64, return_lse: bool = False,
                               q_offset=None):
  """Causal GQA softmax attention of each query over the keys of its selected blocks.

  indices [B, K, T, k] int32 (-1 = empty, no repeats): the blocks query t of kv group K may read.
  Query i sits at position i + q_offset (default S - T; traced is fine). Each chunk is
  rematerialized in the backward pass, so memory stays O(chunk x k x block_size).
  Logits and softmax in float32; rows with nothing visible give zeros. Returns y [B, T, N, H] in
  q's dtype (and the natural log-sum-exp [B, N, T] f32 if return_lse). Differentiable in q, k, v.
  """
  b, t, n, h = q_BTNH.shape
  s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
  g = n // kh
  q_offset = s - t if q_offset is None else q_offset
  k_blocks, v_blocks = _key_blocks(k_BSKH, block_size), _key_blocks(v_BSKH, block_size)

  @jax.checkpoint
  def one(start, q_BtNH, idx_BKtk):
    tq = q_BtNH.shape[1]
    k_ = _gather_blocks(k_blocks, idx_BKtk).reshape(b, kh, tq, -1, h)    # [B, K, t, k*bs, H]
    v_ = _gather_blocks(v_blocks, idx_BKtk).reshape(b, kh, tq, -1, h)
    mask = _selected_mask(idx_BKtk, start, q_offset, s, block_size).reshape(b, kh, 1, tq, -1)
    q_BKGtH = jnp.moveaxis(q_BtNH.reshape(b, tq, kh, g, h), 1, 3).astype(jnp.float32)
    z = jnp.einsum("BKGTH,BKTSH->BKGTS", q_BKGtH, k_.astype(jnp.float32)) * sm_scale
    z = jnp.where(mask, z, MASK_VALUE)
    m = jax.lax.stop_gradient(z.max(axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(z - m), 0.0)
    l = p.sum(axis=-1, keepdims=True)
    o = jnp.einsum("BKGTS,BKTSH->BKGTH", p / jnp.where(l == 0, 1.0, l), v_.astype(jnp.float32))
    lse = jnp.where(l[..., 0] == 0, jnp.inf, m[..., 0] + jnp.log(jnp.where(l[..., 0] == 0, 1.0, l[..., 0])))
    return jnp.moveaxis(o, 3, 1).reshape(b, tq, n, h).astype(q_BTNH.dtype), lse.reshape(b, n, tq)

  (y, lse), _ = _map_query_chunks(one, chunk, t, (q_BTNH, 1), (indices_BKTk, 2))
  y, lse = _unchunk(y, 1, t), _unchunk(lse, 2, t)
  return (y, lse) if return_lse else y


def indexer_kl_reference(q_BTNH, k_BSKH, q_idx_BTKI, k_idx_BSI, indices_BKTk, *, block_size: int,
                         scale: float, index_scale: float, chunk: int = 64):
  """Mean over (B, K, T) of KL(group-mean main attention || indexer softmax) over the selected tokens.

  Same value as `mixtral_jax.model.attention.msa.indexer_kl` on the token mask of `indices`. The
  main branch (q, k) is stop-gradient: the loss differentiates only into q_idx and k_idx. Each
  chunk is rematerialized in the backward pass (no [T, k x block_size] residuals).
  Returns a float32 scalar.
  """
  b, t, n, h = q_BTNH.shape
  s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
  g = n // kh
  q_BTNH, k_BSKH = jax.lax.stop_gradient(q_BTNH), jax.lax.stop_gradient(k_BSKH)
  k_blocks = _key_blocks(k_BSKH, block_size)
  ik_blocks = _key_blocks(k_idx_BSI[:, :, None].astype(jnp.float32), block_size)  # [B, 1, C, bs, I]

  @jax.checkpoint
  def one(start, q_BtNH, iq_BtKI, idx_BKtk):
    tq = q_BtNH.shape[1]
    mask = _selected_mask(idx_BKtk, start, s - t, s, block_size).reshape(b, kh, tq, -1)
    k_ = _gather_blocks(k_blocks, idx_BKtk).reshape(b, kh, tq, -1, h)
    ik = _gather_blocks(jnp.broadcast_to(ik_blocks, (b, kh) + ik_blocks.shape[2:]),
                        idx_BKtk).reshape(b, kh, tq, -1, ik_blocks.shape[-1])
    q_BKGtH = jnp.moveaxis(q_BtNH.reshape(b, tq, kh, g, h), 1, 3)
    z = jnp.einsum("BKGTH,BKTSH->BKGTS", q_BKGtH, k_.astype(q_BTNH.dtype),
                   preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(mask[:, :, None], z, -jnp.inf), axis=-1).mean(axis=2)
    zi = jnp.einsum("BTKI,BKTSI->BKTS", iq_BtKI.astype(jnp.float32), ik) * index_scale
    log_q = jax.nn.log_softmax(jnp.where(mask, zi, -jnp.inf), axis=-1)
    real = (start + jnp.arange(tq) < t)[:, None]
    keep = mask & (p > 0) & real
    return jnp.where(keep, p * (jnp.log(jnp.where(keep, p, 1.0)) - jnp.where(keep, log_q, 0.0)),
                     0.0).sum()

  total, _ = _map_query_chunks(one, chunk, t, (q_BTNH, 1), (q_idx_BTKI, 1), (indices_BKTk, 2))
  return total.sum() / (b * kh * t)

"""Tile-mask builders: which (query tile, kv tile) pairs the kernels compute. Every builder is jnp,
so it works under jit. The selection primitives they share with the model (top-k with -1 for empty
slots, index lists <-> masks) live in `selection.py`.

Tile masks are bool [nq, nk] (static patterns; broadcast to [B, K, nq, nk] with `broadcast_mask`) or
bool [B, K, nq, nk] (data-dependent selections). Queries are the last T of S positions: query tile i
covers positions [i*block_q + S - T, (i+1)*block_q + S - T).
"""
import jax
import jax.numpy as jnp

from .selection import block_mask_from_indices, topk_indices


def _tile_positions(t, s, block_q, block_kv):
  """First/last query position of each q tile [nq] and first/last key position of each kv tile [nk]."""
  q_lo = jnp.arange(t // block_q) * block_q + (s - t)
  k_lo = jnp.arange(s // block_kv) * block_kv
  return q_lo, q_lo + block_q - 1, k_lo, k_lo + block_kv - 1


def broadcast_mask(mask_QK, batch, num_kv_heads):
  """[nq, nk] -> [B, K, nq, nk]."""
  return jnp.broadcast_to(mask_QK, (batch, num_kv_heads) + mask_QK.shape)


def causal_block_mask(t, s, *, block_q, block_kv):
  """Tiles holding at least one (query, key) pair with key <= query. bool [nq, nk]."""
  _, q_hi, k_lo, _ = _tile_positions(t, s, block_q, block_kv)
  return k_lo[None, :] <= q_hi[:, None]


def sliding_window_block_mask(t, s, *, block_q, block_kv, window):
  """Causal tiles that meet the window query - window < key <= query. bool [nq, nk].

  Tile granularity: partial tiles at the window's far edge are kept whole, so the kernel's
  token-level causal masking is exact only for the near edge.
  """
  q_lo, q_hi, k_lo, k_hi = _tile_positions(t, s, block_q, block_kv)
  return (k_lo[None, :] <= q_hi[:, None]) & (k_hi[None, :] > q_lo[:, None] - window)


def chunked_block_mask(t, s, *, block_q, block_kv, chunk):
  """Tiles whose query and key lie in the same chunk of `chunk` positions (chunk a multiple of both
  block sizes makes this exact). bool [nq, nk]."""
  if chunk % block_q or chunk % block_kv:
    raise ValueError(f"chunk={chunk} must be a multiple of block_q={block_q} and block_kv={block_kv}")
  q_lo, _, k_lo, _ = _tile_positions(t, s, block_q, block_kv)
  return (q_lo[:, None] // chunk) == (k_lo[None, :] // chunk)


def topk_block_mask(scores_BKQC, top_k, *, t, s, block_q, block_kv, causal=True, keep_diagonal=True):
  """Top-k kv tiles per q tile from tile scores [B, K, nq, nk] -> bool [B, K, nq, nk].

  With `causal`, tiles wholly in the future are never chosen; with `keep_diagonal`, the tile holding
  each q tile's last position (its own block) is always chosen, on top of the top-k.
  """
  nk = scores_BKQC.shape[-1]
  scores = scores_BKQC.astype(jnp.float32)
  if causal:
    allowed_QC = causal_block_mask(t, s, block_q=block_q, block_kv=block_kv)
    scores = jnp.where(allowed_QC, scores, -jnp.inf)
  mask = block_mask_from_indices(topk_indices(scores, top_k), nk)
  if keep_diagonal:
    _, q_hi, _, _ = _tile_positions(t, s, block_q, block_kv)
    diag_QC = jax.nn.one_hot(q_hi // block_kv, nk, dtype=jnp.bool_)
    mask = mask | diag_QC
  return mask


def moba_block_mask(q, k, *, block_q, block_kv, top_k, causal=True):
  """MoBA gating at q-tile granularity: score kv tiles by <mean q of the tile, mean k of the tile>,
  summed over the query heads of each kv head; keep the top-k causal tiles and the own tile.

  q [B, T, N, H], k [B, S, K, H] -> bool [B, K, T//block_q, S//block_kv].
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  q_BQKGH = q.astype(jnp.float32).reshape(b, t // block_q, block_q, kh, n // kh, h).mean(axis=2)
  k_BCKH = k.astype(jnp.float32).reshape(b, s // block_kv, block_kv, kh, h).mean(axis=2)
  scores_BKQC = jnp.einsum('BQKGH,BCKH->BKQC', q_BQKGH, k_BCKH)
  return topk_block_mask(scores_BKQC, top_k, t=t, s=s, block_q=block_q, block_kv=block_kv,
                         causal=causal)


def msa_block_mask(indices_BKQk, num_kv_blocks):
  """Tile mask from per-q-tile selected kv-tile indices [B, K, nq, k] (int; negative = no selection),
  as an MSA/NSA indexer produces them -> bool [B, K, nq, num_kv_blocks]
  (`selection.block_mask_from_indices` at tile granularity)."""
  return block_mask_from_indices(indices_BKQk, num_kv_blocks)

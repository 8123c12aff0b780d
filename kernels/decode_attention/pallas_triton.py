"""Triton-backend (GPU) decode kernels: split-K attention over cache tiles or selected blocks,
MSA index block scores, and block-summary scores.

Decode is bandwidth-bound: every kernel streams its keys once and does little math per byte.
- `attend`: grid (B, K, P). Program p of (row b, kv head k) owns either a contiguous run of
  cache tiles (dense: flash-decoding split-K) or a run of listed blocks (sparse); the G query
  heads of the kv group sit in one [Gp, H] tile (Gp >= 16 rows for tl.dot), so each K/V tile is
  loaded once for all of them. Partial (o, m, l) per program are merged by `combine`.
- `index_block_scores`: grid (B, C / nb): the K index queries [Kp, I] against nb blocks of
  index keys, max over each block's visible keys.
- `summary_block_scores`: grid (B, K, C / nc): group query(ies) against nc block summaries.
Loops run only over tiles below the row's length (dynamic trip counts), so short rows read
less. Logits are base 2 (scaled by log2 e) for exp2; the partial maxima are base 2 too.
"""
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from .reference import MASK_VALUE, cdiv

LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
MIN_ROWS = 16  # tl.dot needs M >= 16


def _dot(a, b, dims=_NN):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _pow2(x):
  return x > 0 and x & (x - 1) == 0


def check(*, head_dim, tiles, interpret):
  """ValueError where a compiled kernel cannot run these sizes (interpret mode takes any)."""
  if interpret:
    return
  if not (_pow2(head_dim) and head_dim >= 16):
    raise ValueError(f"pallas_triton: head/index dim {head_dim} must be a power of two >= 16")
  for name, t in tiles.items():
    if not (_pow2(t) and t >= 16):
      raise ValueError(f"pallas_triton: {name}={t} must be a power of two >= 16")


def _attend_kernel(len_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
                   num_kv_heads, num_list, per_program, block, sm_scale, sparse):
  b, kh, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = len_ref[b]
  q = q_ref[...]
  row = b * num_kv_heads + kh
  if sparse:  # a -1 slot loads block 0 and hides all of it (no reorder or count needed)
    n = per_program
    first = p * per_program
  else:
    first = p * per_program * block
    n = jnp.clip(cdiv(length - first, block), 0, per_program)

  def body(i, carry):
    acc, m_prev, l_prev = carry
    if sparse:
      blk = idx_ref[row * num_list + first + i]
      start, limit = jnp.maximum(blk, 0) * block, jnp.where(blk >= 0, length, 0)
    else:
      start, limit = first + i * block, length
    k = k_ref[pl.ds(start, block), :]
    v = v_ref[pl.ds(start, block), :]
    s = _dot(q, k, _NT) * (sm_scale * LOG2E)
    pos = start + jnp.arange(block)
    s = jnp.where(pos[None, :] < limit, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    pr = jnp.exp2(s - m_next[:, None])
    l_next = alpha * l_prev + jnp.sum(pr, axis=1)
    acc = acc * alpha[:, None] + _dot(pr.astype(v.dtype), v)
    return acc, m_next, l_next

  rows, h = q.shape
  init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, n, body, init)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def attend(q_BKGH, k_BSKH, v_BSKH, lengths_B, indices_BKJ, *, block, num_programs,
           per_program, sm_scale, num_warps, num_stages, interpret=False):
  """Partial decode attention. q [B, K, Gp, H] (Gp a power of two >= 16, zero rows allowed).

  Dense (indices None): program p covers cache tiles [p * per_program, (p + 1) * per_program)
  of `block` slots. Sparse: it covers list entries [p * per_program, ...) of indices_BKJ
  (block ids, -1 = none; J a multiple of per_program). Returns base-2 partials
  (o [B, K, P, Gp, H] f32 unnormalized, m [B, K, P, Gp], l [B, K, P, Gp]).
  """
  b, kh, gp, h = q_BKGH.shape
  s = k_BSKH.shape[1]
  sparse = indices_BKJ is not None
  if not sparse:
    indices_BKJ = jnp.zeros((b, kh, 1), jnp.int32)
  kernel = functools.partial(
      _attend_kernel, num_kv_heads=kh, num_list=indices_BKJ.shape[-1], per_program=per_program,
      block=block, sm_scale=sm_scale, sparse=sparse)
  q_spec = pl.BlockSpec((None, None, gp, h), lambda b_, k_, p_: (b_, k_, 0, 0))
  kv_spec = pl.BlockSpec((None, s, None, h), lambda b_, k_, p_: (b_, 0, k_, 0))
  o_spec = pl.BlockSpec((None, None, None, gp, h), lambda b_, k_, p_: (b_, k_, p_, 0, 0))
  ml_spec = pl.BlockSpec((None, None, None, gp), lambda b_, k_, p_: (b_, k_, p_, 0))
  whole = pl.BlockSpec()
  return pl.pallas_call(
      kernel,
      grid=(b, kh, num_programs),
      in_specs=[whole, whole, q_spec, kv_spec, kv_spec],
      out_specs=[o_spec, ml_spec, ml_spec],
      out_shape=[jax.ShapeDtypeStruct((b, kh, num_programs, gp, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, num_programs, gp), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, num_programs, gp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="sparse_decode_triton" if sparse else "dense_decode_triton",
  )(lengths_B, indices_BKJ.reshape(-1), q_BKGH, k_BSKH, v_BSKH)


def combine(o_BKPGH, m_BKPG, l_BKPG):
  """Merges base-2 split partials -> [B, K, G, H] f32 (rows that saw no key give zeros)."""
  m_BKG = jnp.max(m_BKPG, axis=2)
  w_BKPG = jnp.exp2(m_BKPG - m_BKG[:, :, None])
  l_BKG = jnp.sum(w_BKPG * l_BKPG, axis=2)
  o_BKGH = jnp.sum(w_BKPG[..., None] * o_BKPGH, axis=2)
  return o_BKGH / jnp.where(l_BKG == 0.0, 1.0, l_BKG)[..., None]


def _forced(blocks, length, block, local_blocks):
  """bool: blocks among the `local_blocks` ending at the new token's block (clipped at 0)."""
  q_block = (length - 1) // block
  return (blocks <= q_block) & (blocks > q_block - local_blocks)


def _index_kernel(len_ref, q_ref, k_ref, o_ref, *, block, nb, local_blocks):
  b, t = pl.program_id(0), pl.program_id(1)
  length = len_ref[b]
  q = q_ref[...]
  first = t * nb * block
  n = jnp.clip(cdiv(length - first, block), 0, nb)

  def body(c, acc):
    start = first + c * block
    k = k_ref[pl.ds(start, block), :]
    s = _dot(q, k, _NT)                                        # [Kp, block]
    pos = start + jnp.arange(block)
    s = jnp.where(pos[None, :] < length, s, -jnp.inf)
    return jnp.where(jnp.arange(nb)[None, :] == c, jnp.max(s, axis=1)[:, None], acc)

  acc = lax.fori_loop(0, n, body, jnp.full((q.shape[0], nb), -jnp.inf, jnp.float32))
  if local_blocks:  # the selection's forced blocks, so top-k needs no pass of its own
    acc = jnp.where(_forced(t * nb + jnp.arange(nb), length, block, local_blocks)[None, :],
                    jnp.inf, acc)
  o_ref[...] = acc


def index_block_scores(index_q_BKI, index_k_BSI, lengths_B, *, block, nb, num_warps, num_stages,
                       local_blocks=0, interpret=False):
  """MSA block scores [B, Kp, C] f32 (C = S / block; nb must divide C). index_q [B, Kp, I]
  (Kp >= 16 rows, extra rows zero) in index_k's dtype. local_blocks > 0: those blocks ending
  at the new token's block score +inf (as `select_top_blocks` forces them)."""
  b, kp, i = index_q_BKI.shape
  s = index_k_BSI.shape[1]
  c = s // block
  return pl.pallas_call(
      functools.partial(_index_kernel, block=block, nb=nb, local_blocks=local_blocks),
      grid=(b, c // nb),
      in_specs=[pl.BlockSpec(), pl.BlockSpec((None, kp, i), lambda b_, t: (b_, 0, 0)),
                pl.BlockSpec((None, s, i), lambda b_, t: (b_, 0, 0))],
      out_specs=pl.BlockSpec((None, kp, nb), lambda b_, t: (b_, 0, t)),
      out_shape=jax.ShapeDtypeStruct((b, kp, c), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="msa_index_block_scores_triton",
  )(lengths_B, index_q_BKI, index_k_BSI)


def _summary_kernel(len_ref, q_ref, *refs, block, nc, groups, kind, force_own):
  """Scores of nc summaries by broadcast multiply and a lane sum in f32 (an f32 tl.dot keeps
  its whole operand tiles in registers and spills; this reads each summary once)."""
  o_ref = refs[-1]
  b, t = pl.program_id(0), pl.program_id(2)
  length = len_ref[b]
  n_past = (length - 1) // block                               # complete past blocks
  first = t * nc

  def body(_, s):
    if kind == "mean":  # row 0: the group-mean query
      kmean = refs[0][pl.ds(first, nc), :].astype(jnp.float32)
      return jnp.sum(kmean * q_ref[pl.ds(0, 1), :], axis=1)
    kmin = refs[0][pl.ds(first, nc), :].astype(jnp.float32)
    kmax = refs[1][pl.ds(first, nc), :].astype(jnp.float32)
    for g in range(groups):
      qg = q_ref[pl.ds(g, 1), :]                              # [1, H] f32
      s = jnp.maximum(s, jnp.sum(jnp.maximum(qg, 0.0) * kmax + jnp.minimum(qg, 0.0) * kmin,
                                 axis=1))
    return s

  init = jnp.full((nc,), 0.0 if kind == "mean" else -jnp.inf, jnp.float32)
  score = lax.fori_loop(0, (first < n_past).astype(jnp.int32), body, init)
  blocks = first + jnp.arange(nc)
  score = jnp.where(blocks < n_past, score, -jnp.inf)
  if force_own:
    score = jnp.where(blocks == n_past, jnp.inf, score)
  o_ref[...] = score


def summary_block_scores(q_BKRH, summaries_BCKH, lengths_B, *, kind, groups, block, nc, num_warps,
                         num_stages, force_own=False, interpret=False):
  """Block scores [B, K, C] f32 from summaries [B, C, K, H] (one array for kind 'mean', (min,
  max) for 'minmax'). q [B, K, R, H] f32 (R a power of two): 'mean': row 0 the group-mean
  query; 'minmax': the G query heads in rows 0..G-1. nc must divide C. force_own: the new
  token's own block scores +inf (MoBA always keeps it)."""
  b, kh, r, h = q_BKRH.shape
  c = summaries_BCKH[0].shape[1]
  sum_spec = pl.BlockSpec((None, c, None, h), lambda b_, k_, t: (b_, 0, k_, 0))
  return pl.pallas_call(
      functools.partial(_summary_kernel, block=block, nc=nc, groups=groups, kind=kind,
                        force_own=force_own),
      grid=(b, kh, c // nc),
      in_specs=[pl.BlockSpec(), pl.BlockSpec((None, None, r, h), lambda b_, k_, t: (b_, k_, 0, 0))]
      + [sum_spec] * len(summaries_BCKH),
      out_specs=pl.BlockSpec((None, None, nc), lambda b_, k_, t: (b_, k_, t)),
      out_shape=jax.ShapeDtypeStruct((b, kh, c), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"summary_block_scores_{kind}_triton",
  )(lengths_B, q_BKRH, *summaries_BCKH)

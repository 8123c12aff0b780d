"""Mosaic TPU decode kernels: attention over cache tiles or selected blocks, MSA index block
scores, block-summary scores.

Keys are read as [B, S, K*H] (a free reshape of [B, S, K, H]) so a kv head's tile is a
(tokens, H) block with H on lanes; the G query heads of the group share it. The tile axis of
the grid is sequential ("arbitrary") with the online softmax in VMEM scratch; steps past a
row's last tile re-address that tile (no new DMA) and skip compute. Row lengths, block lists
and counts are scalar-prefetched into SMEM. On real TPUs H and the index dim must be multiples
of 128 and tiles multiples of 8 tokens (block sizes of 128 for selection); interpret mode
(CPU) takes any sizes.
"""
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from .reference import MASK_VALUE, cdiv

NUM_LANES = 128
_NT = (((1,), (1,)), ((), ()))


def _dot(a, b, dims=_NT):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def check(*, head_dim, num_kv_heads, interpret):
  if interpret:
    return
  if head_dim % NUM_LANES and num_kv_heads > 1:
    raise ValueError(f"pallas_tpu: head/index dim {head_dim} must be a multiple of {NUM_LANES}")


def _attend_kernel(len_ref, idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
                   block, sm_scale, num_kv_heads, sparse):
  b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = len_ref[b]
  row = b * num_kv_heads + kh
  if sparse:
    n = cnt_ref[row]
    start = idx_ref[row * pl.num_programs(2) + jnp.minimum(j, jnp.maximum(n - 1, 0))] * block
  else:
    n = cdiv(length, block)
    start = j * block

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j < n)
  def _step():
    v = v_ref[...]
    s = _dot(q_ref[...], k_ref[...]) * sm_scale                    # [G, block]
    pos = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(pos < length, s, -jnp.inf)
    m_prev = m_sc[...]                                             # [G, 128], lanes equal
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, :1])
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_next
    acc_sc[...] = acc_sc[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v, (((1,), (0,)), ((), ())))

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    l = l_sc[...]
    inv_l = jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))
    o_ref[...] = (acc_sc[...] * inv_l[:, :1]).astype(o_ref.dtype)


def attend(q_BKGH, k_BSKH, v_BSKH, lengths_B, indices_BKJ, counts_BK, *, block, sm_scale,
           interpret=False):
  """Decode attention [B, K, G, H] in q's dtype over the cache (indices None: every tile of
  `block` slots below the row's length) or over listed blocks (indices_BKJ, valid first,
  counts_BK of them)."""
  b, kh, g, h = q_BKGH.shape
  s = k_BSKH.shape[1]
  sparse = indices_BKJ is not None
  steps = indices_BKJ.shape[-1] if sparse else s // block
  if not sparse:
    indices_BKJ = jnp.zeros((b, kh, 1), jnp.int32)
    counts_BK = jnp.zeros((b, kh), jnp.int32)

  def kv_map(b_, k_, j, lens, idx, cnt):
    if sparse:
      n = cnt[b_ * kh + k_]
      tile = idx[(b_ * kh + k_) * steps + jnp.minimum(j, jnp.maximum(n - 1, 0))]
    else:
      tile = jnp.minimum(j, jnp.maximum(cdiv(lens[b_], block) - 1, 0))
    return b_, jnp.maximum(tile, 0), k_

  q_spec = pl.BlockSpec((None, None, g, h), lambda b_, k_, j, *_: (b_, k_, 0, 0))
  kv_spec = pl.BlockSpec((None, block, h), kv_map)
  kernel = functools.partial(_attend_kernel, block=block, sm_scale=sm_scale, num_kv_heads=kh,
                             sparse=sparse)
  kv = lambda x: x.reshape(b, s, kh * h)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, kh, steps),
          in_specs=[q_spec, kv_spec, kv_spec], out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((g, NUM_LANES), jnp.float32),
                          pltpu.VMEM((g, NUM_LANES), jnp.float32),
                          pltpu.VMEM((g, h), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q_BKGH.shape, q_BKGH.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="sparse_decode_tpu" if sparse else "dense_decode_tpu",
  )(lengths_B, indices_BKJ.reshape(-1), counts_BK.reshape(-1), q_BKGH, kv(k_BSKH), kv(v_BSKH))


def _index_kernel(len_ref, q_ref, k_ref, o_ref, *, block, nb):
  b, t = pl.program_id(0), pl.program_id(1)
  length = len_ref[b]
  first = t * nb * block

  @pl.when(first < length)
  def _score():
    s = _dot(k_ref[...], q_ref[...])                               # [nb * block, K]
    pos = first + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    s = jnp.where(pos < length, s, -jnp.inf)
    o_ref[...] = jnp.max(s.reshape(nb, block, s.shape[-1]), axis=1)

  @pl.when(first >= length)
  def _empty():
    o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


def index_block_scores(index_q_BKI, index_k_BSI, lengths_B, *, block, nb, interpret=False):
  """MSA block scores [B, C, K] f32 (C = S / block, nb divides C) from index queries [B, K, I]
  in index_k's dtype."""
  b, kh, i = index_q_BKI.shape
  s = index_k_BSI.shape[1]
  c = s // block

  def k_map(b_, t, lens):
    return b_, jnp.minimum(t, jnp.maximum(cdiv(lens[b_], nb * block) - 1, 0)), 0

  return pl.pallas_call(
      functools.partial(_index_kernel, block=block, nb=nb),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, c // nb),
          in_specs=[pl.BlockSpec((None, kh, i), lambda b_, t, lens: (b_, 0, 0)),
                    pl.BlockSpec((None, nb * block, i), k_map)],
          out_specs=pl.BlockSpec((None, nb, kh), lambda b_, t, lens: (b_, t, 0))),
      out_shape=jax.ShapeDtypeStruct((b, c, kh), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
      name="msa_index_block_scores_tpu",
  )(lengths_B, index_q_BKI, index_k_BSI)


def _summary_kernel(len_ref, q_ref, *refs, block, nc, kind):
  o_ref = refs[-1]
  b, t = pl.program_id(0), pl.program_id(2)
  n_past = (len_ref[b] - 1) // block
  first = t * nc

  @pl.when(first < n_past)
  def _score():
    q = q_ref[...]
    if kind == "mean":
      s = _dot(q, refs[0][...].astype(q.dtype))                   # [1, nc]
    else:
      s = (_dot(jnp.maximum(q, 0.0), refs[1][...].astype(q.dtype))
           + _dot(jnp.minimum(q, 0.0), refs[0][...].astype(q.dtype)))
      s = jnp.max(s, axis=0, keepdims=True)                        # [1, nc]
    blocks = first + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    o_ref[...] = jnp.where(blocks < n_past, s, -jnp.inf)

  @pl.when(first >= n_past)
  def _empty():
    o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


def summary_block_scores(q_BKRH, summaries_BCKH, lengths_B, *, kind, block, nc, interpret=False):
  """Block scores [B, K, C] f32 from summaries [B, C, K, H] ((mean,) or (min, max)).
  q [B, K, R, H] f32: 'mean': R = 1, the group-mean query; 'minmax': R = G query heads."""
  b, kh, r, h = q_BKRH.shape
  c = summaries_BCKH[0].shape[1]

  def s_map(b_, k_, t, lens):
    n_past = (lens[b_] - 1) // block
    return b_, jnp.minimum(t, jnp.maximum(cdiv(n_past, nc) - 1, 0)), k_

  out = pl.pallas_call(
      functools.partial(_summary_kernel, block=block, nc=nc, kind=kind),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, kh, c // nc),
          in_specs=[pl.BlockSpec((None, None, r, h), lambda b_, k_, t, lens: (b_, k_, 0, 0))]
          + [pl.BlockSpec((None, nc, h), s_map)] * len(summaries_BCKH),
          out_specs=pl.BlockSpec((None, None, 1, nc), lambda b_, k_, t, lens: (b_, k_, 0, t))),
      out_shape=jax.ShapeDtypeStruct((b, kh, 1, c), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
      name=f"summary_block_scores_{kind}_tpu",
  )(lengths_B, q_BKRH, *(x.reshape(b, c, kh * h) for x in summaries_BCKH))
  return out[:, :, 0]

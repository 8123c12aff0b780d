"""Mosaic TPU block-sparse attention: forward, dq and dk/dv kernels over the non-empty tiles only.

The tile lists of `mask_info.MaskInfo` are scalar-prefetched into SMEM; the kv (or q) BlockSpec
index maps read them, so the pipeline DMAs exactly the listed tiles. Grid steps past a row's count
re-address the last listed tile (no new DMA) and skip compute. Layout inside: heads before length
([B, N, T, H]) so each block's last two dims are (tile, head_dim).
On real TPUs block_q and block_kv should be multiples of 128 (log-sum-exp rows live on lanes);
interpret mode (CPU) takes any sizes.
"""
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from .reference import MASK_VALUE

NUM_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # contract the head dims of both operands: a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims=_NN):
  """f32-accumulating matmul; precision pinned from the operands (a global 'highest' default must not
  turn a bf16 matmul into an fp32-contract one, which Mosaic rejects)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _visible(q_first, k_first, shape, q_axis):
  """Causal mask of one tile: key position <= query position. q positions run along q_axis."""
  q_pos = q_first + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  k_pos = k_first + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
  return k_pos <= q_pos


def _fwd_kernel(kv_idx_ref, kv_cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                groups, num_kv_heads, nq, nk, block_q, block_kv, causal, sm_scale, offset):
  b, n, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = (b * num_kv_heads + n // groups) * nq + i
  count = kv_cnt_ref[row]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j < count)
  def _step():
    kv_block = kv_idx_ref[row * nk + j]
    v = v_ref[...]
    s = _dot(q_ref[...], k_ref[...], _NT) * sm_scale
    if causal:
      visible = _visible(i * block_q + offset, kv_block * block_kv, s.shape, 0)
      s = jnp.where(visible, s, MASK_VALUE)
    m_prev = m_sc[...]                                               # [bq, 128], lanes equal
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, :1])
    if causal:  # a row masked in every visited tile must keep l == 0, not exp(0) = 1
      p = jnp.where(visible, p, 0.0)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_next
    acc_sc[...] = acc_sc[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v)

  @pl.when(j == nk - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    inv_l = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[...] = (acc_sc[...] * inv_l[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _to_heads_major(x):
  return jnp.swapaxes(x, 1, 2)  # [B, L, heads, H] <-> [B, heads, L, H]


def _flat(info):
  return [x.reshape(-1) for x in info]


def mha_forward(q, k, v, mask_info, *, block_q, block_kv, causal, sm_scale, interpret=False):
  """q [B, T, N, H], k/v [B, S, K, H] -> (out [B, T, N, H], lse [B, N, T] f32; +inf on empty rows)."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  nq, nk = t // block_q, s // block_kv
  kv_idx, kv_cnt, _, _ = _flat(mask_info)
  groups = n // kh

  def q_map(b_, n_, i, j, idx, cnt):
    return b_, n_, i, 0

  def kv_map(b_, n_, i, j, idx, cnt):
    kv_head = n_ // groups
    return b_, kv_head, idx[((b_ * kh + kv_head) * nq + i) * nk + j], 0

  kernel = functools.partial(
      _fwd_kernel, groups=groups, num_kv_heads=kh, nq=nq, nk=nk, block_q=block_q,
      block_kv=block_kv, causal=causal, sm_scale=sm_scale, offset=s - t)
  out_BNTH, lse_BNTL = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, n, nq, nk),
          in_specs=[pl.BlockSpec((None, None, block_q, h), q_map),
                    pl.BlockSpec((None, None, block_kv, h), kv_map),
                    pl.BlockSpec((None, None, block_kv, h), kv_map)],
          out_specs=[pl.BlockSpec((None, None, block_q, h), q_map),
                     pl.BlockSpec((None, None, block_q, NUM_LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                          pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                          pltpu.VMEM((block_q, h), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, n, t, h), q.dtype),
                 jax.ShapeDtypeStruct((b, n, t, NUM_LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_fwd",
  )(kv_idx, kv_cnt, _to_heads_major(q), _to_heads_major(k), _to_heads_major(v))
  return _to_heads_major(out_BNTH), lse_BNTL[..., 0]


def _dq_kernel(kv_idx_ref, kv_cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc, *,
               groups, num_kv_heads, nq, nk, block_q, block_kv, causal, sm_scale, offset):
  b, n, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = (b * num_kv_heads + n // groups) * nq + i

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(j < kv_cnt_ref[row])
  def _step():
    k, v = k_ref[...], v_ref[...]
    lse = jnp.expand_dims(lse_ref[0], -1)                            # [bq, 1]
    di = jnp.expand_dims(di_ref[0], -1)
    s = _dot(q_ref[...], k, _NT) * sm_scale
    p = jnp.exp(s - lse)
    if causal:
      visible = _visible(i * block_q + offset, kv_idx_ref[row * nk + j] * block_kv, s.shape, 0)
      p = jnp.where(visible, p, 0.0)
    dp = _dot(do_ref[...], v, _NT)
    ds = p * (dp - di)
    dq_sc[...] += _dot(ds.astype(k.dtype), k)

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_idx_ref, q_cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, groups, num_kv_heads, nq, nk, block_q, block_kv, causal, sm_scale,
                offset):
  # Grid axis 3 runs over (query head of the group, listed q tile) pairs: t = g * nq + r.
  b, kv_head, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  col = (b * num_kv_heads + kv_head) * nk + j
  r = t % nq

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(r < q_cnt_ref[col])
  def _step():
    q, do = q_ref[...], do_ref[...]
    s_t = _dot(k_ref[...], q, _NT) * sm_scale
    p_t = jnp.exp(s_t - lse_ref[...])                                # [bkv, bq]; lse is [1, bq]
    if causal:
      q_first = q_idx_ref[col * nq + r] * block_q + offset
      p_t = jnp.where(_visible(q_first, j * block_kv, s_t.shape, 1), p_t, 0.0)
    dv_sc[...] += _dot(p_t.astype(do.dtype), do)
    dp_t = _dot(v_ref[...], do, _NT)
    ds_t = p_t * (dp_t - di_ref[...])
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q)

  @pl.when(t == groups * nq - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def mha_backward(q, k, v, out, lse, do, mask_info, *, block_q, block_kv, causal, sm_scale,
                 interpret=False):
  """Gradients (dq [B,T,N,H], dk, dv [B,S,K,H]) from the forward's out and lse [B, N, T]."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  nq, nk = t // block_q, s // block_kv
  groups = n // kh
  kv_idx, kv_cnt, q_idx, q_cnt = _flat(mask_info)
  do = do.astype(q.dtype)
  di_BTN = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  di_BN1T = jnp.swapaxes(di_BTN, 1, 2)[:, :, None, :]
  lse_BN1T = lse[:, :, None, :]
  q_, k_, v_, do_ = (_to_heads_major(x) for x in (q, k, v, do))
  static = dict(groups=groups, num_kv_heads=kh, nq=nq, nk=nk, block_q=block_q, block_kv=block_kv,
                causal=causal, sm_scale=sm_scale, offset=s - t)

  def q_map(b_, n_, i, j, idx, cnt):
    return b_, n_, i, 0

  def row_map(b_, n_, i, j, idx, cnt):
    return b_, n_, 0, i

  def kv_map(b_, n_, i, j, idx, cnt):
    kv_head = n_ // groups
    return b_, kv_head, idx[((b_ * kh + kv_head) * nq + i) * nk + j], 0

  q_spec = pl.BlockSpec((None, None, block_q, h), q_map)
  kv_spec = pl.BlockSpec((None, None, block_kv, h), kv_map)
  row_spec = pl.BlockSpec((None, None, 1, block_q), row_map)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, n, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((block_q, h), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((b, n, t, h), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_dq",
  )(kv_idx, kv_cnt, q_, k_, v_, do_, lse_BN1T, di_BN1T)

  def q_tile(b_, kv_head, j, t_, idx):
    return idx[((b_ * kh + kv_head) * nk + j) * nq + t_ % nq]

  def tq_map(b_, kv_head, j, t_, idx, cnt):
    return b_, kv_head * groups + t_ // nq, q_tile(b_, kv_head, j, t_, idx), 0

  def trow_map(b_, kv_head, j, t_, idx, cnt):
    return b_, kv_head * groups + t_ // nq, 0, q_tile(b_, kv_head, j, t_, idx)

  def own_kv_map(b_, kv_head, j, t_, idx, cnt):
    return b_, kv_head, j, 0

  tq_spec = pl.BlockSpec((None, None, block_q, h), tq_map)
  trow_spec = pl.BlockSpec((None, None, 1, block_q), trow_map)
  own_kv_spec = pl.BlockSpec((None, None, block_kv, h), own_kv_map)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, kh, nk, groups * nq),
          in_specs=[tq_spec, own_kv_spec, own_kv_spec, tq_spec, trow_spec, trow_spec],
          out_specs=[own_kv_spec, own_kv_spec],
          scratch_shapes=[pltpu.VMEM((block_kv, h), jnp.float32),
                          pltpu.VMEM((block_kv, h), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, kh, s, h), k.dtype),
                 jax.ShapeDtypeStruct((b, kh, s, h), v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_dkv",
  )(q_idx, q_cnt, q_, k_, v_, do_, lse_BN1T, di_BN1T)
  return _to_heads_major(dq), _to_heads_major(dk), _to_heads_major(dv)

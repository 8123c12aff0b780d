"""Mosaic TPU block-sparse attention: forward, dq and dk/dv kernels over the non-empty tiles only.

The tile lists of `mask_info.MaskInfo` are scalar-prefetched into SMEM; the kv (or q) BlockSpec
index maps read them, so the pipeline DMAs exactly the listed tiles. Grid steps past a row's count
re-address the last listed tile (no new DMA) and skip compute. Layout inside: batch and kv head merged
and heads before length (q [B*K, G, T, H], k/v [B*K, 1, S, H]) so each block's last two dims are
(tile, head_dim) and one list row serves the G query heads of a kv head. The prefetched lists must
fit SMEM (1 MiB on v5e), so calls are split along B*K when they would not.
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
SMEM_BUDGET_INTS = 96 * 1024  # int32 list entries prefetched by one pallas_call
_NT = (((1,), (1,)), ((), ()))  # contract the head dims of both operands: a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims=_NN):
  """f32-accumulating matmul; precision pinned from the operands (a global 'highest' default must not
  turn a bf16 matmul into an fp32-contract one, which Mosaic rejects)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _mask_tile(s, q_first, k_first, q_axis, *, causal, window):
  """-inf at the hidden (query, key) pairs of one tile (q positions run along q_axis): key > query
  under `causal`, query - key >= window under a window.

  -inf (not a finite mask value) while running maxima start finite: a row with nothing visible
  gets p = 0. The select runs only on partial tiles (crossing the diagonal or the window's far
  edge); full tiles skip it.
  """
  if not causal:
    return s
  n_q, n_k = s.shape[q_axis], s.shape[1 - q_axis]

  def hide(s):
    d = (q_first + lax.broadcasted_iota(jnp.int32, s.shape, q_axis)) - (
        k_first + lax.broadcasted_iota(jnp.int32, s.shape, 1 - q_axis))
    visible = d >= 0 if window is None else (d >= 0) & (d < window)
    return jnp.where(visible, s, -jnp.inf)
  partial = k_first + n_k - 1 > q_first
  if window is not None:
    partial = partial | (q_first + n_q - 1 - k_first >= window)
  return lax.cond(partial, hide, lambda s: s, s)


def _fwd_kernel(kv_idx_ref, kv_cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                nq, nk, block_q, block_kv, causal, window, sm_scale, offset):
  r, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = r * nq + i

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j < kv_cnt_ref[row])
  def _step():
    v = v_ref[...]
    s = _dot(q_ref[...], k_ref[...], _NT) * sm_scale
    s = _mask_tile(s, i * block_q + offset, kv_idx_ref[row * nk + j] * block_kv, 0,
                   causal=causal, window=window)
    m_prev = m_sc[...]                                               # [bq, 128], lanes equal
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, :1])
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


def _dq_kernel(kv_idx_ref, kv_cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc, *,
               nq, nk, block_q, block_kv, causal, window, sm_scale, offset):
  r, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = r * nq + i

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(j < kv_cnt_ref[row])
  def _step():
    k, v = k_ref[...], v_ref[...]
    lse = jnp.expand_dims(lse_ref[0], -1)                            # [bq, 1]
    di = jnp.expand_dims(di_ref[0], -1)
    s = _dot(q_ref[...], k, _NT) * sm_scale
    s = _mask_tile(s, i * block_q + offset, kv_idx_ref[row * nk + j] * block_kv, 0,
                   causal=causal, window=window)
    p = jnp.exp(s - lse)
    ds = p * (_dot(do_ref[...], v, _NT) - di)
    dq_sc[...] += _dot(ds.astype(k.dtype), k)

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_idx_ref, q_cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, groups, nq, nk, block_q, block_kv, causal, window, sm_scale, offset):
  # Grid axis 2 runs over (query head of the group, listed q tile) pairs: t = g * nq + u.
  r, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  col = r * nk + j
  u = t % nq

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(u < q_cnt_ref[col])
  def _step():
    q, do = q_ref[...], do_ref[...]
    s_t = _dot(k_ref[...], q, _NT) * sm_scale                        # [bkv, bq]
    s_t = _mask_tile(s_t, q_idx_ref[col * nq + u] * block_q + offset, j * block_kv, 1,
                     causal=causal, window=window)
    p_t = jnp.exp(s_t - lse_ref[...])                                # lse is [1, bq]
    dv_sc[...] += _dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (_dot(v_ref[...], do, _NT) - di_ref[...])
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q)

  @pl.when(t == groups * nq - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _merge_kv_heads(x, kv_heads):
  """[B, L, K*G, H] -> [B*K, G, L, H]: one leading row per (batch, kv head)."""
  b, length, n, h = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(b * kv_heads, n // kv_heads, length, h)


def _split_kv_heads(x, batch):
  """[B*K, G, L, H] -> [B, L, K*G, H]."""
  rows, g, length, h = x.shape
  return jnp.swapaxes(x.reshape(batch, rows // batch * g, length, h), 1, 2)


def _in_chunks(fn, ints_per_row, *arrays):
  """fn over slices of the leading (B*K) axis small enough for SMEM; results joined on axis 0."""
  rows = arrays[0].shape[0]
  size = max(1, SMEM_BUDGET_INTS // ints_per_row)
  outs = [fn(*(x[lo:lo + size] for x in arrays)) for lo in range(0, rows, size)]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs) if len(outs) > 1 else outs[0]


def _q_map(r, g, i, j, idx, cnt):
  return r, g, i, 0


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def mha_forward(q, k, v, mask_info, *, block_q, block_kv, causal, sm_scale, window=None,
                interpret=False):
  """q [B, T, N, H], k/v [B, S, K, H] -> (out [B, T, N, H], lse [B, N, T] f32; +inf on empty rows)."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  nq, nk, groups = t // block_q, s // block_kv, n // kh
  kernel = functools.partial(_fwd_kernel, nq=nq, nk=nk, block_q=block_q, block_kv=block_kv,
                             causal=causal, window=window, sm_scale=sm_scale, offset=s - t)

  def kv_map(r, g, i, j, idx, cnt):
    return r, 0, idx[(r * nq + i) * nk + j], 0

  def call(kv_idx, kv_cnt, q_, k_, v_):
    rows = q_.shape[0]
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(rows, groups, nq, nk),
            in_specs=[pl.BlockSpec((None, None, block_q, h), _q_map),
                      pl.BlockSpec((None, None, block_kv, h), kv_map),
                      pl.BlockSpec((None, None, block_kv, h), kv_map)],
            out_specs=[pl.BlockSpec((None, None, block_q, h), _q_map),
                       pl.BlockSpec((None, None, block_q, NUM_LANES), _q_map)],
            scratch_shapes=[pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, h), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((rows, groups, t, h), q.dtype),
                   jax.ShapeDtypeStruct((rows, groups, t, NUM_LANES), jnp.float32)],
        compiler_params=_params(),
        interpret=interpret,
        name="block_sparse_attention_fwd",
    )(kv_idx.reshape(-1), kv_cnt.reshape(-1), q_, k_, v_)

  out, lse = _in_chunks(
      call, nq * nk + nq, mask_info.kv_indices.reshape(b * kh, -1),
      mask_info.kv_counts.reshape(b * kh, -1), _merge_kv_heads(q, kh), _merge_kv_heads(k, kh),
      _merge_kv_heads(v, kh))
  return _split_kv_heads(out, b), lse[..., 0].reshape(b, n, t)


def mha_backward(q, k, v, out, lse, do, mask_info, *, block_q, block_kv, causal, sm_scale,
                 window=None, interpret=False):
  """Gradients (dq [B,T,N,H], dk, dv [B,S,K,H]) from the forward's out and lse [B, N, T]."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  nq, nk, groups = t // block_q, s // block_kv, n // kh
  static = dict(nq=nq, nk=nk, block_q=block_q, block_kv=block_kv, causal=causal, window=window,
                sm_scale=sm_scale, offset=s - t)
  do = do.astype(q.dtype)
  di_BNT = jnp.swapaxes(jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), 1, 2)
  # Row statistics as [B*K, G, 1, T]: a q tile's values lie along lanes.
  lse_, di_ = (x.reshape(b * kh, groups, 1, t) for x in (lse, di_BNT))
  q_, k_, v_, do_ = (_merge_kv_heads(x, kh) for x in (q, k, v, do))

  def kv_map(r, g, i, j, idx, cnt):
    return r, 0, idx[(r * nq + i) * nk + j], 0

  def row_map(r, g, i, j, idx, cnt):
    return r, g, 0, i

  q_spec = pl.BlockSpec((None, None, block_q, h), _q_map)
  kv_spec = pl.BlockSpec((None, None, block_kv, h), kv_map)
  row_spec = pl.BlockSpec((None, None, 1, block_q), row_map)

  def dq_call(kv_idx, kv_cnt, q_, k_, v_, do_, lse_, di_):
    return pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(q_.shape[0], groups, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block_q, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_.shape, q.dtype),
        compiler_params=_params(),
        interpret=interpret,
        name="block_sparse_attention_dq",
    )(kv_idx.reshape(-1), kv_cnt.reshape(-1), q_, k_, v_, do_, lse_, di_)

  def q_tile(r, j, t_, idx):
    return idx[(r * nk + j) * nq + t_ % nq]

  def tq_map(r, j, t_, idx, cnt):
    return r, t_ // nq, q_tile(r, j, t_, idx), 0

  def trow_map(r, j, t_, idx, cnt):
    return r, t_ // nq, 0, q_tile(r, j, t_, idx)

  def own_kv_map(r, j, t_, idx, cnt):
    return r, 0, j, 0

  tq_spec = pl.BlockSpec((None, None, block_q, h), tq_map)
  trow_spec = pl.BlockSpec((None, None, 1, block_q), trow_map)
  own_kv_spec = pl.BlockSpec((None, None, block_kv, h), own_kv_map)

  def dkv_call(q_idx, q_cnt, q_, k_, v_, do_, lse_, di_):
    return pl.pallas_call(
        functools.partial(_dkv_kernel, groups=groups, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(q_.shape[0], nk, groups * nq),
            in_specs=[tq_spec, own_kv_spec, own_kv_spec, tq_spec, trow_spec, trow_spec],
            out_specs=[own_kv_spec, own_kv_spec],
            scratch_shapes=[pltpu.VMEM((block_kv, h), jnp.float32),
                            pltpu.VMEM((block_kv, h), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k_.shape, k.dtype), jax.ShapeDtypeStruct(v_.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="block_sparse_attention_dkv",
    )(q_idx.reshape(-1), q_cnt.reshape(-1), q_, k_, v_, do_, lse_, di_)

  dq = _in_chunks(dq_call, nq * nk + nq, mask_info.kv_indices.reshape(b * kh, -1),
                  mask_info.kv_counts.reshape(b * kh, -1), q_, k_, v_, do_, lse_, di_)
  dk, dv = _in_chunks(dkv_call, nq * nk + nk, mask_info.q_indices.reshape(b * kh, -1),
                      mask_info.q_counts.reshape(b * kh, -1), q_, k_, v_, do_, lse_, di_)
  return _split_kv_heads(dq, b), _split_kv_heads(dk, b), _split_kv_heads(dv, b)

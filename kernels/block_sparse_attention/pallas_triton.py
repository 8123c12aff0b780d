"""Triton-backend (portable GPU) block-sparse attention: forward, dq and dk/dv kernels.

Each program owns one (q tile, batch, head) -- or one kv tile for dk/dv -- and loops over that
tile's list from `mask_info.MaskInfo` only (a dynamic trip count), loading kv (or q) tiles by index.
dk/dv are computed per query head and summed over each GQA group outside the kernel.
On a GPU block_q and block_kv should be powers of two >= 16; head_dim is zero-padded to one.
Logits are kept in base 2 (scaled by log2(e)) so the softmax runs on exp2; the saved log-sum-exp is
base 2 too. Hidden logits are -inf while running maxima start finite, so a row with nothing visible
gets p = 0 without a second select.
"""
import math
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from .reference import MASK_VALUE

_LOG2E = math.log2(math.e)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims=_NN):
  """f32-accumulating matmul; precision pinned from the operands: float32 tiles at HIGHEST (true fp32
  dots, not TF32, so the kernel meets the reference's fp32 tolerance), bf16/fp16 tiles at DEFAULT
  (whatever jax_default_matmul_precision says globally)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _compiler_params(head_dim, itemsize, block_q, block_kv):
  # Two pipeline stages of K and V (or Q and dO) tiles must fit shared memory (227 KiB on H100):
  # f32 128x128 tiles with head_dim 128 do not.
  stage_bytes = 2 * max(block_q, block_kv) * head_dim * itemsize
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8,
                              num_stages=2 if 2 * stage_bytes <= 128 * 1024 else 1)


def _check_fits(dtype, head_dim, block_q, block_kv, interpret):
  # Measured on H100: f32 tiles of 128 x 128 (64 KiB) ask Triton for 256 KiB of shared memory.
  tile_bytes = max(block_q, block_kv) * head_dim * jnp.dtype(dtype).itemsize
  if not interpret and tile_bytes > 32 * 1024:
    raise ValueError(f"pallas_triton: block_q={block_q}/block_kv={block_kv} tiles of head_dim "
                     f"{head_dim} in {jnp.dtype(dtype).name} ({tile_bytes} bytes) overflow GPU shared "
                     "memory; use tiles of at most 32 KiB (e.g. bf16, or blocks of 64)")


def _mask_tile(s, q_first, k_first, *, causal, window, q_axis=0):
  """-inf at the hidden (query, key) pairs of one tile: key > query under `causal`, and
  query - key >= window under a window (q positions run along q_axis). The select runs only on
  partial tiles (those crossing the diagonal or the window's far edge); full tiles skip it."""
  if not causal:
    return s
  n_q, n_k = s.shape[q_axis], s.shape[1 - q_axis]

  def hide(s):
    q_pos = q_first + jnp.arange(n_q)
    k_pos = k_first + jnp.arange(n_k)
    d = (q_pos[:, None] - k_pos[None, :]) if q_axis == 0 else (q_pos[None, :] - k_pos[:, None])
    visible = d >= 0 if window is None else (d >= 0) & (d < window)
    return jnp.where(visible, s, -jnp.inf)
  partial = k_first + n_k - 1 > q_first
  if window is not None:
    partial = partial | (q_first + n_q - 1 - k_first >= window)
  return lax.cond(partial, hide, lambda s: s, s)


def _pad_head(x, h_pad):
  h = x.shape[-1]
  return x if h == h_pad else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, h_pad - h)])


def _fwd_kernel(kv_idx_ref, kv_cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, groups, num_kv_heads,
                nq, nk, block_q, block_kv, causal, window, sm_scale, offset):
  i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row = (b * num_kv_heads + n // groups) * nq + i
  q = q_ref[...]
  q_first = i * block_q + offset

  def body(jj, carry):
    acc, m_prev, l_prev = carry
    kv_block = kv_idx_ref[row * nk + jj]
    k = k_ref[pl.ds(kv_block * block_kv, block_kv), :]
    v = v_ref[pl.ds(kv_block * block_kv, block_kv), :]
    s = _dot(q, k, _NT) * (sm_scale * _LOG2E)
    s = _mask_tile(s, q_first, kv_block * block_kv, causal=causal, window=window)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  init = (jnp.zeros((block_q, q.shape[-1]), jnp.float32),
          jnp.full((block_q,), MASK_VALUE, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, kv_cnt_ref[row], body, init)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc * jnp.where(empty, 0.0, 1.0 / safe_l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(safe_l))


def mha_forward(q, k, v, mask_info, *, block_q, block_kv, causal, sm_scale, window=None,
                interpret=False):
  """q [B, T, N, H], k/v [B, S, K, H] -> (out [B, T, N, H], base-2 lse [B, N, T] f32; +inf on empty rows)."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  nq, nk = t // block_q, s // block_kv
  groups = n // kh
  hp = pl.next_power_of_2(h)
  _check_fits(q.dtype, hp, block_q, block_kv, interpret)
  kernel = functools.partial(
      _fwd_kernel, groups=groups, num_kv_heads=kh, nq=nq, nk=nk, block_q=block_q,
      block_kv=block_kv, causal=causal, window=window, sm_scale=sm_scale, offset=s - t)
  q_spec = pl.BlockSpec((None, block_q, None, hp), lambda i, b_, n_: (b_, i, n_, 0))
  kv_spec = pl.BlockSpec((None, s, None, hp), lambda i, b_, n_: (b_, 0, n_ // groups, 0))
  out, lse = pl.pallas_call(
      kernel,
      grid=(nq, b, n),
      in_specs=[pl.BlockSpec(), pl.BlockSpec(), q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b_, n_: (b_, n_, i))],
      out_shape=[jax.ShapeDtypeStruct((b, t, n, hp), q.dtype),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
      compiler_params=_compiler_params(hp, q.dtype.itemsize, block_q, block_kv),
      interpret=interpret,
      name="block_sparse_attention_fwd_triton",
  )(mask_info.kv_indices.reshape(-1), mask_info.kv_counts.reshape(-1),
    *(_pad_head(x, hp) for x in (q, k, v)))
  return out[..., :h], lse


def _dq_kernel(kv_idx_ref, kv_cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, *,
               groups, num_kv_heads, nq, nk, block_q, block_kv, causal, window, sm_scale, offset):
  i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row = (b * num_kv_heads + n // groups) * nq + i
  q, do = q_ref[...], do_ref[...]
  lse, di = lse_ref[...][:, None], di_ref[...][:, None]
  q_first = i * block_q + offset

  def body(jj, dq):
    kv_block = kv_idx_ref[row * nk + jj]
    k = k_ref[pl.ds(kv_block * block_kv, block_kv), :]
    v = v_ref[pl.ds(kv_block * block_kv, block_kv), :]
    s = _dot(q, k, _NT) * (sm_scale * _LOG2E)
    s = _mask_tile(s, q_first, kv_block * block_kv, causal=causal, window=window)
    p = jnp.exp2(s - lse)
    dp = _dot(do, v, _NT)
    ds = p * (dp - di)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, kv_cnt_ref[row], body, jnp.zeros((block_q, q.shape[-1]), jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_idx_ref, q_cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, *,
                groups, num_kv_heads, nq, nk, block_q, block_kv, causal, window, sm_scale, offset):
  j, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  col = (b * num_kv_heads + n // groups) * nk + j
  k, v = k_ref[...], v_ref[...]

  def body(rr, carry):
    dk, dv = carry
    q_block = q_idx_ref[col * nq + rr]
    rows = pl.ds(q_block * block_q, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    lse, di = lse_ref[rows], di_ref[rows]
    s_t = _dot(k, q, _NT) * (sm_scale * _LOG2E)   # [bkv, bq]
    s_t = _mask_tile(s_t, q_block * block_q + offset, j * block_kv, causal=causal, window=window,
                     q_axis=1)
    p_t = jnp.exp2(s_t - lse[None, :])
    dv = dv + _dot(p_t.astype(do.dtype), do)
    dp_t = _dot(v, do, _NT)
    ds_t = p_t * (dp_t - di[None, :])
    dk = dk + _dot(ds_t.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros((block_kv, k.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(0, q_cnt_ref[col], body, (zeros, zeros))
  dk_ref[...] = dk * sm_scale
  dv_ref[...] = dv


def mha_backward(q, k, v, out, lse, do, mask_info, *, block_q, block_kv, causal, sm_scale,
                 window=None, interpret=False):
  """Gradients (dq [B,T,N,H], dk, dv [B,S,K,H]) from the forward's out and base-2 lse [B, N, T]."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  nq, nk = t // block_q, s // block_kv
  groups = n // kh
  hp = pl.next_power_of_2(h)
  _check_fits(q.dtype, hp, block_q, block_kv, interpret)
  do = do.astype(q.dtype)
  di = jnp.swapaxes(jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), 1, 2)
  q_, k_, v_, do_ = (_pad_head(x, hp) for x in (q, k, v, do))
  static = dict(groups=groups, num_kv_heads=kh, nq=nq, nk=nk, block_q=block_q, block_kv=block_kv,
                causal=causal, window=window, sm_scale=sm_scale, offset=s - t)
  params = _compiler_params(hp, q.dtype.itemsize, block_q, block_kv)

  q_spec = pl.BlockSpec((None, block_q, None, hp), lambda i, b_, n_: (b_, i, n_, 0))
  kv_full = pl.BlockSpec((None, s, None, hp), lambda i, b_, n_: (b_, 0, n_ // groups, 0))
  row_spec = pl.BlockSpec((None, None, block_q), lambda i, b_, n_: (b_, n_, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **static),
      grid=(nq, b, n),
      in_specs=[pl.BlockSpec(), pl.BlockSpec(), q_spec, kv_full, kv_full, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, t, n, hp), q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="block_sparse_attention_dq_triton",
  )(mask_info.kv_indices.reshape(-1), mask_info.kv_counts.reshape(-1), q_, k_, v_, do_, lse, di)

  q_full = pl.BlockSpec((None, t, None, hp), lambda j, b_, n_: (b_, 0, n_, 0))
  kv_spec = pl.BlockSpec((None, block_kv, None, hp), lambda j, b_, n_: (b_, j, n_ // groups, 0))
  rows_full = pl.BlockSpec((None, None, t), lambda j, b_, n_: (b_, n_, 0))
  part_spec = pl.BlockSpec((None, block_kv, None, hp), lambda j, b_, n_: (b_, j, n_, 0))
  dk_part, dv_part = pl.pallas_call(
      functools.partial(_dkv_kernel, **static),
      grid=(nk, b, n),
      in_specs=[pl.BlockSpec(), pl.BlockSpec(), q_full, kv_spec, kv_spec, q_full, rows_full,
                rows_full],
      out_specs=[part_spec, part_spec],
      out_shape=[jax.ShapeDtypeStruct((b, s, n, hp), jnp.float32)] * 2,
      compiler_params=params,
      interpret=interpret,
      name="block_sparse_attention_dkv_triton",
  )(mask_info.q_indices.reshape(-1), mask_info.q_counts.reshape(-1), q_, k_, v_, do_, lse, di)

  def group_sum(x, dtype):  # per-query-head partials [B, S, N, Hp] -> [B, S, K, H]
    return x.reshape(b, s, kh, groups, hp).sum(axis=3)[..., :h].astype(dtype)

  return dq[..., :h], group_sum(dk_part, k.dtype), group_sum(dv_part, v.dtype)

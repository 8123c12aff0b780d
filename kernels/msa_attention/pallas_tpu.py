"""Mosaic TPU MSA kernels: block-max index scores, and KV-outer sparse attention forward/backward.

Index scores: grid (B, K, query tiles, key chunks); a step multiplies a key chunk by a query tile
([chunk, bq] scores, queries on lanes) and keeps only the max of each key block, so HBM sees
[B, K, C, T] (T x S / block_size), never [T, S]. Chunks wholly in the query tile's future skip
compute and re-address the last needed chunk (no DMA).

Sparse attention runs on the `routing.Routing` layout: every row tile belongs to one key block, so
a step is a [rows, H] x [H, block] matmul. Scores are kept transposed ([block, rows], queries on
lanes) so per-row statistics are lane rows [1, rows] and the log-sum-exp goes to HBM as [.., 1, L]
instead of lane-broadcast [.., L, 128]. The forward writes per-(query, slot) partial outputs and
log-sum-exps (each row sees one block: no online softmax); the caller combines the k slots. The
backward is one kernel: per step dq of the rows (combined by the caller) and dk/dv accumulated in
VMEM over the consecutive tiles of one block, written when the block changes.
Real TPUs want rows, bq and block_size multiples of 128; interpret mode (CPU) takes any sizes.
"""
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

SMEM_BUDGET_INTS = 96 * 1024  # int32 tile-list entries prefetched by one pallas_call
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims=_NN):
  """f32-accumulating matmul; precision pinned from the operands (see block_sparse_attention)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _scores_kernel(off_ref, q_ref, k_ref, o_ref, *, bq, chunk, block_size, num_keys):
  i, j = pl.program_id(2), pl.program_id(3)
  offset = off_ref[0]
  last_q = i * bq + bq - 1 + offset
  m = chunk // block_size

  @pl.when(j * chunk <= last_q)
  def _compute():
    s_t = _dot(k_ref[...], q_ref[...], _NT).astype(jnp.float32)       # [chunk, bq]
    k_pos = j * chunk + lax.broadcasted_iota(jnp.int32, s_t.shape, 0)
    q_pos = i * bq + offset + lax.broadcasted_iota(jnp.int32, s_t.shape, 1)
    s_t = jnp.where((k_pos <= q_pos) & (k_pos < num_keys), s_t, -jnp.inf)
    for c in range(m):
      o_ref[c:c + 1, :] = jnp.max(s_t[c * block_size:(c + 1) * block_size], axis=0, keepdims=True)

  @pl.when(j * chunk > last_q)
  def _future():
    o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


def block_scores(q_idx_BTKI, k_idx_BSI, q_offset, *, block_size, block_q, key_chunk,
                 interpret=False):
  """Block max index scores [B, K, T, C] f32 (see reference.block_scores_reference); query i at
  position i + q_offset (an int32 scalar, traced is fine)."""
  b, t, kh, di = q_idx_BTKI.shape
  s = k_idx_BSI.shape[1]
  c = -(-s // block_size)
  chunk = min(key_chunk, c * block_size)
  tp, sp = -(-t // block_q) * block_q, -(-s // chunk) * chunk
  q_ = jnp.pad(jnp.swapaxes(q_idx_BTKI, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  k_ = jnp.pad(k_idx_BSI, ((0, 0), (0, sp - s), (0, 0))).astype(q_.dtype)
  nq, nc = tp // block_q, sp // chunk

  def k_map(b_, h_, i, j, off):  # chunks past the tile's last query re-address the last needed one
    return b_, jnp.clip((i * block_q + block_q - 1 + off[0]) // chunk, 0, j), 0

  out = pl.pallas_call(
      functools.partial(_scores_kernel, bq=block_q, chunk=chunk, block_size=block_size,
                        num_keys=s),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, kh, nq, nc),
          in_specs=[pl.BlockSpec((None, None, block_q, di),
                                 lambda b_, h_, i, j, off: (b_, h_, i, 0)),
                    pl.BlockSpec((None, chunk, di), k_map)],
          out_specs=pl.BlockSpec((None, None, chunk // block_size, block_q),
                                 lambda b_, h_, i, j, off: (b_, h_, j, i))),
      out_shape=jax.ShapeDtypeStruct((b, kh, sp // block_size, tp), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="msa_block_scores",
  )(jnp.reshape(q_offset, (1,)).astype(jnp.int32), q_, k_)
  return jnp.swapaxes(out[:, :, :c, :t], 2, 3)


def _scores_t(q_ref, k_ref, pos_ref, blk, *, block_size, sm_scale):
  """Transposed scores [block, rows] of one tile, -inf where the key follows the row's query."""
  s_t = _dot(k_ref[...], q_ref[...], _NT) * sm_scale
  k_pos = blk * block_size + lax.broadcasted_iota(jnp.int32, s_t.shape, 0)
  return jnp.where(k_pos <= pos_ref[...], s_t, -jnp.inf)


def _fwd_kernel(blk_ref, cnt_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, lse_ref, *, nt, block_size,
                sm_scale):
  r, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j < cnt_ref[r])
  def _step():
    s_t = _scores_t(q_ref, k_ref, pos_ref, blk_ref[r * nt + j], block_size=block_size,
                    sm_scale=sm_scale)
    m = jnp.max(s_t, axis=0, keepdims=True)                           # [1, rows]
    m = jnp.where(m == -jnp.inf, 0.0, m)
    p_t = jnp.exp(s_t - m)
    l = jnp.sum(p_t, axis=0, keepdims=True)
    empty = l == 0.0
    p_t = p_t * jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    v = v_ref[...]
    o_ref[...] = _dot(p_t.T.astype(v.dtype), v)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))

  @pl.when(j >= cnt_ref[r])
  def _past_end():  # never read back; written so no output holds stale memory
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
    lse_ref[...] = jnp.full(lse_ref.shape, -jnp.inf, lse_ref.dtype)


def _bwd_kernel(blk_ref, cnt_ref, q_ref, k_ref, v_ref, pos_ref, do_ref, lse_ref, di_ref, dq_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, nt, groups, block_size, sm_scale):
  r, j, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  blk = blk_ref[r * nt + j]
  first = (j == 0) | (blk != blk_ref[r * nt + jnp.maximum(j - 1, 0)])
  last = (j == nt - 1) | (blk != blk_ref[r * nt + jnp.minimum(j + 1, nt - 1)])

  @pl.when((g == 0) & first)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(j < cnt_ref[r])
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s_t = _scores_t(q_ref, k_ref, pos_ref, blk, block_size=block_size, sm_scale=sm_scale)
    p_t = jnp.exp(s_t - lse_ref[...])                                 # lse is [1, rows]
    dv_sc[...] += _dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (_dot(v, do, _NT) - di_ref[...])
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q)
    dq_ref[...] = _dot(ds_t.T.astype(k.dtype), k) * sm_scale

  @pl.when(j >= cnt_ref[r])
  def _past_end():
    dq_ref[...] = jnp.zeros(dq_ref.shape, dq_ref.dtype)

  @pl.when((g == groups - 1) & last)
  def _finish():
    dk_ref[...] = dk_sc[...] * sm_scale
    dv_ref[...] = dv_sc[...]


def _in_chunks(fn, ints_per_row, *arrays):
  """fn over slices of the leading (B*K) axis whose tile lists fit SMEM; results joined on axis 0."""
  rows = arrays[0].shape[0]
  size = max(1, SMEM_BUDGET_INTS // ints_per_row)
  outs = [fn(*(x[lo:lo + size] for x in arrays)) for lo in range(0, rows, size)]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs) if len(outs) > 1 else outs[0]


def sparse_forward(q_RGLH, k_RSH, v_RSH, pos_R1L, tile_block, tile_count, *, rows, block_size,
                   sm_scale, interpret=False):
  """Routed rows -> (partial out [R, G, L, H] f32, partial lse [R, G, 1, L] f32, -inf if empty)."""
  _, groups, length, h = q_RGLH.shape
  nt = length // rows
  kernel = functools.partial(_fwd_kernel, nt=nt, block_size=block_size, sm_scale=sm_scale)
  row_spec = pl.BlockSpec((None, None, rows, h), lambda r, j, g, blk, cnt: (r, g, j, 0))
  kv_spec = pl.BlockSpec((None, block_size, h), lambda r, j, g, blk, cnt: (r, blk[r * nt + j], 0))
  pos_spec = pl.BlockSpec((None, 1, rows), lambda r, j, g, blk, cnt: (r, 0, j))
  lse_spec = pl.BlockSpec((None, None, 1, rows), lambda r, j, g, blk, cnt: (r, g, 0, j))

  def call(blk, cnt, q_, k_, v_, pos):
    n = q_.shape[0]
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(n, nt, groups),
            in_specs=[row_spec, kv_spec, kv_spec, pos_spec],
            out_specs=[row_spec, lse_spec]),
        out_shape=[jax.ShapeDtypeStruct((n, groups, length, h), jnp.float32),
                   jax.ShapeDtypeStruct((n, groups, 1, length), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="msa_sparse_attention_fwd",
    )(blk.reshape(-1), cnt, q_, k_, v_, pos)

  return _in_chunks(call, nt + 1, tile_block, tile_count, q_RGLH, k_RSH, v_RSH, pos_R1L)


def sparse_backward(q_RGLH, k_RSH, v_RSH, pos_R1L, do_RGLH, lse_RG1L, di_RG1L, tile_block,
                    tile_count, *, rows, block_size, sm_scale, interpret=False):
  """(dq rows [R, G, L, H] f32, dk, dv [R, S, H] f32); blocks no tile visits are left unwritten."""
  _, groups, length, h = q_RGLH.shape
  s = k_RSH.shape[1]
  nt = length // rows
  kernel = functools.partial(_bwd_kernel, nt=nt, groups=groups, block_size=block_size,
                             sm_scale=sm_scale)
  row_spec = pl.BlockSpec((None, None, rows, h), lambda r, j, g, blk, cnt: (r, g, j, 0))
  kv_spec = pl.BlockSpec((None, block_size, h), lambda r, j, g, blk, cnt: (r, blk[r * nt + j], 0))
  pos_spec = pl.BlockSpec((None, 1, rows), lambda r, j, g, blk, cnt: (r, 0, j))
  lse_spec = pl.BlockSpec((None, None, 1, rows), lambda r, j, g, blk, cnt: (r, g, 0, j))

  def call(blk, cnt, q_, k_, v_, pos, do_, lse_, di_):
    n = q_.shape[0]
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(n, nt, groups),
            in_specs=[row_spec, kv_spec, kv_spec, pos_spec, row_spec, lse_spec, lse_spec],
            out_specs=[row_spec, kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((block_size, h), jnp.float32),
                            pltpu.VMEM((block_size, h), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((n, groups, length, h), jnp.float32),
                   jax.ShapeDtypeStruct((n, s, h), jnp.float32),
                   jax.ShapeDtypeStruct((n, s, h), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="msa_sparse_attention_bwd",
    )(blk.reshape(-1), cnt, q_, k_, v_, pos, do_, lse_, di_)

  return _in_chunks(call, nt + 1, tile_block, tile_count, q_RGLH, k_RSH, v_RSH, pos_R1L, do_RGLH,
                    lse_RG1L, di_RG1L)

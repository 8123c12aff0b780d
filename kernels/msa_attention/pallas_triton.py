"""Triton-backend (portable GPU) MSA kernels: block-max index scores, routed sparse attention.

Same contract and layouts as pallas_tpu.py (the routed rows of `routing.Routing`). Programs:
- scores: one (query tile, batch * kv head, chunk of key blocks); per key block a [bq, I] x [I, bs]
  matmul reduced to its row max; chunks wholly in the future store -inf without loading.
- forward: one (row tile, batch * kv head, head of the group); the tile's key block loaded by index.
- backward, two passes (no atomics): dq per (row tile, batch * kv head, head), like the forward;
  dk/dv per (key block, batch * kv head, head) looping over that block's tiles (consecutive in the
  routed layout) so they accumulate in registers; dk/dv per query head, summed over the group.
On a GPU block_size, rows and the score tiles must be powers of two >= 16; head dims are
zero-padded to one.
"""
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims=_NN):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _pow2(n):
  return n > 0 and n & (n - 1) == 0


def _pad_last(x, size):
  return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def check_supported(q, k, block_size, rows, interpret):
  """ValueError where the compiled Triton path cannot run these shapes (interpret takes any)."""
  if interpret:
    return
  for name, n in (("block_size", block_size), ("rows", rows)):
    if not _pow2(n) or n < 16:
      raise ValueError(f"pallas_triton: {name}={n} must be a power of two >= 16")
  hp = pl.next_power_of_2(q.shape[-1])
  if max(block_size, rows) * hp * q.dtype.itemsize > 32 * 1024:
    raise ValueError(f"pallas_triton: tiles of {max(block_size, rows)} x {hp} in {q.dtype} "
                     "overflow shared memory; use bf16 or smaller tiles")


def _scores_kernel(off_ref, q_ref, k_ref, o_ref, *, bq, chunk, block_size, num_keys):
  i, j = pl.program_id(0), pl.program_id(2)
  offset = off_ref[0]
  m = chunk // block_size
  last_q = i * bq + bq - 1 + offset

  @pl.when(j * chunk <= last_q)
  def _compute():
    q = q_ref[...]
    q_pos = i * bq + offset + jnp.arange(bq)
    for c in range(m):
      first = j * chunk + c * block_size
      s = _dot(q, k_ref[pl.ds(c * block_size, block_size), :], _NT)       # [bq, bs]
      k_pos = first + jnp.arange(block_size)
      s = jnp.where((k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < num_keys), s, -jnp.inf)
      o_ref[c, :] = jnp.max(s, axis=1)

  @pl.when(j * chunk > last_q)
  def _future():
    o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


def block_scores(q_idx_BTKI, k_idx_BSI, q_offset, *, block_size, block_q, key_chunk,
                 interpret=False):
  """Block max index scores [B, K, T, C] f32 (see reference.block_scores_reference); query i at
  position i + q_offset (an int32 scalar, traced is fine)."""
  b, t, kh, di = q_idx_BTKI.shape
  s = k_idx_BSI.shape[1]
  if not interpret:
    for name, n in (("block_size", block_size), ("block_q", block_q), ("key_chunk", key_chunk)):
      if not _pow2(n) or n < 16:
        raise ValueError(f"pallas_triton: {name}={n} must be a power of two >= 16")
  c = -(-s // block_size)
  chunk = min(key_chunk, pl.next_power_of_2(c) * block_size)
  dp = pl.next_power_of_2(di)
  tp, sp = -(-t // block_q) * block_q, -(-s // chunk) * chunk
  q_ = _pad_last(jnp.pad(q_idx_BTKI, ((0, 0), (0, tp - t), (0, 0), (0, 0))), dp)
  k_ = _pad_last(jnp.pad(k_idx_BSI, ((0, 0), (0, sp - s), (0, 0))), dp).astype(q_.dtype)
  nq, nc = tp // block_q, sp // chunk
  m = chunk // block_size
  out = pl.pallas_call(
      functools.partial(_scores_kernel, bq=block_q, chunk=chunk, block_size=block_size,
                        num_keys=s),
      grid=(nq, b * kh, nc),
      in_specs=[pl.BlockSpec(), pl.BlockSpec((None, block_q, None, dp), lambda i, r, j: (r // kh, i, r % kh, 0)),
                pl.BlockSpec((None, chunk, dp), lambda i, r, j: (r // kh, j, 0))],
      out_specs=pl.BlockSpec((None, m, block_q), lambda i, r, j: (r, j, i)),
      out_shape=jax.ShapeDtypeStruct((b * kh, nc * m, tp), jnp.float32),
      interpret=interpret,
      name="msa_block_scores_triton",
  )(jnp.reshape(q_offset, (1,)).astype(jnp.int32), q_, k_)
  return jnp.swapaxes(out.reshape(b, kh, nc * m, tp)[:, :, :c, :t], 2, 3)


def _topk_kernel(off_ref, q_ref, k_ref, o_ref, *, bq, block_size, num_keys, num_blocks, top_k,
                 local_blocks):
  i = pl.program_id(0)
  offset = off_ref[0]
  kp = o_ref.shape[-1]
  q = q_ref[...]
  q_pos = i * bq + offset + jnp.arange(bq)
  row_blk = q_pos // block_size
  slot = jnp.arange(kp)[None, :]
  last = jnp.minimum((i * bq + bq - 1 + offset) // block_size + 1, num_blocks).astype(jnp.int32)

  def body(c, carry):
    val, idx = carry                                                  # [bq, kp] f32 / int32
    s = _dot(q, k_ref[pl.ds(c * block_size, block_size), :], _NT)    # [bq, bs]
    k_pos = c * block_size + jnp.arange(block_size)
    s = jnp.where((k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < num_keys), s, -jnp.inf)
    score = jnp.max(s, axis=1)
    forced = (c <= row_blk) & (c > row_blk - local_blocks)            # the local blocks: +inf
    score = jnp.where(forced, jnp.inf, score)
    low = jnp.min(val, axis=1)
    # Evict the highest block id among the lowest scores (lax.top_k keeps lower ids on ties);
    # empty slots hold distinct negative ids so exactly one slot is replaced.
    victim = jnp.max(jnp.where(val == low[:, None], idx, -kp - 1), axis=1)
    hit = (score > low)[:, None] & (idx == victim[:, None])
    return jnp.where(hit, score[:, None], val), jnp.where(hit, c, idx)

  # Padding slots (kp > top_k) start at +inf: never the minimum, never replaced.
  val0 = jnp.where(slot < top_k, -jnp.inf, jnp.inf) + jnp.zeros((bq, kp), jnp.float32)
  idx0 = -1 - slot + jnp.zeros((bq, kp), jnp.int32)
  _, idx = lax.fori_loop(0, last, body, (val0, idx0))
  o_ref[...] = jnp.where(idx < 0, -1, idx)


def select_topk(q_idx_BTKI, k_idx_BSI, q_offset, *, block_size, top_k, local_blocks, block_q,
                interpret=False):
  """Fused selection, per GQA group: block max of index scores and a running top-k per query, so
  neither [T, S] scores nor [T, C] block scores reach memory. Index lists int32 [B, K, T, k]
  (k = min(top_k, C), -1 = empty; slot order differs from lax.top_k, the set is the same)."""
  b, t, kh, di = q_idx_BTKI.shape
  s = k_idx_BSI.shape[1]
  if not interpret and (not _pow2(block_size) or block_size < 16 or not _pow2(block_q) or block_q < 16):
    raise ValueError(f"pallas_triton: block_size={block_size} and block_q={block_q} must be "
                     "powers of two >= 16")
  c = -(-s // block_size)
  k = min(top_k, c)
  kp = pl.next_power_of_2(k)
  dp = pl.next_power_of_2(di)
  tp, sp = -(-t // block_q) * block_q, c * block_size
  q_ = _pad_last(jnp.pad(q_idx_BTKI, ((0, 0), (0, tp - t), (0, 0), (0, 0))), dp)
  k_ = _pad_last(jnp.pad(k_idx_BSI, ((0, 0), (0, sp - s), (0, 0))), dp).astype(q_.dtype)
  out = pl.pallas_call(
      functools.partial(_topk_kernel, bq=block_q, block_size=block_size, num_keys=s,
                        num_blocks=c, top_k=k, local_blocks=local_blocks),
      grid=(tp // block_q, b * kh),
      in_specs=[pl.BlockSpec(),
                pl.BlockSpec((None, block_q, None, dp), lambda i, r: (r // kh, i, r % kh, 0)),
                pl.BlockSpec((None, sp, dp), lambda i, r: (r // kh, 0, 0))],
      out_specs=pl.BlockSpec((None, block_q, kp), lambda i, r: (r, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b * kh, tp, kp), jnp.int32),
      compiler_params=_compiler_params(dp, q_.dtype.itemsize, max(block_q, block_size)),
      interpret=interpret,
      name="msa_select_topk_triton",
  )(jnp.reshape(q_offset, (1,)).astype(jnp.int32), q_, k_)
  return out.reshape(b, kh, tp, kp)[:, :, :t, :k]


def _tile_scores(q, k_ref, pos, blk, *, block_size, sm_scale):
  """Scores [rows, bs] of one tile against key block blk; -inf after each row's query."""
  k = k_ref[pl.ds(blk * block_size, block_size), :]
  s = _dot(q, k, _NT) * sm_scale
  k_pos = blk * block_size + jnp.arange(block_size)
  return jnp.where(k_pos[None, :] <= pos[:, None], s, -jnp.inf), k


def _fwd_kernel(blk_ref, cnt_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, lse_ref, *, nt, block_size,
                sm_scale):
  j, r = pl.program_id(0), pl.program_id(1)

  @pl.when(j < cnt_ref[r])
  def _step():
    blk = blk_ref[r * nt + j]
    s, _ = _tile_scores(q_ref[...], k_ref, pos_ref[...], blk, block_size=block_size,
                        sm_scale=sm_scale)
    m = jnp.max(s, axis=1)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(s - m[:, None])
    l = jnp.sum(p, axis=1)
    empty = l == 0.0
    p = p * jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))[:, None]
    v = v_ref[pl.ds(blk * block_size, block_size), :]
    o_ref[...] = _dot(p.astype(v.dtype), v).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _layouts(q_RGLH, k_RSH, pos_R1L):
  hp = pl.next_power_of_2(q_RGLH.shape[-1])
  return hp, _pad_last(q_RGLH, hp), _pad_last(k_RSH, hp), pos_R1L[:, 0, :]


def sparse_forward(q_RGLH, k_RSH, v_RSH, pos_R1L, tile_block, tile_count, *, rows, block_size,
                   sm_scale, interpret=False):
  """Routed rows -> (partial out [R, G, L, H] in q's dtype, partial lse [R, G, 1, L] f32, -inf if
  empty). The partials are k x the size of q: bf16 halves the bytes the combine moves."""
  n, groups, length, h = q_RGLH.shape
  sp = k_RSH.shape[1]
  nt = length // rows
  hp, q_, k_, pos = _layouts(q_RGLH, k_RSH, pos_R1L)
  row_spec = pl.BlockSpec((None, None, rows, hp), lambda j, r, g: (r, g, j, 0))
  kv_spec = pl.BlockSpec((None, sp, hp), lambda j, r, g: (r, 0, 0))
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, nt=nt, block_size=block_size, sm_scale=sm_scale),
      grid=(nt, n, groups),
      in_specs=[pl.BlockSpec(), pl.BlockSpec(), row_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, rows), lambda j, r, g: (r, j))],
      out_specs=[row_spec, pl.BlockSpec((None, None, rows), lambda j, r, g: (r, g, j))],
      out_shape=[jax.ShapeDtypeStruct((n, groups, length, hp), q_RGLH.dtype),
                 jax.ShapeDtypeStruct((n, groups, length), jnp.float32)],
      compiler_params=_compiler_params(hp, q_.dtype.itemsize, max(rows, block_size)),
      interpret=interpret,
      name="msa_sparse_attention_fwd_triton",
  )(tile_block.reshape(-1), tile_count, q_, k_, _pad_last(v_RSH, hp), pos)
  return o[..., :h], lse[:, :, None, :]


def _compiler_params(hp, itemsize, tile):
  # As block_sparse_attention's Triton kernels (compiled on H200 at 128 x 128 tiles, d 128, bf16):
  # two pipeline stages of two [tile, hp] operands must fit in 128 KiB, 8 warps at d > 64.
  stage_bytes = 2 * tile * hp * itemsize
  return plgpu.CompilerParams(num_warps=4 if hp <= 64 else 8,
                              num_stages=2 if 2 * stage_bytes <= 128 * 1024 else 1)


def _dq_kernel(blk_ref, cnt_ref, q_ref, k_ref, v_ref, pos_ref, do_ref, lse_ref, di_ref, dq_ref, *,
               nt, block_size, sm_scale):
  j, r = pl.program_id(0), pl.program_id(1)

  @pl.when(j < cnt_ref[r])
  def _step():
    blk = blk_ref[r * nt + j]
    s, k = _tile_scores(q_ref[...], k_ref, pos_ref[...], blk, block_size=block_size,
                        sm_scale=sm_scale)
    p = jnp.exp(s - lse_ref[...][:, None])                             # [rows, bs]
    v = v_ref[pl.ds(blk * block_size, block_size), :]
    ds = p * (_dot(do_ref[...], v, _NT) - di_ref[...][:, None])
    dq_ref[...] = (_dot(ds.astype(k.dtype), k) * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(first_ref, ntiles_ref, q_ref, k_ref, v_ref, pos_ref, do_ref, lse_ref, di_ref,
                dk_ref, dv_ref, *, num_blocks, rows, block_size, sm_scale):
  # Transposed orientation (keys along rows), as block_sparse_attention's dk/dv kernel: the
  # accumulators stay [bs, H] and no [rows, bs] tile is transposed.
  c, r = pl.program_id(0), pl.program_id(1)
  first, count = first_ref[r * num_blocks + c], ntiles_ref[r * num_blocks + c]
  k_pos = c * block_size + jnp.arange(block_size)
  k, v = k_ref[...], v_ref[...]

  def body(tt, carry):
    dk, dv = carry
    sl = pl.ds((first + tt) * rows, rows)
    q, do = q_ref[sl, :], do_ref[sl, :]
    pos, lse, di = pos_ref[sl], lse_ref[sl], di_ref[sl]
    s_t = _dot(k, q, _NT) * sm_scale                                    # [bs, rows]
    s_t = jnp.where(k_pos[:, None] <= pos[None, :], s_t, -jnp.inf)
    p_t = jnp.exp(s_t - lse[None, :])
    dv = dv + _dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (_dot(v, do, _NT) - di[None, :])
    dk = dk + _dot(ds_t.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros((block_size, k.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(0, count, body, (zeros, zeros))
  dk_ref[...] = dk * sm_scale
  dv_ref[...] = dv


def sparse_backward(q_RGLH, k_RSH, v_RSH, pos_R1L, do_RGLH, lse_RG1L, di_RG1L, tile_block,
                    tile_count, *, rows, block_size, sm_scale, interpret=False):
  """(dq rows [R, G, L, H] in q's dtype, dk, dv [R, S, H] f32): pallas_tpu.sparse_backward's contract.

  Two passes (the fused one asked Hopper for 291 KiB of shared memory): dq per row tile (its one
  key block, like the forward), dk/dv per key block looping over the block's consecutive tiles.
  """
  n, groups, length, h = q_RGLH.shape
  sp = k_RSH.shape[1]
  nt, num_blocks = length // rows, sp // block_size
  hp, q_, k_, pos = _layouts(q_RGLH, k_RSH, pos_R1L)
  v_, do_ = _pad_last(v_RSH, hp), _pad_last(do_RGLH, hp)
  lse, di = lse_RG1L[:, :, 0], di_RG1L[:, :, 0]
  params = _compiler_params(hp, q_.dtype.itemsize, max(rows, block_size))

  row_spec = pl.BlockSpec((None, None, rows, hp), lambda j, r, g: (r, g, j, 0))
  kv_full = pl.BlockSpec((None, sp, hp), lambda j, r, g: (r, 0, 0))
  lane_tile = pl.BlockSpec((None, None, rows), lambda j, r, g: (r, g, j))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, nt=nt, block_size=block_size, sm_scale=sm_scale),
      grid=(nt, n, groups),
      in_specs=[pl.BlockSpec(), pl.BlockSpec(), row_spec, kv_full, kv_full,
                pl.BlockSpec((None, rows), lambda j, r, g: (r, j)), row_spec, lane_tile, lane_tile],
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct((n, groups, length, hp), q_RGLH.dtype),
      compiler_params=params,
      interpret=interpret,
      name="msa_sparse_attention_dq_triton",
  )(tile_block.reshape(-1), tile_count, q_, k_, v_, pos, do_, lse, di)

  # Each block's run of tiles: first tile and count (tiles past the real ones belong to none).
  real = jnp.arange(nt) < tile_count[:, None]
  keyed = jnp.where(real, tile_block, num_blocks)
  blocks = jnp.arange(num_blocks)
  lo = jax.vmap(lambda x: jnp.searchsorted(x, blocks, side="left"))(keyed).astype(jnp.int32)
  hi = jax.vmap(lambda x: jnp.searchsorted(x, blocks, side="right"))(keyed).astype(jnp.int32)
  full_rows = pl.BlockSpec((None, None, length, hp), lambda c, r, g: (r, g, 0, 0))
  kv_spec = pl.BlockSpec((None, block_size, hp), lambda c, r, g: (r, c, 0))
  lane = pl.BlockSpec((None, None, length), lambda c, r, g: (r, g, 0))
  part = pl.BlockSpec((None, None, block_size, hp), lambda c, r, g: (r, g, c, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, num_blocks=num_blocks, rows=rows, block_size=block_size,
                        sm_scale=sm_scale),
      grid=(num_blocks, n, groups),
      in_specs=[pl.BlockSpec(), pl.BlockSpec(), full_rows, kv_spec, kv_spec,
                pl.BlockSpec((None, length), lambda c, r, g: (r, 0)), full_rows, lane, lane],
      out_specs=[part, part],
      out_shape=[jax.ShapeDtypeStruct((n, groups, sp, hp), jnp.float32)] * 2,
      compiler_params=params,
      interpret=interpret,
      name="msa_sparse_attention_dkv_triton",
  )(lo.reshape(-1), (hi - lo).reshape(-1), q_, k_, v_, pos, do_, lse, di)
  return dq[..., :h], dk.sum(axis=1)[..., :h], dv.sum(axis=1)[..., :h]

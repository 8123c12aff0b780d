"""Block-sparse flash attention for Hopper (sm_90) in Pallas Mosaic GPU: the fast GPU path.

Warp-specialized like FlashAttention-3 (jax's `pallas/ops/gpu/attention_mgpu.py` shows the design):
each CTA owns one 128-row query tile, split between two compute warpgroups of 64 rows, and a memory
warpgroup streams K/V tiles into a ring of shared-memory slots with TMA. What is block-sparse here:
the memory warpgroup reads the tile's kv-tile list (`MaskInfo.kv_indices`, `kv_counts`) from global
memory and fetches only those tiles, so the loop runs over non-empty tiles only; the token-level
causal / sliding-window mask is applied (under `lax.cond`) only to partial tiles: those that cross
the diagonal or the window's far edge. A row whose first tiles are all masked (older than the
window) accumulates at the finite mask value; its first visible key rescales that to zero.

Backward: a dq kernel (per query tile, over its kv-tile list) and a dk/dv kernel (per kv tile, over
its q-tile list, `MaskInfo.q_indices`), both on `plgpu.emit_pipeline_warp_specialized` with a
dynamic trip count. dk/dv are produced per query head and summed over each kv head's group.

Contract (see api.py): q [B, T, N, H], k/v [B, S, K, H], bf16 or f16, H a multiple of 64;
block_q == block_kv == 128. The residual is the natural-log
log-sum-exp lse [B, N, T] f32, -inf for rows that see no key (their output is 0).
"""
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

# Finite stand-in for -inf on masked logits (raw, before scaling): keeps exp2 free of inf - inf.
_MASK = -1e30
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_WG_ROWS = 64        # rows of a tile owned by one compute warpgroup (wgmma M)
_COMPUTE_WGS = 2
_STAGES = 2          # TMA ring depth (shared memory holds 2 stages of 128x128 K and V)


def _compiler_params():
  # Lane semantics explicitly: the default changed from Lane (jax 0.10) to Warpgroup (jax 0.11).
  return plgpu.CompilerParams(approx_math=True,
                              lowering_semantics=plgpu.LoweringSemantics.Lane)


# jax 0.11 deprecates load's positional index (and makes it optional); jax 0.10 requires it.
_LOAD_NEEDS_IDX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _load(ref, layout):
  return plgpu.load(ref, (), layout=layout) if _LOAD_NEEDS_IDX else plgpu.load(ref, layout=layout)


def _transposed(ref):
  """ref viewed as its 2-D transpose (ref.transpose is jax 0.11; transpose_ref is deprecated there)."""
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))


def _smem_transforms():
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _row_vector(value, rows, dim):
  """A [rows] f32 vector in the layout of a wgmma accumulator row (dim=1) or column (dim=0)."""
  return plgpu.layout_cast(jnp.full((rows,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(dim))


def _visible_where(x, row0, col0, rows_are_queries, window):
  """Masks x [R, C] (wgmma layout) at token level; row i sits at row0 + i, column j at col0 + j.
  A key is visible to a query at distance d = q - k when 0 <= d (< window)."""
  r = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=plgpu.Layout.WGMMA) + row0
  c = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=plgpu.Layout.WGMMA) + col0
  d = r - c if rows_are_queries else c - r
  x = jnp.where(d >= 0, x, _MASK)
  if window is not None:  # nested selects, not a boolean and: the plainest lowering
    x = jnp.where(d < window, x, _MASK)
  return x


def _masked(x, q0, k0, rows_are_queries, window):
  """x with the hidden pairs masked, under lax.cond so that only partial tiles pay for it: tiles
  crossing the diagonal or the window's far edge. q0 / k0: the first query / key position."""
  n_q, n_k = x.shape if rows_are_queries else x.shape[::-1]
  partial = k0 + n_k - 1 > q0
  if window is not None:
    partial = partial | (q0 + n_q - 1 - k0 >= window)
  row0, col0 = (q0, k0) if rows_are_queries else (k0, q0)
  return lax.cond(partial, lambda x: _visible_where(x, row0, col0, rows_are_queries, window),
                  lambda x: x, x)


def _validate(q, k, block_q, block_kv):
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"q: mosaic_gpu needs bf16 or f16 inputs, got {q.dtype}")
  if q.shape[-1] % 64 or q.shape[-1] > 256:
    raise ValueError(f"q: head dim must be a multiple of 64 and <= 256, got {q.shape[-1]}")
  if block_q != _COMPUTE_WGS * _WG_ROWS:
    raise ValueError(f"block_q: mosaic_gpu needs block_q == 128 (2 warpgroups x 64 rows), got {block_q}")
  if block_kv != 128:  # the dk/dv kernel splits a kv tile over the 2 warpgroups, 64 keys each
    raise ValueError(f"block_kv: mosaic_gpu needs block_kv == 128, got {block_kv}")
  if k.shape[1] % block_kv or q.shape[1] % block_q:
    raise ValueError(f"block_q/block_kv must divide T={q.shape[1]} / S={k.shape[1]}")


def _grid(tiles, n, b, tile_major):
  """CTA grid and names. Default (head-major): consecutive CTAs are the heads of one tile, so the
  CTAs in flight read neighbouring rows of [B, S, K, H] K/V; on an H100 this beat tile-major
  (consecutive CTAs = tiles of one head) by 15-30% on sparse masks at S=32K/128K and lost 4-11% at
  8K (benchmarks/RESULTS.md)."""
  if tile_major:
    return (tiles, n, b), ("tile", "heads", "batch")
  return (n, tiles, b), ("heads", "tile", "batch")


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "causal", "sm_scale", "window",
                                             "tile_major"))
def mha_forward(q, k, v, mask_info, *, block_q, block_kv, causal, sm_scale, window=None,
                tile_major=False):
  """Forward over the tiles in mask_info.kv_indices/kv_counts; one CTA per (q tile, head, batch).

  Returns out [B, T, N, H] (q.dtype) and lse [B, N, T] f32 (natural log; -inf where no key is seen).
  """
  _validate(q, k, block_q, block_kv)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = n // kh
  nq = t // block_q
  rows = _WG_ROWS
  stages = min(_STAGES, s // block_kv)
  scale_log2 = float(sm_scale) * _LOG2E
  offset = s - t  # query i sees key j iff j <= i + offset
  dtype = q.dtype

  def kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, out_ref, lse_ref, scoped):
    (qo_smem2, k_smem, v_smem, lse_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
    bi = lax.axis_index("batch")
    hi = lax.axis_index("heads")
    qi = nq - 1 - lax.axis_index("tile")  # longest causal rows are launched first
    wg = lax.axis_index("wg")
    hk = lax.div(hi, jnp.array(group, hi.dtype))
    num_steps = cnt_ref[bi, hk, qi]

    def take_turn():  # ping-pong the two compute warpgroups on the tensor cores
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      qo_smem = qo_smem2.at[wg]
      row0 = qi * block_q + wg * rows
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, rows), hi], qo_smem, q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg])
      m_i = _row_vector(-jnp.inf, rows, 1)
      l_i = _row_vector(0.0, rows, 1)
      acc = plgpu.layout_cast(jnp.zeros((rows, h), jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(num_steps > 0)
      def _():
        plgpu.barrier_wait(k_ready.at[0])

      pl.when(wg == 1)(take_turn)

      def step(i, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(i, jnp.array(stages, i.dtype))

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, _transposed(k_smem.at[slot]))
          take_turn()
          return acc_ref[...]

        s_blk = pl.run_scoped(qk, plgpu.ACC((rows, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        if causal:
          s_blk = _masked(s_blk, row0 + offset, idx_ref[bi, hk, qi, i] * block_kv, True, window)
        # m is kept in scaled log2 units so that p = exp2(s * c - m) is one FMA per element.
        m_new = jnp.maximum(m_i, s_blk.max(axis=1) * scale_log2)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s_blk * scale_log2 - lax.broadcast_in_dim(m_new, s_blk.shape, [0]))
        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        # Keep the softmax ahead of the barrier (attention_mgpu found this ordering fastest).
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(turn)

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          nxt = i + 1

          @pl.when(nxt < num_steps)
          def _():
            plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.array(stages, nxt.dtype))])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i

      acc, m_i, l_i = lax.fori_loop(0, num_steps, step, (acc, m_i, l_i))
      pl.when(wg == 0)(take_turn)

      # A row that saw no visible key keeps m at -inf or at the scaled mask value.
      seen = m_i > 0.5 * _MASK * scale_log2
      inv_l = jnp.where(seen, 1.0 / l_i, 0.0)
      acc *= lax.broadcast_in_dim(inv_l, acc.shape, [0])
      qo_smem[...] = acc.astype(dtype)
      lse_smem = lse_smem2.at[wg]
      lse_smem[...] = jnp.where(seen, m_i * _LN2 + jnp.log(l_i), -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(row0, rows), hi])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(row0, rows)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def fetch(i, slot):
        kv = (bi, pl.ds(idx_ref[bi, hk, qi, i] * block_kv, block_kv), hk)
        plgpu.copy_gmem_to_smem(k_ref.at[kv], k_smem.at[slot], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[kv], v_smem.at[slot], v_ready.at[slot])

      for i in range(stages):
        pl.when(i < num_steps)(functools.partial(fetch, i, i))

      @pl.loop(0, num_steps - stages)
      def _(j):
        i = j + stages
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        kv = (bi, pl.ds(idx_ref[bi, hk, qi, i] * block_kv, block_kv), hk)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[kv], k_smem.at[slot], k_ready.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[kv], v_smem.at[slot], v_ready.at[slot])

  def entry(q_ref, k_ref, v_ref, idx_ref, cnt_ref, out_ref, lse_ref):
    tr = _smem_transforms()
    smem = (plgpu.SMEM((_COMPUTE_WGS, rows, h), dtype, transforms=tr),
            plgpu.SMEM((stages, block_kv, h), dtype, transforms=tr),
            plgpu.SMEM((stages, block_kv, h), dtype, transforms=tr),
            plgpu.SMEM((_COMPUTE_WGS, rows), jnp.float32))
    ready = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=_COMPUTE_WGS))
    free = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2
    pl.run_scoped(
        lambda *scoped: kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, out_ref, lse_ref, scoped),
        smem, ready, free, plgpu.Barrier(num_arrivals=_COMPUTE_WGS), collective_axes="wg")

  out, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
      grid=_grid(nq, n, b, tile_major)[0],
      grid_names=_grid(nq, n, b, tile_major)[1],
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_compiler_params(),
  )(q, k, v, mask_info.kv_indices.astype(jnp.int32), mask_info.kv_counts.astype(jnp.int32))
  return out, lse


def _dq(q, k, v, do, lse2, delta, idx, cnt, *, block_q, block_kv, causal, window, sm_scale,
        tile_major):
  """dq [B, T, N, H]: per 128-row query tile, over its kv-tile list in 64-key sub-tiles."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = n // kh
  rows = _WG_ROWS
  sub = block_kv // _WG_ROWS  # 64-key sub-tiles per listed kv tile
  scale_log2 = float(sm_scale) * _LOG2E
  offset = s - t
  dtype = q.dtype
  tr = _smem_transforms()

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref, dq_ref,
             smem, ready):
    q_smem2, do_smem2, lse_smem2, delta_smem2 = smem
    bi = lax.axis_index("batch")
    hi = lax.axis_index("heads")
    qi = t // block_q - 1 - lax.axis_index("tile")
    wg = lax.axis_index("wg")
    hk = lax.div(hi, jnp.array(group, hi.dtype))
    num_steps = cnt_ref[bi, hk, qi] * sub

    def kv_tile(i):  # 64-key sub-tile index of pipeline step i
      if sub == 1:
        return idx_ref[bi, hk, qi, i]
      return (idx_ref[bi, hk, qi, lax.div(i, jnp.array(sub, i.dtype))] * sub
              + lax.rem(i, jnp.array(sub, i.dtype)))

    def compute_context(pipeline):
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
      row0 = qi * block_q + wg * rows
      rows_sl = (bi, pl.ds(row0, rows), hi)
      plgpu.copy_gmem_to_smem(q_ref.at[rows_sl], q_smem, ready[0].at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[rows_sl], do_smem, ready[1].at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, pl.ds(row0, rows)], lse_smem, ready[2].at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, pl.ds(row0, rows)], delta_smem, ready[3].at[wg])
      for bar in ready:
        plgpu.barrier_wait(bar.at[wg])
      lse = _load(lse_smem, plgpu.Layout.WGMMA.reduce(1))
      delta = _load(delta_smem, plgpu.Layout.WGMMA.reduce(1))
      dq = plgpu.layout_cast(jnp.zeros((rows, h), jnp.float32), plgpu.Layout.WGMMA)
      dq, _, _ = pipeline((dq, lse, delta))
      q_smem[...] = (dq * sm_scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows_sl])
      plgpu.wait_smem_to_gmem(0)

    def body(indices, k_smem, v_smem, k_free, v_free, carry):
      (i,) = indices
      dq, lse, delta = carry
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      row0 = qi * block_q + wg * rows

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, _transposed(k_smem))
        return acc_ref[...]

      s_blk = pl.run_scoped(qk, plgpu.ACC((rows, rows), jnp.float32))
      if causal:
        s_blk = _masked(s_blk, row0 + offset, kv_tile(i) * rows, True, window)
      p = jnp.exp2(s_blk * scale_log2 - lax.broadcast_in_dim(lse, s_blk.shape, [0]))

      def dp_(acc_ref):
        plgpu.wgmma(acc_ref, do_smem, _transposed(v_smem))
        return acc_ref[...]

      dp = pl.run_scoped(dp_, plgpu.ACC((rows, rows), jnp.float32))
      plgpu.barrier_arrive(v_free)
      ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))

      def dq_(acc_ref):
        plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem)

      dq = pl.run_state(dq_)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(k_free)
      return dq, lse, delta

    spec = plgpu.BlockSpec(block_shape=(rows, h), index_map=lambda i: (kv_tile(i), 0),
                           transforms=tr)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(num_steps,), max_concurrent_steps=_STAGES, num_compute_wgs=_COMPUTE_WGS,
        memory_registers=40, wg_axis="wg", manual_consumed_barriers=True,
        compute_context=compute_context, in_specs=[spec, spec])
    pipeline(k_ref.at[bi, :, hk, :], v_ref.at[bi, :, hk, :])

  rows_smem = plgpu.SMEM((_COMPUTE_WGS, rows, h), dtype, transforms=tr)
  vec_smem = plgpu.SMEM((_COMPUTE_WGS, rows), jnp.float32)
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=[(rows_smem, rows_smem, vec_smem, vec_smem),
                     (plgpu.Barrier(num_barriers=_COMPUTE_WGS),) * 4],
      grid=_grid(t // block_q, n, b, tile_major)[0],
      grid_names=_grid(t // block_q, n, b, tile_major)[1],
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_compiler_params(),
  )(q, k, v, do, lse2, delta, idx, cnt)


def _dkv(q, k, v, do, lse2, delta, idx, cnt, *, block_q, block_kv, causal, window, sm_scale,
         tile_major):
  """dk, dv per query head [B, S, N, H]: per 128-key tile, over its q-tile list in 64-row sub-tiles."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = n // kh
  rows = _WG_ROWS
  sub = block_q // _WG_ROWS
  scale_log2 = float(sm_scale) * _LOG2E
  offset = s - t
  dtype = q.dtype
  tr = _smem_transforms()

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref, dk_ref, dv_ref,
             smem, ready):
    k_smem2, v_smem2 = smem
    bi = lax.axis_index("batch")
    hi = lax.axis_index("heads")
    kj = s // block_kv - 1 - lax.axis_index("tile")
    wg = lax.axis_index("wg")
    hk = lax.div(hi, jnp.array(group, hi.dtype))
    num_steps = cnt_ref[bi, hk, kj] * sub

    def q_tile(i):  # 64-row sub-tile index of pipeline step i
      return (idx_ref[bi, hk, kj, lax.div(i, jnp.array(sub, i.dtype))] * sub
              + lax.rem(i, jnp.array(sub, i.dtype)))

    def compute_context(pipeline):
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      key0 = kj * block_kv + wg * rows
      keys_sl = (bi, pl.ds(key0, rows), hk)
      plgpu.copy_gmem_to_smem(k_ref.at[keys_sl], k_smem, ready[0].at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[keys_sl], v_smem, ready[1].at[wg])
      plgpu.barrier_wait(ready[0].at[wg])
      plgpu.barrier_wait(ready[1].at[wg])
      zeros = plgpu.layout_cast(jnp.zeros((rows, h), jnp.float32), plgpu.Layout.WGMMA)
      dk, dv = pipeline((zeros, zeros))
      k_smem[...] = (dk * sm_scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      out_sl = (bi, pl.ds(key0, rows), hi)
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[out_sl], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[out_sl], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    def body(indices, q_smem, do_smem, lse_smem, delta_smem, q_free, do_free, lse_free, delta_free,
             carry):
      (i,) = indices
      dk, dv = carry
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      key0 = kj * block_kv + wg * rows

      def kq(acc_ref):
        plgpu.wgmma(acc_ref, k_smem, _transposed(q_smem))
        return acc_ref[...]

      s_t = pl.run_scoped(kq, plgpu.ACC((rows, rows), jnp.float32))  # [keys, queries]
      if causal:
        s_t = _masked(s_t, q_tile(i) * rows + offset, key0, False, window)
      lse = _load(lse_smem, plgpu.Layout.WGMMA.reduce(0))
      plgpu.barrier_arrive(lse_free)
      p_t = jnp.exp2(s_t * scale_log2 - lax.broadcast_in_dim(lse, s_t.shape, [1]))

      def dv_dp(refs):
        dv_ref, dp_ref = refs
        plgpu.wgmma(dv_ref, p_t.astype(dtype), do_smem)
        plgpu.wgmma(dp_ref, v_smem, _transposed(do_smem))

      zeros = plgpu.layout_cast(jnp.zeros((rows, rows), jnp.float32), plgpu.Layout.WGMMA)
      dv, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
      plgpu.barrier_arrive(do_free)
      delta = _load(delta_smem, plgpu.Layout.WGMMA.reduce(0))
      plgpu.barrier_arrive(delta_free)
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))

      def dk_(acc_ref):
        plgpu.wgmma(acc_ref, ds_t.astype(dtype), q_smem)

      dk = pl.run_state(dk_)(plgpu.ACC.init(dk))
      plgpu.barrier_arrive(q_free)
      return dk, dv

    tile_spec = plgpu.BlockSpec(block_shape=(rows, h), index_map=lambda i: (q_tile(i), 0),
                                transforms=tr)
    vec_spec = plgpu.BlockSpec(block_shape=(rows,), index_map=lambda i: (q_tile(i),))
    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(num_steps,), max_concurrent_steps=_STAGES, num_compute_wgs=_COMPUTE_WGS,
        memory_registers=40, wg_axis="wg", manual_consumed_barriers=True,
        compute_context=compute_context, in_specs=[tile_spec, tile_spec, vec_spec, vec_spec])
    pipeline(q_ref.at[bi, :, hi, :], do_ref.at[bi, :, hi, :], lse_ref.at[bi, hi, :],
             delta_ref.at[bi, hi, :])

  kv_smem = plgpu.SMEM((_COMPUTE_WGS, rows, h), dtype, transforms=tr)
  out = jax.ShapeDtypeStruct((b, s, n, h), dtype)
  return plgpu.kernel(
      kernel,
      out_type=(out, out),
      scratch_types=[(kv_smem, kv_smem), (plgpu.Barrier(num_barriers=_COMPUTE_WGS),) * 2],
      grid=_grid(s // block_kv, n, b, tile_major)[0],
      grid_names=_grid(s // block_kv, n, b, tile_major)[1],
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_compiler_params(),
  )(q, k, v, do, lse2, delta, idx, cnt)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "causal", "sm_scale", "window",
                                             "tile_major"))
def mha_backward(q, k, v, out, lse, do, mask_info, *, block_q, block_kv, causal, sm_scale,
                 window=None, tile_major=False):
  """Gradients (dq, dk, dv) in the input dtypes, from the forward's out and lse [B, N, T]."""
  _validate(q, k, block_q, block_kv)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), do.astype(jnp.float32))
  # log2-domain lse; rows that saw nothing get +inf so that every p = exp2(. - lse) is 0.
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * _LOG2E).astype(jnp.float32)
  do = do.astype(q.dtype)
  kw = dict(block_q=block_q, block_kv=block_kv, causal=causal, window=window, sm_scale=sm_scale,
            tile_major=tile_major)
  dq = _dq(q, k, v, do, lse2, delta, mask_info.kv_indices.astype(jnp.int32),
           mask_info.kv_counts.astype(jnp.int32), **kw)
  dk, dv = _dkv(q, k, v, do, lse2, delta, mask_info.q_indices.astype(jnp.int32),
                mask_info.q_counts.astype(jnp.int32), **kw)
  if n != kh:  # per-query-head partials -> sum over each kv head's group
    dk = dk.reshape(b, s, kh, n // kh, h).astype(jnp.float32).sum(3).astype(k.dtype)
    dv = dv.reshape(b, s, kh, n // kh, h).astype(jnp.float32).sum(3).astype(v.dtype)
  return dq, dk, dv

"""Mosaic TPU grouped matmuls (megablox-style): gmm (forward / input gradient) and tgmm (weight grad).

The group metadata of `metadata.group_metadata` (computed on device) is scalar-prefetched into SMEM
and read by the BlockSpec index maps, so the pipeline DMAs the row tile and group matrix of each
visit. gmm grid: (F tiles, visits, D tiles) with the D reduction innermost in a float32 VMEM
accumulator; the output tile stays resident across the consecutive visits of one row tile and each
visit overwrites only its group's rows (rows past sum(group_sizes): a trailing group writing 0).
tgmm grid: (D tiles, F tiles, visits): the [D, F] tile of one group accumulates over that group's
consecutive visits (rows of other groups masked to zero) and is stored at its last one; an empty
group gets one visit that stores zeros. Steps past num_visits re-address the last visit's blocks
(no new DMA) and skip compute.
On real TPUs block_k and block_n should be multiples of 128 and block_m of 8 (16 for bf16);
interpret mode (CPU) takes any sizes.
"""
import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from . import metadata as md

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _dot(a, b, dims):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _row_mask(starts_ref, ends_ref, g, tile, shape):
  rows = tile * shape[0] + lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= starts_ref[g]) & (rows < ends_ref[g])


def _gmm_kernel(starts_ref, ends_ref, group_ref, tile_ref, nv_ref, x_ref, w_ref, o_ref, acc_ref, *,
                num_groups, transpose_rhs):
  v, k = pl.program_id(1), pl.program_id(2)
  g, tile = group_ref[v], tile_ref[v]

  @pl.when(v < nv_ref[0])
  def _visit():
    @pl.when(k == 0)
    def _init():
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(g < num_groups)  # the trailing group (rows past sum(group_sizes)) keeps acc = 0
    def _accumulate():
      acc_ref[...] += _dot(x_ref[...], w_ref[...], _NT if transpose_rhs else _NN)

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
      keep = _row_mask(starts_ref, ends_ref, g, tile, o_ref.shape)
      o_ref[...] = jnp.where(keep, acc_ref[...].astype(o_ref.dtype), o_ref[...])


def _cost(m, d, f, dtype, weight_elems):
  """What XLA's scheduler and cost analysis see of one call: 2 M D F flops; rows and weights once."""
  return pl.CostEstimate(flops=2 * m * d * f, transcendentals=0,
                         bytes_accessed=(m * (d + f) + weight_elems) * jnp.dtype(dtype).itemsize)


def _check_tiles(name, dim, block):
  if dim % block:
    raise ValueError(f"pallas_tpu: {name}={block} must divide the dimension {dim}")


def gmm(x_MD, w_EDF, group_sizes_E, *, block_sizes, transpose_rhs=False, interpret=False):
  """[M, F] in x's dtype: row m times w[group(m)] (or its transpose); trailing rows 0."""
  m, d = x_MD.shape
  e = w_EDF.shape[0]
  f = w_EDF.shape[1] if transpose_rhs else w_EDF.shape[2]
  bm, bk, bn = block_sizes.block_m, block_sizes.block_k, block_sizes.block_n
  _check_tiles("block_k", d, bk)
  _check_tiles("block_n", f, bn)
  meta = md.group_metadata(group_sizes_E, m, bm, trailing_group=True, visit_empty=False)
  last_group = e - 1

  def x_map(n, v, k, starts, ends, group, tile, nv):
    return tile[v], k

  def w_map(n, v, k, starts, ends, group, tile, nv):
    g = jnp.minimum(group[v], last_group)
    return (g, n, k) if transpose_rhs else (g, k, n)

  def o_map(n, v, k, starts, ends, group, tile, nv):
    return tile[v], n

  w_block = (None, bn, bk) if transpose_rhs else (None, bk, bn)
  kernel = lambda *refs: _gmm_kernel(*refs, num_groups=e, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5, grid=(f // bn, meta.visit_group_V.shape[0], d // bk),
          in_specs=[pl.BlockSpec((bm, bk), x_map), pl.BlockSpec(w_block, w_map)],
          out_specs=pl.BlockSpec((bm, bn), o_map),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((m, f), x_MD.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      cost_estimate=_cost(m, d, f, x_MD.dtype, e * d * f),
      interpret=interpret, name="gmm_nt" if transpose_rhs else "gmm")(*meta, x_MD, w_EDF)


def _tgmm_kernel(starts_ref, ends_ref, group_ref, tile_ref, nv_ref, x_ref, dy_ref, o_ref, acc_ref):
  v = pl.program_id(2)
  nv = nv_ref[0]
  g, tile = group_ref[v], tile_ref[v]
  first = (v == 0) | (group_ref[jnp.maximum(v - 1, 0)] != g)
  last = (v == nv - 1) | (group_ref[jnp.minimum(v + 1, group_ref.shape[0] - 1)] != g)

  @pl.when(v < nv)
  def _visit():
    @pl.when(first)
    def _init():
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    # Rows of other groups (and garbage past the last row) must be zeroed in BOTH operands.
    x = x_ref[...]
    dy = dy_ref[...]
    x = jnp.where(_row_mask(starts_ref, ends_ref, g, tile, x.shape), x, 0)
    dy = jnp.where(_row_mask(starts_ref, ends_ref, g, tile, dy.shape), dy, 0)
    acc_ref[...] += _dot(x, dy, _TN)

    @pl.when(last)
    def _store():
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tgmm(x_MD, dy_MF, group_sizes_E, *, block_sizes, interpret=False):
  """[E, D, F] in x's dtype: per group x[rows]^T dy[rows] (empty groups 0)."""
  m, d = x_MD.shape
  f = dy_MF.shape[1]
  e = group_sizes_E.shape[0]
  bm, bd, bf = block_sizes.tgmm_block_m, block_sizes.tgmm_block_d, block_sizes.tgmm_block_f
  _check_tiles("tgmm_block_d", d, bd)
  _check_tiles("tgmm_block_f", f, bf)
  meta = md.group_metadata(group_sizes_E, m, bm, trailing_group=False, visit_empty=True)

  def x_map(i, j, v, starts, ends, group, tile, nv):
    return tile[v], i

  def dy_map(i, j, v, starts, ends, group, tile, nv):
    return tile[v], j

  def o_map(i, j, v, starts, ends, group, tile, nv):
    return group[v], i, j

  return pl.pallas_call(
      _tgmm_kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5, grid=(d // bd, f // bf, meta.visit_group_V.shape[0]),
          in_specs=[pl.BlockSpec((bm, bd), x_map), pl.BlockSpec((bm, bf), dy_map)],
          out_specs=pl.BlockSpec((None, bd, bf), o_map),
          scratch_shapes=[pltpu.VMEM((bd, bf), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((e, d, f), x_MD.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(m, d, f, x_MD.dtype, e * d * f),
      interpret=interpret, name="tgmm")(*meta, x_MD, dy_MF)

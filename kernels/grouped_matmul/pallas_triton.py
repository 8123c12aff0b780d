"""Triton-backend (GPU) grouped matmuls: gmm (forward / input gradient) and tgmm (weight gradient).

gmm: a grid of (column tile of F, visit) programs; visit v is one (group, row tile) pair from
`metadata.group_metadata` (computed on device, read by each program from global memory), so there
is no trace-time loop over groups. Each program multiplies its whole row tile by its group's
[D, block_n] panel over a loop of block_k chunks and stores only its group's rows (a masked store:
a tile shared by two groups is computed twice and each keeps its rows). Rows past sum(group_sizes)
form a trailing pseudo-group whose visits store zeros. Column tiles vary fastest in launch order,
so the programs of one visit run together and share the row tile and the group's weights in L2.
tgmm: one program per (D tile, F tile, group) looping over the group's rows in block_m chunks
(dynamic trip count; an empty group stores zeros).
On a GPU tl.dot lowers to wgmma on sm90 (Hopper). Block sizes must be powers of two >= 16 there;
interpret mode (CPU) takes any sizes.
"""
import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from . import metadata as md


def _dot(a, b, dims):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _gmm_kernel(starts_ref, ends_ref, group_ref, tile_ref, nv_ref, x_ref, w_ref, o_ref, *, m,
                num_groups, block_m, block_k, block_n, k_dim, transpose_rhs):
  j, v = pl.program_id(0), pl.program_id(1)

  @pl.when(v < nv_ref[0])
  def _visit():
    g, tile = group_ref[v], tile_ref[v]
    rows = tile * block_m + jnp.arange(block_m)
    keep = (rows >= starts_ref[g]) & (rows < ends_ref[g])
    cols = pl.ds(j * block_n, block_n)
    o_rows = pl.ds(tile * block_m, block_m)

    @pl.when(g < num_groups)
    def _matmul():
      in_bounds = (rows < m)[:, None]

      def body(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
        a = plgpu.load(x_ref.at[o_rows, ks], mask=in_bounds, other=0)
        if transpose_rhs:
          return acc + _dot(a, w_ref[g, cols, ks], _NT)
        return acc + _dot(a, w_ref[g, ks, cols], _NN)
      acc = lax.fori_loop(0, k_dim // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
      plgpu.store(o_ref.at[o_rows, cols], acc.astype(o_ref.dtype), mask=keep[:, None])

    @pl.when(g == num_groups)  # rows past sum(group_sizes)
    def _zeros():
      plgpu.store(o_ref.at[o_rows, cols], jnp.zeros((block_m, block_n), o_ref.dtype),
                  mask=keep[:, None])


def gmm(x_MD, w_EDF, group_sizes_E, *, block_sizes, transpose_rhs=False, interpret=False):
  """[M, F] in x's dtype: row m times w[group(m)] (or its transpose); trailing rows 0."""
  m, d = x_MD.shape
  e = w_EDF.shape[0]
  f = w_EDF.shape[1] if transpose_rhs else w_EDF.shape[2]
  bm, bk, bn = block_sizes.block_m, block_sizes.block_k, block_sizes.block_n
  meta = md.group_metadata(group_sizes_E, m, bm, trailing_group=True, visit_empty=False)
  # On a GPU masked loads/stores cover a last partial tile. The interpreter clamps out-of-range
  # slices instead of masking them, so there the rows are padded to whole tiles.
  mp = md.cdiv(m, bm) * bm if interpret else m
  if mp != m:
    x_MD = jnp.pad(x_MD, ((0, mp - m), (0, 0)))
  kernel = lambda *refs: _gmm_kernel(*refs, m=m, num_groups=e, block_m=bm, block_k=bk,
                                     block_n=bn, k_dim=d, transpose_rhs=transpose_rhs)
  out = pl.pallas_call(
      kernel, grid=(f // bn, meta.visit_group_V.shape[0]),
      out_shape=jax.ShapeDtypeStruct((mp, f), x_MD.dtype),
      compiler_params=_params(block_sizes.num_warps, block_sizes.num_stages), interpret=interpret,
      name="gmm_nt" if transpose_rhs else "gmm")(*meta, x_MD, w_EDF)
  return out[:m] if mp != m else out


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, o_ref, *, block_m, block_d, block_f):
  i, j, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[g], ends_ref[g]
  ds, fs = pl.ds(i * block_d, block_d), pl.ds(j * block_f, block_f)

  def body(c, acc):
    rows = start + c * block_m + jnp.arange(block_m)
    keep = (rows < end)[:, None]
    r = pl.ds(start + c * block_m, block_m)
    a = plgpu.load(x_ref.at[r, ds], mask=keep, other=0)
    b = plgpu.load(dy_ref.at[r, fs], mask=keep, other=0)
    return acc + _dot(a, b, _TN)
  acc = lax.fori_loop(0, md.cdiv(end - start, block_m), body,
                      jnp.zeros((block_d, block_f), jnp.float32))
  o_ref[g, ds, fs] = acc.astype(o_ref.dtype)


def tgmm(x_MD, dy_MF, group_sizes_E, *, block_sizes, interpret=False):
  """[E, D, F] in x's dtype: per group x[rows]^T dy[rows] (empty groups 0)."""
  m, d = x_MD.shape
  f = dy_MF.shape[1]
  e = group_sizes_E.shape[0]
  bm, bd, bf = block_sizes.tgmm_block_m, block_sizes.tgmm_block_d, block_sizes.tgmm_block_f
  ends = jnp.minimum(jnp.cumsum(group_sizes_E.astype(jnp.int32)), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  kernel = lambda *refs: _tgmm_kernel(*refs, block_m=bm, block_d=bd, block_f=bf)
  if interpret:  # see gmm: the interpreter clamps slices that run past the last row
    x_MD, dy_MF = (jnp.pad(a, ((0, bm), (0, 0))) for a in (x_MD, dy_MF))
  return pl.pallas_call(
      kernel, grid=(d // bd, f // bf, e), out_shape=jax.ShapeDtypeStruct((e, d, f), x_MD.dtype),
      compiler_params=_params(block_sizes.tgmm_num_warps, block_sizes.tgmm_num_stages),
      interpret=interpret, name="tgmm")(
          starts, ends, x_MD, dy_MF)

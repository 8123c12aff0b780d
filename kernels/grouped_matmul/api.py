"""grouped_matmul: one entry point over the XLA references and the Pallas kernels, with a custom VJP.

  grouped_matmul(x_MD, w_EDF, group_sizes_E) -> y_MF, y[m] = x[m] @ w[group(m)]
  d/dx = gmm(dy, w, transpose_rhs=True); d/dw = tgmm(x, dy) (per-group x^T dy).

Backend modules (reference.py, pallas_tpu.py, pallas_triton.py) share one contract:
  gmm(x_MD, w_EDF, group_sizes_E, *, block_sizes, transpose_rhs, interpret) -> [M, F]
  tgmm(x_MD, dy_MF, group_sizes_E, *, block_sizes, interpret) -> [E, D, F]
and raise ValueError for shapes they do not support; the API then falls back (see _FALLBACKS) and
logs a WARNING once per (implementation, reason).
"""
import dataclasses
import functools
import importlib
import logging

import jax
import jax.numpy as jnp

from . import reference

IMPLEMENTATIONS = ("xla", "ragged_dot", "pallas_tpu", "pallas_triton")
_FALLBACKS = {"pallas_tpu": "xla", "pallas_triton": "xla"}
_MODULES = {"pallas_tpu": "pallas_tpu", "pallas_triton": "pallas_triton"}
_warned = set()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles. gmm (forward and input gradient): block_m rows x block_n output columns, reducing over
  block_k. tgmm (weight gradient): tgmm_block_d x tgmm_block_f output tiles, reducing over
  tgmm_block_m rows. num_warps/num_stages (gmm) and tgmm_num_warps/tgmm_num_stages: Triton only.
  The XLA path uses block_m as its padding block."""
  block_m: int = 128
  block_k: int = 64
  block_n: int = 128
  tgmm_block_m: int = 64
  tgmm_block_d: int = 128
  tgmm_block_f: int = 128
  num_warps: int | None = 8
  num_stages: int | None = 3
  tgmm_num_warps: int | None = 8
  tgmm_num_stages: int | None = 3

  def __post_init__(self):
    for f in dataclasses.fields(self):
      val = getattr(self, f.name)
      if "num_" in f.name and val is None:
        continue
      if not isinstance(val, int) or val <= 0:
        raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {val!r}")


# Triton tiles measured on one H200 (benchmarks/moe.py, 2026-12-01): with few rows per group
# (M2's 256 experts at 16K rows: 64 per group) 64-row tiles waste less of each tile; with many,
# 128 x 256 tiles reuse operands more. The weight gradient's best tiles did not depend on it.
TRITON_SMALL_GROUPS = BlockSizes(block_m=64, block_k=64, block_n=128, num_warps=4, num_stages=4,
                                 tgmm_block_m=64, tgmm_block_d=128, tgmm_block_f=128)
TRITON_LARGE_GROUPS = BlockSizes(block_m=128, block_k=64, block_n=256, num_warps=8, num_stages=3,
                                 tgmm_block_m=64, tgmm_block_d=128, tgmm_block_f=128)

# Mixtral's 8 experts (2K rows each): the weight gradient gains 12% from 128 x 256 output tiles.
TRITON_HUGE_GROUPS = dataclasses.replace(TRITON_LARGE_GROUPS, tgmm_block_m=32, tgmm_block_f=256,
                                         tgmm_num_stages=4)


def triton_block_sizes(m: int, num_groups: int) -> BlockSizes:
  """The Triton tiles for M rows over num_groups groups, by mean group size (< 128, < 1024, more)."""
  if m < 128 * num_groups:
    return TRITON_SMALL_GROUPS
  return TRITON_LARGE_GROUPS if m < 1024 * num_groups else TRITON_HUGE_GROUPS


DEFAULT_BLOCK_SIZES = {
    "xla": BlockSizes(),
    "ragged_dot": BlockSizes(),
    "pallas_triton": TRITON_LARGE_GROUPS,
    # Mosaic: lane-dense 128-multiples; bigger tiles amortize the ~0.35 us per grid step.
    "pallas_tpu": BlockSizes(block_m=256, block_k=512, block_n=512, tgmm_block_m=256,
                             tgmm_block_d=512, tgmm_block_f=512),
}


def default_implementation(backend=None):
  """Best implementation for `backend` (default: jax's default backend): pallas_tpu on TPU,
  pallas_triton on GPU (XLA:GPU expands ragged_dot E-fold), the blocked XLA path on CPU."""
  backend = backend or jax.default_backend()
  return {"tpu": "pallas_tpu", "gpu": "pallas_triton"}.get(backend, "xla")


def _module(implementation):
  if implementation in ("xla", "ragged_dot"):
    return None
  return importlib.import_module(f".{_MODULES[implementation]}", __package__)


def _pow2_tile(name, block, dim, implementation):
  """The tile actually used along a dimension of size dim: min(block, dim), which must divide dim
  (and, for Triton, be a power of two)."""
  b = min(block, dim)
  if dim % b:
    raise ValueError(f"{implementation}: {name}={b} must divide the dimension {dim}")
  if implementation == "pallas_triton" and b & (b - 1):
    raise ValueError(f"{implementation}: {name}={b} must be a power of two (dimension {dim})")
  return b


def _fit_blocks(bs, implementation, m, d, f):
  """bs with tiles clipped to the shapes; ValueError if the kernel cannot tile them."""
  if implementation in ("xla", "ragged_dot"):
    return bs
  fit = lambda name, dim: _pow2_tile(name, getattr(bs, name), dim, implementation)
  rows = lambda name: max(8, min(getattr(bs, name), 1 << max(0, (m - 1).bit_length())))
  # gmm runs twice: forward [M, D] x [D, F] and input grad [M, F] x [F, D]: both dims tile both ways.
  k = min(fit("block_k", d), fit("block_k", f))
  n = min(fit("block_n", f), fit("block_n", d))
  return dataclasses.replace(
      bs, block_m=rows("block_m"), block_k=k, block_n=n, tgmm_block_m=rows("tgmm_block_m"),
      tgmm_block_d=fit("tgmm_block_d", d), tgmm_block_f=fit("tgmm_block_f", f))


@dataclasses.dataclass(frozen=True)
class _Static:
  implementation: str
  block_sizes: BlockSizes
  interpret: bool


def _gmm(x, w, gs, st, transpose_rhs=False):
  if st.implementation == "xla":
    return reference.gmm_blocked(x, w, gs, transpose_rhs=transpose_rhs, block=st.block_sizes.block_m)
  if st.implementation == "ragged_dot":
    return reference.gmm_ragged_dot(x, w, gs, transpose_rhs=transpose_rhs)
  return _module(st.implementation).gmm(x, w, gs, block_sizes=st.block_sizes,
                                        transpose_rhs=transpose_rhs, interpret=st.interpret)


def _tgmm(x, dy, gs, st):
  if st.implementation == "xla":
    return reference.tgmm_blocked(x, dy, gs, block=st.block_sizes.block_m)
  if st.implementation == "ragged_dot":
    return reference.tgmm_ragged_dot(x, dy, gs)
  return _module(st.implementation).tgmm(x, dy, gs, block_sizes=st.block_sizes,
                                         interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(x, w, gs, st):
  return _gmm(x, w, gs, st)


def _fwd(x, w, gs, st):
  return _gmm(x, w, gs, st), (x, w, gs)


def _bwd(st, res, dy):
  x, w, gs = res
  dy = dy.astype(x.dtype)
  return _gmm(dy, w, gs, st, transpose_rhs=True), _tgmm(x, dy, gs, st).astype(w.dtype), None


_grouped_matmul.defvjp(_fwd, _bwd)


def _warn_once(implementation, reason):
  if (implementation, reason) not in _warned:
    _warned.add((implementation, reason))
    logging.warning("grouped_matmul: %s falls back to %s: %s", implementation,
                    _FALLBACKS[implementation], reason)


def _validate(x_MD, w_EDF, group_sizes_E, implementation):
  if getattr(x_MD, "ndim", None) != 2:
    raise ValueError(f"x_MD must be 2-D [M, D], got shape {getattr(x_MD, 'shape', None)}")
  if getattr(w_EDF, "ndim", None) != 3:
    raise ValueError(f"w_EDF must be 3-D [E, D, F], got shape {getattr(w_EDF, 'shape', None)}")
  if w_EDF.shape[1] != x_MD.shape[1]:
    raise ValueError(f"w_EDF shape {w_EDF.shape} must be [E, D={x_MD.shape[1]}, F] to match x_MD "
                     f"{x_MD.shape}")
  if not jnp.issubdtype(x_MD.dtype, jnp.floating) or w_EDF.dtype != x_MD.dtype:
    raise ValueError(f"x_MD and w_EDF must share one floating dtype, got {x_MD.dtype} and "
                     f"{w_EDF.dtype}")
  if getattr(group_sizes_E, "shape", None) != (w_EDF.shape[0],) or not jnp.issubdtype(
      group_sizes_E.dtype, jnp.integer):
    raise ValueError(f"group_sizes_E must be integer [E={w_EDF.shape[0]}], got "
                     f"{getattr(group_sizes_E, 'dtype', None)}{getattr(group_sizes_E, 'shape', None)}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")


def grouped_matmul(x_MD, w_EDF, group_sizes_E, *, implementation=None, block_sizes=None,
                   interpret=False):
  """Grouped matmul: group e is the next group_sizes_E[e] rows of x_MD, times w_EDF[e].

  Args:
    x_MD: [M, D] rows sorted by group. w_EDF: [E, D, F], x's dtype (float32 or bfloat16).
    group_sizes_E: int [E], sum <= M; rows past the sum come out 0 (and get zero gradients).
    implementation: 'xla' (blocked batched matmul; the CPU path), 'ragged_dot' (jax.lax.ragged_dot;
      XLA:TPU's native grouped matmul, XLA:GPU expands it E-fold), 'pallas_tpu', 'pallas_triton',
      or None for the backend's best (default_implementation). A kernel that cannot tile the
      shapes (or Triton on a non-GPU default backend without interpret) falls back to 'xla' with a WARNING
      logged once.
    block_sizes: BlockSizes (default per implementation); tiles are clipped to the shapes.
    interpret: run Pallas kernels in interpret mode (CPU).
  Returns:
    [M, F] in x's dtype (float32 accumulation). Differentiable in x_MD and w_EDF.
  """
  chosen = implementation or default_implementation()
  _validate(x_MD, w_EDF, group_sizes_E, chosen)
  m, d = x_MD.shape
  f = w_EDF.shape[2]
  bs = block_sizes or (triton_block_sizes(m, w_EDF.shape[0]) if chosen == "pallas_triton"
                       else DEFAULT_BLOCK_SIZES[chosen])
  if not isinstance(bs, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {type(bs).__name__}")
  if m == 0:
    return jnp.zeros((0, f), x_MD.dtype)
  try:
    if chosen == "pallas_triton" and not interpret and jax.default_backend() != "gpu":
      raise ValueError(f"needs a GPU (backend {jax.default_backend()}) or interpret=True")
    # (No such check for pallas_tpu: it is compiled ahead of time for TPU topologies from a CPU host.)
    bs = _fit_blocks(bs, chosen, m, d, f)
  except ValueError as err:
    _warn_once(chosen, str(err))
    chosen, bs = _FALLBACKS[chosen], block_sizes or DEFAULT_BLOCK_SIZES[_FALLBACKS[chosen]]
  if chosen == "ragged_dot":  # XLA differentiates its own op (its transposes are ragged dots too)
    return reference.gmm_ragged_dot(x_MD, w_EDF, group_sizes_E)
  return _grouped_matmul(x_MD, w_EDF, group_sizes_E.astype(jnp.int32), _Static(chosen, bs, bool(interpret)))

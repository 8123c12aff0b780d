"""block_sparse_attention: one entry point over the reference and the Pallas kernels.

Backend modules share one contract (pallas_tpu.py, pallas_triton.py, and mosaic_gpu.py, written
separately):
  mha_forward(q, k, v, mask_info, *, block_q, block_kv, causal, window, sm_scale) -> (out, res)
  mha_backward(q, k, v, out, res, do, mask_info, *, block_q, block_kv, causal, window, sm_scale)
      -> (dq, dk, dv)
where `res` is whatever the forward saves for its own backward (a log-sum-exp [B, N, T] f32 in each
kernel here, natural or base 2 as that module chooses) and mask_info is a `mask_info.MaskInfo` of the
causally (and window-) pruned block mask. pallas_tpu and pallas_triton also take `interpret`.

Tiles are empty (not listed), full or partial (splash attention's classification): a listed tile
whose (query, key) pairs are not all visible under `causal` / `window` applies the token-level mask
q_pos - window < k_pos <= q_pos inside; full tiles skip it. The mask is analytic (positions only),
so it costs no memory.

A module raises ValueError for shapes or options (a window) it does not support;
implementation=None then falls back (see _FALLBACKS) and logs which one ran and why.
"""
import dataclasses
import functools
import importlib
import logging
import math

import jax
import jax.numpy as jnp

from . import mask_info as mask_info_lib
from . import masks as masks_lib
from . import reference

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_triton", "pallas_mosaic_gpu")
_FALLBACKS = {"pallas_mosaic_gpu": ("pallas_mosaic_gpu", "pallas_triton", "xla"),
              "pallas_triton": ("pallas_triton", "xla")}
_MODULES = {"pallas_tpu": "pallas_tpu", "pallas_triton": "pallas_triton",
            "pallas_mosaic_gpu": "mosaic_gpu"}


def _is_hopper():
  try:
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")
  except RuntimeError:
    return False


def default_implementation(backend=None):
  """Best implementation for `backend` (default: jax's default backend)."""
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "pallas_tpu"
  if backend == "gpu":
    if _is_hopper():
      try:
        _backend_module("pallas_mosaic_gpu")
        return "pallas_mosaic_gpu"
      except ImportError:
        pass
    return "pallas_triton"
  return "xla"


def _backend_module(implementation):
  # Lazy: Triton/Mosaic-GPU imports are only needed when that path runs.
  return importlib.import_module(f".{_MODULES[implementation]}", __package__)


def _padding(t, s, block_q, block_kv, causal):
  """Rows p appended to both q and k/v so their lengths become block multiples, or None if that is
  not exact. Equal padding keeps the causal offset S - T, and padded keys (positions >= S) then lie
  after every real query, so the causal mask hides them; padded query rows are dropped."""
  p = -t % block_q
  if p == 0 and s % block_kv == 0:
    return 0
  if causal and (s + p) % block_kv == 0:
    return p
  return None


def _validate(q, k, v, block_mask, block_q, block_kv, causal, window, implementation):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D [B, len, heads, head_dim], got shape {getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
  b, t, n, h = q.shape
  _, s, kh, _ = k.shape
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"k and v must have q's dtype {q.dtype}, got k {k.dtype}, v {v.dtype}")
  if k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"k shape {k.shape} must be [B={b}, S, K, H={h}] to match q {q.shape}")
  if v.shape != k.shape:
    raise ValueError(f"v shape {v.shape} must equal k shape {k.shape}")
  if kh == 0 or n % kh:
    raise ValueError(f"q heads {n} must be a multiple of k/v heads {kh} (q {q.shape}, k {k.shape})")
  for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
    if not isinstance(blk, int) or blk <= 0:
      raise ValueError(f"{name} must be a positive int, got {blk!r}")
  pad = _padding(t, s, block_q, block_kv, causal)
  if pad is None:
    for name, blk, length in (("block_q", block_q, t), ("block_kv", block_kv, s)):
      if length % blk:
        raise ValueError(f"{name}={blk} must divide the sequence length {length} (lengths that are "
                         "not block multiples need causal=True and T - S a multiple of block_kv)")
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
      raise ValueError(f"window must be a positive int or None, got {window!r}")
    if not causal:
      raise ValueError("window needs causal=True (the window is q_pos - window < k_pos <= q_pos)")
  want = (b, kh, -(-t // block_q), -(-s // block_kv))
  if tuple(getattr(block_mask, "shape", ())) != want:
    raise ValueError(f"block_mask shape {getattr(block_mask, 'shape', None)} must be [B, K, "
                     f"ceil(T/block_q), ceil(S/block_kv)] = {want}")
  if block_mask.dtype != jnp.bool_:
    raise ValueError(f"block_mask must be bool, got dtype {block_mask.dtype}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
  implementation: str
  block_q: int
  block_kv: int
  causal: bool
  window: int | None
  sm_scale: float
  interpret: bool

  def kwargs(self):
    kw = dict(block_q=self.block_q, block_kv=self.block_kv, causal=self.causal, window=self.window,
              sm_scale=self.sm_scale)
    if self.implementation != "pallas_mosaic_gpu":
      kw["interpret"] = self.interpret
    return kw


def _forward(q, k, v, block_mask, st):
  info = mask_info_lib.make_mask_info(block_mask)
  out = _backend_module(st.implementation).mha_forward(q, k, v, info, **st.kwargs())
  out, res = out if isinstance(out, tuple) else (out, None)
  return out, (q, k, v, out, res, info)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel_attention(q, k, v, block_mask, st):
  return _forward(q, k, v, block_mask, st)[0]


def _kernel_attention_bwd(st, residuals, do):
  q, k, v, out, res, info = residuals
  dq, dk, dv = _backend_module(st.implementation).mha_backward(
      q, k, v, out, res, do, info, **st.kwargs())
  return dq, dk, dv, None  # block_mask is not differentiable


_kernel_attention.defvjp(_forward, _kernel_attention_bwd)


def _supports(q, k, v, block_mask, st):
  """Whether st.implementation traces forward and backward for these shapes (no compile)."""
  def fwd_bwd(q, k, v, block_mask):
    out, vjp = jax.vjp(lambda q, k, v: _kernel_attention(q, k, v, block_mask, st), q, k, v)
    return vjp(out)
  try:
    jax.eval_shape(fwd_bwd, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, block_mask)))
    return True
  except (ValueError, NotImplementedError):
    return False


def block_sparse_attention(q, k, v, block_mask, *, block_q, block_kv, causal=True, window=None,
                           sm_scale=None, implementation=None, interpret=False):
  """Attention computed only on the (query tile, key tile) pairs that block_mask selects.

  Args:
    q: [B, T, N, H] queries. k, v: [B, S, K, H] keys/values (N a multiple of K: query head n uses kv
      head n // (N // K)). Same floating dtype.
    block_mask: bool [B, K, ceil(T / block_q), ceil(S / block_kv)]; True = compute that tile (see
      masks.py). T and S need not be block multiples under `causal` when T - S is a multiple of
      block_kv (e.g. T == S, block_q == block_kv): both are padded by the same rows.
    causal: also mask inside tiles: query i sees key j iff j <= i + S - T.
    window: with causal, a sliding window W: query at position p sees keys p - W < j <= p. Tiles
      wholly outside the window are dropped, tiles crossing its edge are masked token by token.
    sm_scale: logit scale, default 1/sqrt(H).
    implementation: 'xla' (pure jnp reference), 'pallas_tpu', 'pallas_triton', 'pallas_mosaic_gpu',
      or None for the best on the current backend (on GPU: Mosaic GPU on Hopper where it supports
      the dtype, tile sizes and options, else Triton where its tiles fit, else 'xla'; a fallback is
      logged). A named kernel that does not support the inputs raises ValueError.
    interpret: run Pallas kernels in interpret mode (CPU).
  Returns:
    [B, T, N, H] in q's dtype; query rows with no visible key are zero. Differentiable in q, k, v.
  """
  block_mask = jnp.asarray(block_mask) if not isinstance(block_mask, jax.Array) else block_mask
  chosen = implementation or default_implementation()
  _validate(q, k, v, block_mask, block_q, block_kv, causal, window, chosen)
  sm_scale = float(1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale)
  t, s = q.shape[1], k.shape[1]
  pad = _padding(t, s, block_q, block_kv, causal)
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    block_mask = jnp.pad(block_mask, ((0, 0), (0, 0), (0, q.shape[1] // block_q - block_mask.shape[2]),
                                      (0, k.shape[1] // block_kv - block_mask.shape[3])))
    out = _dispatch(q, k, v, block_mask, chosen, implementation, block_q, block_kv, causal, window,
                    sm_scale, interpret)
    return out[:, :t]
  return _dispatch(q, k, v, block_mask, chosen, implementation, block_q, block_kv, causal, window,
                   sm_scale, interpret)


_LOGGED = set()


def _dispatch(q, k, v, block_mask, chosen, implementation, block_q, block_kv, causal, window,
              sm_scale, interpret):
  ref = functools.partial(reference.block_sparse_attention_reference, block_q=block_q,
                          block_kv=block_kv, causal=causal, window=window, sm_scale=sm_scale)
  if chosen == "xla":
    return ref(q, k, v, block_mask)
  t, s = q.shape[1], k.shape[1]
  if causal:  # tiles wholly in the future (or wholly before the window) hold nothing: drop them
    keep = (masks_lib.causal_block_mask(t, s, block_q=block_q, block_kv=block_kv) if window is None
            else masks_lib.sliding_window_block_mask(t, s, block_q=block_q, block_kv=block_kv,
                                                     window=window))
    block_mask = block_mask & keep
  st = _Static(chosen, block_q, block_kv, bool(causal), window, sm_scale, bool(interpret))
  if implementation is None:
    # The GPU kernels cover fewer dtypes / tile sizes / options than the reference: take the first
    # that traces, and say so when it is not the backend's best.
    for candidate in _FALLBACKS.get(chosen, (chosen,)):
      st = dataclasses.replace(st, implementation=candidate)
      if candidate == "xla" or _supports(q, k, v, block_mask, st):
        break
    if st.implementation != chosen:
      key = (chosen, st.implementation, q.dtype.name, q.shape[-1], block_q, block_kv, window is None)
      if key not in _LOGGED:
        _LOGGED.add(key)
        logging.warning("block_sparse_attention: %s does not support these inputs (dtype %s, "
                        "head_dim %d, blocks %dx%d, window %s); using %s", chosen, q.dtype.name,
                        q.shape[-1], block_q, block_kv, window, st.implementation)
    if st.implementation == "xla":
      return ref(q, k, v, block_mask)
  return _kernel_attention(q, k, v, block_mask, st)

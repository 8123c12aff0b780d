"""msa_attention: MiniMax sparse attention (indexer block scores, top-k, sparse attention, KL loss).

One `implementation=` switch per entry point: 'xla' (reference.py, chunked over queries, no [T, S]
tensor), 'pallas_tpu' (pallas_tpu.py), 'pallas_triton' (pallas_triton.py), or None = the backend's
best: pallas_tpu on TPU, pallas_triton on GPU, xla on CPU. A requested kernel that rejects the
shapes (ValueError) raises when named, and under None falls back to 'xla' with a WARNING
logged once per (entry point, kernel, reason).

Query i sits at position i + S - T, key slot j at position j (see reference.py). Typical use in a
layer (T == S, training forward or prefill):
  indices = msa_select(q_idx, k_idx, block_size=128, top_k=16, local_blocks=1)
  y = msa_attention(q, k, v, indices, block_size=128)
  kl = msa_indexer_kl(q, k, q_idx, k_idx, indices, block_size=128, scale=H ** -0.5,
                      index_scale=I ** -0.5)
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math

import jax
import jax.numpy as jnp

from . import reference
from . import routing as routing_lib

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_triton")
SELECTIONS = ("per_group", "max_heads")
_MODULES = {"pallas_tpu": "pallas_tpu", "pallas_triton": "pallas_triton"}
_WARNED = set()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles: scores_q / scores_chunk = query tile and key chunk of the index-score kernel (the chunk
  a multiple of block_size); rows = the routed row tile of sparse attention; fused_select: on
  Triton, per-group selection runs as one kernel (block max + running top-k) with query tiles of
  select_q, instead of block scores [B, K, T, C] then lax.top_k."""
  scores_q: int = 128
  scores_chunk: int = 1024
  rows: int = 128
  fused_select: bool = True
  select_q: int = 128


def default_implementation(backend=None):
  backend = backend or jax.default_backend()
  return {"tpu": "pallas_tpu", "gpu": "pallas_triton"}.get(backend, "xla")


def _module(implementation):
  return importlib.import_module(f".{_MODULES[implementation]}", __package__)


def _resolve(implementation, entry):
  chosen = implementation or default_implementation()
  if chosen not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  return chosen


def _fallback(entry, chosen, err):
  key = (entry, chosen, str(err))
  if key not in _WARNED:
    _WARNED.add(key)
    logging.warning("%s: %s rejected the inputs (%s); using the XLA reference", entry, chosen, err)


def _check_blocks(block_size, top_k=1, local_blocks=1):
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if not isinstance(top_k, int) or top_k <= 0:
    raise ValueError(f"top_k must be a positive int, got {top_k!r}")
  if not isinstance(local_blocks, int) or not 1 <= local_blocks <= top_k:
    raise ValueError(f"local_blocks must be in [1, top_k={top_k}], got {local_blocks!r}")


def _check_index(q_idx, k_idx):
  if getattr(q_idx, "ndim", None) != 4:
    raise ValueError(f"q_idx must be [B, T, K, I], got shape {getattr(q_idx, 'shape', None)}")
  if getattr(k_idx, "ndim", None) != 3 or k_idx.shape[0] != q_idx.shape[0] or \
      k_idx.shape[2] != q_idx.shape[3]:
    raise ValueError(f"k_idx must be [B, S, I] matching q_idx {q_idx.shape}, got {k_idx.shape}")
  if k_idx.shape[1] < q_idx.shape[1]:
    raise ValueError(f"k_idx length {k_idx.shape[1]} must be >= q_idx length {q_idx.shape[1]}")


def _check_qkv(q, k, v, indices):
  if getattr(q, "ndim", None) != 4 or getattr(k, "ndim", None) != 4:
    raise ValueError(f"q must be [B, T, N, H] and k [B, S, K, H], got {getattr(q, 'shape', None)}, "
                     f"{getattr(k, 'shape', None)}")
  b, t, n, h = q.shape
  if k.shape[0] != b or k.shape[3] != h or v.shape != k.shape or n % k.shape[2]:
    raise ValueError(f"k, v must be [B={b}, S, K, H={h}] with K dividing N={n}; got k {k.shape}, "
                     f"v {v.shape}")
  if k.shape[1] < t:
    raise ValueError(f"k length {k.shape[1]} must be >= q length {t}")
  want = (b, k.shape[2], t)
  if getattr(indices, "ndim", None) != 4 or tuple(indices.shape[:3]) != want:
    raise ValueError(f"indices must be [B, K, T, k] = {want} + (k,), got {getattr(indices, 'shape', None)}")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be integer, got {indices.dtype}")


SCORE_BYTES = 2 ** 31  # f32 block scores [B, K, T, C] of one selection step (T = 1M: 268 GB)


def msa_block_scores(q_idx_BTKI, k_idx_BSI, *, block_size: int, q_offset=None,
                     implementation=None, interpret=False, block_sizes: BlockSizes = BlockSizes()):
  """float32 [B, K, T, C]: max over each key block's keys at positions <= the query of
  q_idx . k_idx (-inf for blocks wholly in the future). Query i sits at position i + q_offset
  (default S - T; traced is fine). Not differentiable (the selection is discrete)."""
  _check_blocks(block_size)
  _check_index(q_idx_BTKI, k_idx_BSI)
  chosen = _resolve(implementation, "msa_block_scores")
  q_idx_BTKI, k_idx_BSI = jax.lax.stop_gradient(q_idx_BTKI), jax.lax.stop_gradient(k_idx_BSI)
  if q_offset is None:
    q_offset = k_idx_BSI.shape[1] - q_idx_BTKI.shape[1]
  if chosen != "xla":
    try:
      chunk = max(block_size, block_sizes.scores_chunk // block_size * block_size)
      return _module(chosen).block_scores(
          q_idx_BTKI, k_idx_BSI, jnp.asarray(q_offset, jnp.int32), block_size=block_size,
          block_q=block_sizes.scores_q, key_chunk=chunk, interpret=interpret)
    except ValueError as err:
      if implementation is not None:
        raise
      _fallback("msa_block_scores", chosen, err)
  return reference.block_scores_reference(q_idx_BTKI, k_idx_BSI, block_size=block_size,
                                          q_offset=q_offset)


def msa_select(q_idx_BTKI, k_idx_BSI, *, block_size: int, top_k: int, local_blocks: int = 1,
               selection: str = "per_group", q_offset=None, implementation=None, interpret=False,
               block_sizes: BlockSizes = BlockSizes()):
  """Index lists int32 [B, K, T, min(top_k, C)] (-1 = empty): `msa.msa_selection`'s choice.

  Query i sits at position i + q_offset (default S - T; traced is fine: a prefill chunk written
  into a longer cache).
  selection 'max_heads' takes the max over the K index heads before one shared top-k. Long
  sequences score and select a chunk of queries at a time (SCORE_BYTES of block scores per step).
  """
  _check_blocks(block_size, top_k, local_blocks)
  _check_index(q_idx_BTKI, k_idx_BSI)
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
  b, t, kh, _ = q_idx_BTKI.shape
  s = k_idx_BSI.shape[1]
  c = -(-s // block_size)
  base = s - t if q_offset is None else q_offset
  chosen = _resolve(implementation, "msa_select")
  if chosen == "pallas_triton" and selection == "per_group" and block_sizes.fused_select:
    try:  # fused block max + running top-k: no [T, C] block scores in memory
      return _module(chosen).select_topk(
          jax.lax.stop_gradient(q_idx_BTKI), jax.lax.stop_gradient(k_idx_BSI),
          jnp.asarray(base, jnp.int32), block_size=block_size, top_k=top_k,
          local_blocks=local_blocks, block_q=block_sizes.select_q, interpret=interpret)
    except ValueError as err:
      if implementation is not None:
        raise
      _fallback("msa_select", chosen, err)

  def select(q_chunk, q_offset):
    scores_BKTC = msa_block_scores(q_chunk, k_idx_BSI, block_size=block_size, q_offset=q_offset,
                                   implementation=implementation, interpret=interpret,
                                   block_sizes=block_sizes)
    if selection == "max_heads":
      scores_BKTC = scores_BKTC.max(axis=1, keepdims=True)
    indices = reference.select_blocks(scores_BKTC, block_size=block_size, top_k=top_k,
                                      local_blocks=local_blocks, num_keys=s, q_offset=q_offset)
    return jnp.broadcast_to(indices, (b, kh) + indices.shape[2:])

  tq = block_sizes.scores_q
  step = max(tq, SCORE_BYTES // (b * kh * c * 4) // tq * tq)
  if step >= t:
    return select(q_idx_BTKI, base)
  n = -(-t // step)
  q_ = jnp.pad(q_idx_BTKI, ((0, 0), (0, n * step - t), (0, 0), (0, 0)))
  q_ = jnp.moveaxis(q_.reshape(b, n, step, kh, -1), 1, 0)
  out = jax.lax.map(lambda a: select(a[1], a[0] * step + base), (jnp.arange(n), q_))
  return jnp.moveaxis(out, 0, 2).reshape(b, kh, n * step, -1)[:, :, :t]


@dataclasses.dataclass(frozen=True)
class _Static:
  implementation: str
  block_size: int
  sm_scale: float
  rows: int
  interpret: bool


def _merge(x_BTNH, kh):
  """[B, T, K*G, H] -> [B*K, G, T, H]."""
  b, t, n, h = x_BTNH.shape
  return jnp.swapaxes(x_BTNH, 1, 2).reshape(b * kh, n // kh, t, h)


def _split(x_RGTH, b):
  r, g, t, h = x_RGTH.shape
  return jnp.swapaxes(x_RGTH.reshape(b, r // b * g, t, h), 1, 2)


def _keys(x_BSKH, block_size):
  """[B, S, K, H] -> [B*K, C*block_size, H] (zero-padded: padded keys lie after every query)."""
  b, s, kh, h = x_BSKH.shape
  x = jnp.swapaxes(x_BSKH, 1, 2).reshape(b * kh, s, h)
  return jnp.pad(x, ((0, 0), (0, -s % block_size), (0, 0)))


UNIT_BYTES = 2 ** 32  # f32 partial outputs of one scan step: heads of a group split to fit


def _head_chunks(groups, length, h):
  """Heads per scan step: the largest divisor of G whose f32 row partials fit UNIT_BYTES."""
  fits = [d for d in range(1, groups + 1) if groups % d == 0 and d * length * h * 4 <= UNIT_BYTES]
  return max(fits, default=1)


def _units(x_RGTH, per):
  """[R, G, T, H] -> [R * G/per, per, T, H]: one scan step per (kv-head row, head chunk)."""
  r, g, t, h = x_RGTH.shape
  return x_RGTH.reshape(r * (g // per), per, t, h)


def _row(rt, pos, u, chunks):
  """Routing of the kv-head row of unit u, as one-row arrays."""
  r = u // chunks
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, r, 1, axis=0)
  return routing_lib.Routing(*(take(x) for x in rt)), take(pos)


def _sparse_fwd(q, k, v, indices, q_offset, st):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  c = -(-s // st.block_size)
  rt = routing_lib.make_routing(indices.astype(jnp.int32), c, st.rows)
  pos = jnp.where(rt.row_query >= 0, rt.row_query + q_offset, -1)[:, None, :]
  per = _head_chunks(n // kh, rt.row_query.shape[1], h)
  chunks = n // kh // per
  k_, v_ = _keys(k, st.block_size), _keys(v.astype(k.dtype), st.block_size)

  def unit(u, q_1GTH):
    rt1, pos1 = _row(rt, pos, u, chunks)
    o_rows, lse_rows = _module(st.implementation).sparse_forward(
        routing_lib.to_rows(q_1GTH[None], rt1), k_[u // chunks][None], v_[u // chunks][None],
        pos1, rt1.tile_block, rt1.tile_count, rows=st.rows, block_size=st.block_size,
        sm_scale=st.sm_scale, interpret=st.interpret)
    o_part = routing_lib.from_rows(o_rows, rt1)                          # [1, G', T, k, H]
    lse_part = routing_lib.from_rows(jnp.swapaxes(lse_rows, 2, 3), rt1, fill=-jnp.inf)
    lse = jax.nn.logsumexp(lse_part, axis=-2)                            # [1, G', T, 1]
    w = jnp.where(jnp.isfinite(lse[..., None, :]), jnp.exp(lse_part - lse[..., None, :]), 0.0)
    return (w * o_part).sum(axis=-2)[0].astype(q.dtype), lse[0]

  q_u = _units(_merge(q, kh), per)
  o_u, lse_u = jax.lax.map(lambda a: unit(*a), (jnp.arange(q_u.shape[0]), q_u))
  o = _split(o_u.reshape(b * kh, n // kh, t, h), b)
  return o, (q, k, v, o, lse_u, pos, rt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _sparse_kernel(q, k, v, indices, q_offset, st):
  return _sparse_fwd(q, k, v, indices, q_offset, st)[0]


def _sparse_bwd(st, res, do):
  q, k, v, o, lse_u, pos, rt = res
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  c = -(-s // st.block_size)
  per = lse_u.shape[1]
  chunks = n // kh // per
  k_, v_ = _keys(k, st.block_size), _keys(v.astype(k.dtype), st.block_size)
  do_u = _units(_merge(do.astype(q.dtype), kh), per)
  di_u = jnp.sum(_units(_merge(o, kh), per).astype(jnp.float32) * do_u.astype(jnp.float32), -1,
                 keepdims=True)

  def unit(u, q_1GTH, do_1GTH, lse_GT1, di_GT1):
    rt1, pos1 = _row(rt, pos, u, chunks)
    lane_rows = lambda x: jnp.swapaxes(routing_lib.to_rows(x[None], rt1), 2, 3)  # -> [1, G', 1, L]
    dq_rows, dk, dv = _module(st.implementation).sparse_backward(
        routing_lib.to_rows(q_1GTH[None], rt1), k_[u // chunks][None], v_[u // chunks][None], pos1,
        routing_lib.to_rows(do_1GTH[None], rt1),
        lane_rows(jnp.where(jnp.isfinite(lse_GT1), lse_GT1, 0.0)), lane_rows(di_GT1),
        rt1.tile_block, rt1.tile_count, rows=st.rows, block_size=st.block_size,
        sm_scale=st.sm_scale, interpret=st.interpret)
    dq = routing_lib.from_rows(dq_rows, rt1).astype(jnp.float32).sum(axis=-2)[0].astype(q.dtype)
    seen = jnp.repeat(routing_lib.visited_blocks(rt1, c), st.block_size, axis=1)[:, :, None]
    return dq, jnp.where(seen, dk, 0.0)[0], jnp.where(seen, dv, 0.0)[0]

  q_u = _units(_merge(q, kh), per)
  dq_u, dk_u, dv_u = jax.lax.map(lambda a: unit(*a),
                                 (jnp.arange(q_u.shape[0]), q_u, do_u, lse_u, di_u))
  dq = _split(dq_u.reshape(b * kh, n // kh, t, h), b)

  def kv_grad(x, like):  # [R * chunks, Sp, H] -> sum over head chunks -> [B, S, K, H]
    x = x.reshape(b, kh, chunks, -1, h).sum(axis=2)[:, :, :s]
    return jnp.swapaxes(x, 1, 2).astype(like.dtype)
  return dq, kv_grad(dk_u, k), kv_grad(dv_u, v), None, None


_sparse_kernel.defvjp(_sparse_fwd, _sparse_bwd)


def msa_attention(q_BTNH, k_BSKH, v_BSKH, indices_BKTk, *, block_size: int, sm_scale=None,
                  q_offset=None, implementation=None, interpret=False,
                  block_sizes: BlockSizes = BlockSizes()):
  """Causal GQA softmax attention of each query over the keys of its selected blocks.

  q [B, T, N, H]; k, v [B, S, K, H]; indices int32 [B, K, T, k] from `msa_select` (-1 = empty, no
  repeats); query i at position i + q_offset (default S - T; traced is fine). Logits and softmax
  in float32. Returns y [B, T, N, H] in q's dtype, differentiable in q, k, v (indices are not).
  """
  _check_blocks(block_size)
  _check_qkv(q_BTNH, k_BSKH, v_BSKH, indices_BKTk)
  chosen = _resolve(implementation, "msa_attention")
  sm_scale = float(1.0 / math.sqrt(q_BTNH.shape[-1]) if sm_scale is None else sm_scale)
  indices_BKTk = jax.lax.stop_gradient(indices_BKTk)
  q_offset = jnp.asarray(k_BSKH.shape[1] - q_BTNH.shape[1] if q_offset is None else q_offset,
                         jnp.int32)
  if chosen != "xla":
    st = _Static(chosen, block_size, sm_scale, block_sizes.rows, bool(interpret))
    try:
      if chosen == "pallas_triton":
        _module(chosen).check_supported(q_BTNH, k_BSKH, st.block_size, st.rows, interpret)
      return _sparse_kernel(q_BTNH, k_BSKH, v_BSKH, indices_BKTk, q_offset, st)
    except ValueError as err:
      if implementation is not None:
        raise
      _fallback("msa_attention", chosen, err)
  return reference.sparse_attention_reference(q_BTNH, k_BSKH, v_BSKH, indices_BKTk,
                                              block_size=block_size, sm_scale=sm_scale,
                                              q_offset=q_offset)


KL_BYTES = 2 ** 28  # per query chunk of the KL loss (rematerialized in the backward)


def msa_indexer_kl(q_BTNH, k_BSKH, q_idx_BTKI, k_idx_BSI, indices_BKTk, *, block_size: int,
                   scale: float, index_scale: float, implementation=None, interpret=False):
  """Mean over (B, K, T) of KL(group-mean main attention || indexer softmax) over the selected
  tokens: `msa.indexer_kl` without its [T, S] tensors. Gradients reach only q_idx and k_idx.
  Float32 scalar. Every implementation runs the chunked XLA form today (no kernel yet)."""
  _check_blocks(block_size)
  _check_qkv(q_BTNH, k_BSKH, k_BSKH, indices_BKTk)
  _check_index(q_idx_BTKI, k_idx_BSI)
  _resolve(implementation, "msa_indexer_kl")
  del interpret
  b, t, n, h = q_BTNH.shape
  kh, k = k_BSKH.shape[2], indices_BKTk.shape[-1]
  # Queries per chunk: ~KL_BYTES of gathered keys, index keys and probabilities per step.
  per_query = b * kh * k * block_size * (2 * h + 4 * q_idx_BTKI.shape[-1] + 4 * (n // kh + 3))
  chunk = 1 << max(4, min(10, (KL_BYTES // per_query).bit_length() - 1))
  return reference.indexer_kl_reference(q_BTNH, k_BSKH, q_idx_BTKI, k_idx_BSI,
                                        jax.lax.stop_gradient(indices_BKTk),
                                        block_size=block_size, scale=scale,
                                        index_scale=index_scale, chunk=chunk)

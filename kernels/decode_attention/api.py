"""Decode attention (one new token per row, q_len 1): dense GQA, MSA and block-summary decode.

Cache layout as the model keeps it: k, v [B, S, K, H] (slot s = position s), lengths int32 [B]
(row b's new token is at position lengths[b] - 1, already written, and sees positions <
lengths[b]). MSA adds index queries [B, K, I] of the new token and index keys [B, S, I];
block-summary decode adds `BlockSummaries` (see reference.py; `update_block_summaries` keeps
them current as the cache grows).

implementation: 'xla' (the pure-jnp reference), 'pallas_tpu', 'pallas_triton', or None = the
backend's best ('pallas_tpu' on TPU, 'pallas_triton' on GPU, 'xla' elsewhere). With None, a
kernel that cannot take the shapes (see each module's `check`) falls back to 'xla' with one
WARNING; a kernel asked for by name raises instead. Block selection (top-k over the [B, K, C]
block scores, a few KB) is jnp in every implementation; the kernels compute the scores and the
attention. Every function is jit-compatible (lengths and selections are traced).
"""
import dataclasses
import logging
import math

import jax
import jax.numpy as jnp

from ..block_sparse_attention import selection
from . import reference
from .reference import cdiv


def pad_rows(x, rows, axis):
  """Zero rows appended along `axis` up to `rows`."""
  pad = rows - x.shape[axis]
  if pad <= 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_triton")
SUMMARY_KINDS = ("mean", "minmax")
_WARNED = set()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the decode kernels.

  block_kv: cache slots per tile of dense decode. num_splits: GPU programs per (row, kv head)
  for dense split-K (None: enough for ~`target_programs` programs in all). blocks_per_program:
  selected blocks per GPU program of sparse decode. index_blocks / summary_blocks: key blocks
  scored per program (rounded down to a divisor of C). num_warps / num_stages: Triton, for
  the attention kernels; score_num_warps / score_num_stages for the scoring kernels.
  select_chunk: two-level top-k over chunks of this many blocks where C is a larger multiple
  of it (None: one lax.top_k; on the H200 one lax.top_k over 8192 blocks took ~85 us, chunks
  of 512 ~5 us).
  """
  block_kv: int = 128
  num_splits: int | None = None
  target_programs: int = 512
  blocks_per_program: int = 1
  index_blocks: int = 2
  summary_blocks: int = 32
  num_warps: int = 4
  num_stages: int = 2
  score_num_warps: int = 4
  score_num_stages: int = 2
  select_chunk: int | None = 512

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if v is not None and (not isinstance(v, int) or v <= 0):
        raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {v!r}")


# Dense decode's own default: 8 warps and 3 stages per split-K program. On the H200 (2026-12-02
# tile sweep, 1M tokens, B=1, M2 dims) it ran 969.9 us against cuDNN's 1009.6 (1.04x), where the
# sparse kernels' default of 4 warps / 2 stages ran 1093 us (0.88x).
DENSE_BLOCK_SIZES = BlockSizes(num_warps=8, num_stages=3)


def default_implementation(backend=None):
  backend = backend or jax.default_backend()
  return {"tpu": "pallas_tpu", "gpu": "pallas_triton"}.get(backend, "xla")


def _module(implementation):
  if implementation == "pallas_tpu":
    from . import pallas_tpu
    return pallas_tpu
  from . import pallas_triton
  return pallas_triton


def _scale(sm_scale, h):
  return float(1.0 / math.sqrt(h) if sm_scale is None else sm_scale)


def _validate(q_BNH, k_BSKH, v_BSKH, lengths_B, implementation):
  for name, x, nd in (("q", q_BNH, 3), ("k", k_BSKH, 4), ("v", v_BSKH, 4)):
    if getattr(x, "ndim", None) != nd:
      raise ValueError(f"{name} must be {nd}-D, got shape {getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
  b, n, h = q_BNH.shape
  if k_BSKH.shape[0] != b or k_BSKH.shape[3] != h:
    raise ValueError(f"k shape {k_BSKH.shape} must be [B={b}, S, K, H={h}] to match q {q_BNH.shape}")
  if v_BSKH.shape != k_BSKH.shape:
    raise ValueError(f"v shape {v_BSKH.shape} must equal k shape {k_BSKH.shape}")
  if k_BSKH.dtype != v_BSKH.dtype:
    raise ValueError(f"k and v must share a dtype, got {k_BSKH.dtype} and {v_BSKH.dtype}")
  kh = k_BSKH.shape[2]
  if kh == 0 or n % kh:
    raise ValueError(f"q heads {n} must be a multiple of kv heads {kh}")
  if getattr(lengths_B, "shape", None) != (b,) or not jnp.issubdtype(lengths_B.dtype, jnp.integer):
    raise ValueError(f"lengths must be an int array [B={b}], got {getattr(lengths_B, 'shape', None)}"
                     f" {getattr(lengths_B, 'dtype', None)}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")


def _check_block(name, block):
  if not isinstance(block, int) or block <= 0:
    raise ValueError(f"{name} must be a positive int, got {block!r}")


def _choose(implementation, try_kernel):
  """Runs try_kernel(impl) for the chosen kernel; with implementation None a ValueError from
  the kernel's shape checks falls back to 'xla' (returns None), logged once."""
  chosen = implementation or default_implementation()
  if chosen == "xla":
    return None
  try:
    return try_kernel(chosen)
  except ValueError as e:
    if implementation is not None:
      raise
    if str(e) not in _WARNED:
      _WARNED.add(str(e))
      logging.warning("decode_attention: %s; falling back to xla", e)
    return None


def _divisor_tile(c, want, multiple=1):
  """Largest t <= want dividing c, a multiple of `multiple` (or c itself when c <= want)."""
  if c <= want:
    return c
  for t in range(want, 0, -1):
    if c % t == 0 and t % multiple == 0:
      return t
  raise ValueError(f"no tile <= {want} divides {c} blocks in multiples of {multiple}")


def _pow2_tile(c, want):
  t = 1
  while t * 2 <= want and c % (t * 2) == 0:
    t *= 2
  return t


def _group_q(q_BNH, kh, rows):
  """[B, N, H] -> [B, K, rows, H] (the G heads of each kv group, zero rows after them)."""
  b, n, h = q_BNH.shape
  return pad_rows(q_BNH.reshape(b, kh, n // kh, h), rows, 2)


def _attend(q_BNH, k_BSKH, v_BSKH, lengths_B, indices_BKJ, *, block, sm_scale, bs, impl,
            interpret, parts_only=False):
  """Kernel attention (dense when indices_BKJ is None) -> [B, N, H] in q's dtype.
  parts_only (Triton; for benchmarks/decode.py --parts): the split partials, not combined."""
  b, n, h = q_BNH.shape
  s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
  if s % block:
    raise ValueError(f"{impl}: cache length {s} is not a multiple of the block {block}")
  q_BNH = q_BNH.astype(k_BSKH.dtype)
  lengths_B = lengths_B.astype(jnp.int32)
  mod = _module(impl)
  if impl == "pallas_tpu":
    mod.check(head_dim=h, num_kv_heads=kh, interpret=interpret)
    counts_BK = None
    if indices_BKJ is not None:  # valid ids first: the grid runs over a prefix of each list
      indices_BKJ = -jnp.sort(-indices_BKJ, axis=-1)
      counts_BK = jnp.sum(indices_BKJ >= 0, axis=-1).astype(jnp.int32)
    q_BKGH = q_BNH.reshape(b, kh, n // kh, h)
    y = mod.attend(q_BKGH, k_BSKH, v_BSKH, lengths_B, indices_BKJ, counts_BK, block=block,
                   sm_scale=sm_scale, interpret=interpret)
    return y.reshape(b, n, h)
  mod.check(head_dim=h, tiles={"block": block}, interpret=interpret)
  g = n // kh
  q_BKGH = _group_q(q_BNH, kh, max(mod.MIN_ROWS, 1 << (g - 1).bit_length()))
  if indices_BKJ is None:
    tiles = s // block
    splits = bs.num_splits or max(1, min(tiles, cdiv(bs.target_programs, b * kh)))
    per_program = cdiv(tiles, splits)
  else:
    j = indices_BKJ.shape[-1]
    per_program = min(bs.blocks_per_program, j)
    if j % per_program:  # -1 slots up to a whole number of programs
      indices_BKJ = pad_rows(indices_BKJ + 1, cdiv(j, per_program) * per_program, 2) - 1
  programs = cdiv(s // block if indices_BKJ is None else indices_BKJ.shape[-1], per_program)
  parts = mod.attend(q_BKGH, k_BSKH, v_BSKH, lengths_B, indices_BKJ, block=block,
                     num_programs=programs, per_program=per_program, sm_scale=sm_scale,
                     num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=interpret)
  if parts_only:
    return parts
  o_BKGH = mod.combine(*parts)[:, :, :g]
  return o_BKGH.reshape(b, n, h).astype(q_BNH.dtype)


def dense_decode(q_BNH, k_BSKH, v_BSKH, lengths_B, *, sm_scale=None, block_sizes=None,
                 implementation=None, interpret=False):
  """GQA decode attention of each row's new token over its first lengths[b] cache slots.

  q [B, N, H]; k, v [B, S, K, H] (N a multiple of K); lengths int [B]. Kernels need S a
  multiple of block_sizes.block_kv. Returns [B, N, H] in q's dtype (rows of length 0: zeros).
  """
  _validate(q_BNH, k_BSKH, v_BSKH, lengths_B, implementation)
  bs = block_sizes or DENSE_BLOCK_SIZES
  scale = _scale(sm_scale, q_BNH.shape[-1])
  y = _choose(implementation, lambda impl: _attend(
      q_BNH, k_BSKH, v_BSKH, lengths_B, None, block=bs.block_kv, sm_scale=scale, bs=bs,
      impl=impl, interpret=interpret))
  if y is None:
    y = reference.dense_decode_reference(q_BNH, k_BSKH, v_BSKH, lengths_B, sm_scale=scale)
  return y


def sparse_decode(q_BNH, k_BSKH, v_BSKH, lengths_B, indices_BKJ, *, block_size, sm_scale=None,
                  block_sizes=None, implementation=None, interpret=False):
  """Decode attention over listed key blocks only; each listed block is read once for the G
  query heads of its kv group.

  indices_BKJ int32 [B, K, J]: distinct block ids per (row, kv head), -1 = unused (any order).
  Keys at positions >= lengths[b] stay hidden. Kernels need S a multiple of block_size.
  Returns [B, N, H] in q's dtype.
  """
  _validate(q_BNH, k_BSKH, v_BSKH, lengths_B, implementation)
  _check_block("block_size", block_size)
  b, kh = q_BNH.shape[0], k_BSKH.shape[2]
  if (getattr(indices_BKJ, "ndim", None) != 3 or indices_BKJ.shape[:2] != (b, kh)
      or not jnp.issubdtype(indices_BKJ.dtype, jnp.integer)):
    raise ValueError(f"indices must be int [B={b}, K={kh}, J], got "
                     f"{getattr(indices_BKJ, 'shape', None)} {getattr(indices_BKJ, 'dtype', None)}")
  bs = block_sizes or BlockSizes()
  scale = _scale(sm_scale, q_BNH.shape[-1])
  indices_BKJ = indices_BKJ.astype(jnp.int32)
  y = _choose(implementation, lambda impl: _attend(
      q_BNH, k_BSKH, v_BSKH, lengths_B, indices_BKJ, block=block_size, sm_scale=scale, bs=bs,
      impl=impl, interpret=interpret))
  if y is None:
    y = reference.sparse_decode_reference(q_BNH, k_BSKH, v_BSKH, lengths_B, indices_BKJ,
                                          block_size=block_size, sm_scale=scale)
  return y


def _force(scores_BKC, lengths_B, block_size, local_blocks):
  """+inf at the `local_blocks` blocks ending at each row's new-token block (as the selection)."""
  q_block_B1 = ((lengths_B - 1) // block_size)[:, None]
  local = selection.local_blocks_mask(q_block_B1, scores_BKC.shape[-1], local_blocks)
  return jnp.where(local, jnp.inf, scores_BKC)


def msa_block_scores(index_q_BKI, index_k_BSI, lengths_B, *, block_size, block_sizes=None,
                     implementation=None, interpret=False, local_blocks=0):
  """MSA block scores [B, K, C] f32 (C = ceil(S / block_size)): per block, the max of the new
  token's index query of kv group k . the index keys at positions < lengths[b]; -inf where a
  block has none. Kernels cast the index queries to the index keys' dtype. local_blocks > 0:
  the selection's forced blocks (those ending at the new token's block) score +inf (the Triton
  kernel writes them, saving the selection a pass)."""
  if getattr(index_q_BKI, "ndim", None) != 3 or getattr(index_k_BSI, "ndim", None) != 3:
    raise ValueError(f"index_q must be [B, K, I] and index_k [B, S, I], got "
                     f"{getattr(index_q_BKI, 'shape', None)} and {getattr(index_k_BSI, 'shape', None)}")
  b, kh, i = index_q_BKI.shape
  if index_k_BSI.shape[0] != b or index_k_BSI.shape[2] != i:
    raise ValueError(f"index_k shape {index_k_BSI.shape} must be [B={b}, S, I={i}]")
  _check_block("block_size", block_size)
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  bs = block_sizes or BlockSizes()
  lengths_B = lengths_B.astype(jnp.int32)

  def kernel(impl):
    s = index_k_BSI.shape[1]
    if s % block_size:
      raise ValueError(f"{impl}: index cache length {s} is not a multiple of block_size {block_size}")
    c = s // block_size
    q = index_q_BKI.astype(index_k_BSI.dtype)
    mod = _module(impl)
    if impl == "pallas_tpu":
      mod.check(head_dim=i, num_kv_heads=2, interpret=interpret)
      nb = _divisor_tile(c, bs.index_blocks, 1 if interpret else 8)
      out_BCK = mod.index_block_scores(q, index_k_BSI, lengths_B, block=block_size, nb=nb,
                                       interpret=interpret)
      return _force(jnp.swapaxes(out_BCK, 1, 2), lengths_B, block_size, local_blocks)
    mod.check(head_dim=i, tiles={"block_size": block_size}, interpret=interpret)
    out = mod.index_block_scores(
        pad_rows(q, max(mod.MIN_ROWS, kh), 1), index_k_BSI, lengths_B, block=block_size,
        nb=_pow2_tile(c, bs.index_blocks), num_warps=bs.score_num_warps,
        num_stages=bs.score_num_stages, local_blocks=local_blocks, interpret=interpret)
    return out[:, :kh]

  out = _choose(implementation, kernel)
  if out is None:
    out = _force(reference.index_block_scores_reference(index_q_BKI, index_k_BSI, lengths_B,
                                                        block_size=block_size),
                 lengths_B, block_size, local_blocks)
  return out


def select_forced(scores_BKC, *, top_k, chunk=None, lengths_B=None, block_size=None):
  """Top-k of scores whose forced blocks are already +inf (`local_blocks` above). Returns
  (blocks int32 [B, K, k] for the attention kernels: -inf winners are kept as is, they hold no
  visible key, so no extra pass marks them; indices int32 [B, K, k] with -1 there, the
  selection's format). The same blocks as `select_top_blocks` on the unforced scores."""
  c = scores_BKC.shape[-1]
  k = min(top_k, c)
  if chunk and c % chunk == 0 and c > chunk and chunk >= k:
    indices_BKJ = reference.select_top_blocks(scores_BKC, lengths_B, block_size=block_size,
                                              top_k=top_k, local_blocks=0, chunk=chunk)
    return indices_BKJ, indices_BKJ
  top_BKJ, blocks_BKJ = jax.lax.top_k(scores_BKC, k)
  return blocks_BKJ, jnp.where(top_BKJ == -jnp.inf, -1, blocks_BKJ).astype(jnp.int32)


def msa_decode(q_BNH, k_BSKH, v_BSKH, lengths_B, index_q_BKI, index_k_BSI, *, block_size=128,
               top_k=16, local_blocks=1, sm_scale=None, block_sizes=None, implementation=None,
               interpret=False, return_indices=False):
  """MSA decode: index block scores -> top-k blocks per kv group (the `local_blocks` blocks
  ending at the new token's block forced, -inf blocks never chosen; the model's selection) ->
  attention over the selected blocks only. Returns y [B, N, H] (and the indices [B, K, k])."""
  _validate(q_BNH, k_BSKH, v_BSKH, lengths_B, implementation)
  if not isinstance(top_k, int) or top_k <= 0:
    raise ValueError(f"top_k must be a positive int, got {top_k!r}")
  if not isinstance(local_blocks, int) or not 0 <= local_blocks <= top_k:
    raise ValueError(f"local_blocks must be an int in [0, top_k={top_k}], got {local_blocks!r}")
  kw = dict(block_sizes=block_sizes, implementation=implementation, interpret=interpret)
  scores_BKC = msa_block_scores(index_q_BKI, index_k_BSI, lengths_B, block_size=block_size,
                                local_blocks=local_blocks, **kw)
  blocks_BKJ, indices_BKJ = select_forced(
      scores_BKC, top_k=top_k, chunk=(block_sizes or BlockSizes()).select_chunk,
      lengths_B=lengths_B, block_size=block_size)
  y = sparse_decode(q_BNH, k_BSKH, v_BSKH, lengths_B, blocks_BKJ, block_size=block_size,
                    sm_scale=sm_scale, **kw)
  return (y, indices_BKJ) if return_indices else y


def summary_block_scores(q_BNH, summaries, lengths_B, *, kind, block_size, block_sizes=None,
                         implementation=None, interpret=False, force_own=False):
  """Block scores [B, K, C] f32 from `BlockSummaries`: kind 'mean' (MoBA: group-mean query .
  block mean key) or 'minmax' (Quest bound, max over the group's heads); -inf off the complete
  blocks before the new token's block. Only the kind's arrays are read (the others may be None). force_own: that block scores +inf (the selection keeps
  it; the Triton kernel writes it)."""
  if kind not in SUMMARY_KINDS:
    raise ValueError(f"kind must be one of {SUMMARY_KINDS}, got {kind!r}")
  if not isinstance(summaries, reference.BlockSummaries):
    raise ValueError(f"summaries must be a BlockSummaries, got {type(summaries).__name__}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  _check_block("block_size", block_size)
  b, n, h = q_BNH.shape
  names = ("mean_BCKH",) if kind == "mean" else ("min_BCKH", "max_BCKH")
  arrays = tuple(getattr(summaries, name) for name in names)  # the kind's arrays only
  c, kh = arrays[0].shape[1], arrays[0].shape[2]
  for name, x in zip(names, arrays):
    if getattr(x, "shape", None) != (b, c, kh, h):
      raise ValueError(f"summaries.{name} shape {getattr(x, 'shape', None)} must be "
                       f"[B={b}, C, K, H={h}]")
  g = n // kh
  bs = block_sizes or BlockSizes()
  lengths_B = lengths_B.astype(jnp.int32)

  def kernel(impl):
    mod = _module(impl)
    q_BKGH = q_BNH.astype(jnp.float32).reshape(b, kh, g, h)
    q_BKRH = q_BKGH.mean(axis=2, keepdims=True) if kind == "mean" else q_BKGH
    if impl == "pallas_tpu":
      mod.check(head_dim=h, num_kv_heads=kh, interpret=interpret)
      nc = _divisor_tile(c, bs.summary_blocks, 1 if interpret else 128)
      out = mod.summary_block_scores(q_BKRH, arrays, lengths_B, kind=kind, block=block_size,
                                     nc=nc, interpret=interpret)
      return _force(out, lengths_B, block_size, int(force_own))
    mod.check(head_dim=h, tiles={}, interpret=interpret)
    nc = _pow2_tile(c, bs.summary_blocks)
    if not interpret and nc < 16:
      raise ValueError(f"pallas_triton: {c} summary blocks have no power-of-two tile >= 16")
    rows = 1 << (q_BKRH.shape[2] - 1).bit_length()
    return mod.summary_block_scores(
        pad_rows(q_BKRH, rows, 2), arrays, lengths_B, kind=kind, groups=g, block=block_size,
        nc=nc, num_warps=bs.score_num_warps, num_stages=bs.score_num_stages,
        force_own=force_own, interpret=interpret)

  out = _choose(implementation, kernel)
  if out is None:
    if kind == "mean":
      out = reference.moba_block_scores_reference(q_BNH, summaries.mean_BCKH, lengths_B,
                                                  block_size=block_size)
    else:
      out = reference.quest_block_scores_reference(q_BNH, summaries.min_BCKH, summaries.max_BCKH,
                                                   lengths_B, block_size=block_size)
    out = _force(out, lengths_B, block_size, int(force_own))
  return out


def msa_summary_block_scores(index_q_BKI, summaries, lengths_B, *, kind, block_size,
                             selection="per_group", block_sizes=None, implementation=None,
                             interpret=False):
  """Approximate MSA block scores [B, K, C] f32 from summaries of the shared index keys
  (`BlockSummaries`, [B, C, 1, I]: the index key as one kv head) for the new token's index
  queries [B, K, I]: kind 'mean' or 'minmax' (Quest bound), -inf off complete past blocks, and
  for selection 'max_heads' the max over the K groups (broadcast back to K). Unforced: the
  selection (`select_top_blocks`) forces the local blocks, as for `msa_block_scores`.

  On the kernels only ('minmax', 'max_heads'): the K index queries are the G query rows of the
  one kv head, and `summary_block_scores` takes their max, the 'max_heads' score. Every other
  case is the jnp reference in all implementations: a per-group score is one [K, I] x [C, I]
  einsum, which the summary kernels (one score per kv head, a mean or max over its rows) would
  only serve with the summaries copied K times.
  """
  if kind not in SUMMARY_KINDS:
    raise ValueError(f"kind must be one of {SUMMARY_KINDS}, got {kind!r}")
  if selection not in ("per_group", "max_heads"):
    raise ValueError(f"selection must be 'per_group' or 'max_heads', got {selection!r}")
  if getattr(index_q_BKI, "ndim", None) != 3:
    raise ValueError(f"index_q must be [B, K, I], got {getattr(index_q_BKI, 'shape', None)}")
  b, kh, i = index_q_BKI.shape
  for name in (("mean_BCKH",) if kind == "mean" else ("min_BCKH", "max_BCKH")):
    x = getattr(summaries, name)
    if getattr(x, "ndim", None) != 4 or x.shape[0] != b or x.shape[2:] != (1, i):
      raise ValueError(f"summaries.{name} must be [B={b}, C, 1, I={i}], got "
                       f"{getattr(x, 'shape', None)}")
  lengths_B = lengths_B.astype(jnp.int32)
  if kind == "minmax" and selection == "max_heads":
    scores_B1C = summary_block_scores(index_q_BKI, summaries, lengths_B, kind=kind,
                                      block_size=block_size, block_sizes=block_sizes,
                                      implementation=implementation, interpret=interpret)
    return jnp.broadcast_to(scores_B1C, (b, kh, scores_B1C.shape[-1]))
  scores_BKC = reference.msa_summary_block_scores_reference(index_q_BKI, summaries, lengths_B,
                                                            kind=kind, block_size=block_size)
  if selection == "max_heads":
    scores_BKC = jnp.broadcast_to(scores_BKC.max(axis=1, keepdims=True), scores_BKC.shape)
  return scores_BKC


def summary_decode(q_BNH, k_BSKH, v_BSKH, lengths_B, summaries, *, kind="mean", block_size=128,
                   top_k=16, sm_scale=None, block_sizes=None, implementation=None,
                   interpret=False, return_indices=False):
  """Block-summary decode: scores from the summaries (about 1/block_size of the keys' bytes),
  top-k blocks per kv group with the new token's own block forced (MoBA's selection for kind
  'mean'), attention over them. Returns y [B, N, H] (and the indices [B, K, k])."""
  _validate(q_BNH, k_BSKH, v_BSKH, lengths_B, implementation)
  if not isinstance(top_k, int) or top_k <= 0:
    raise ValueError(f"top_k must be a positive int, got {top_k!r}")
  kw = dict(block_sizes=block_sizes, implementation=implementation, interpret=interpret)
  scores_BKC = summary_block_scores(q_BNH, summaries, lengths_B, kind=kind,
                                    block_size=block_size, force_own=True, **kw)
  blocks_BKJ, indices_BKJ = select_forced(
      scores_BKC, top_k=top_k, chunk=(block_sizes or BlockSizes()).select_chunk,
      lengths_B=lengths_B, block_size=block_size)
  y = sparse_decode(q_BNH, k_BSKH, v_BSKH, lengths_B, blocks_BKJ, block_size=block_size,
                    sm_scale=sm_scale, **kw)
  return (y, indices_BKJ) if return_indices else y

"""Decode caches: the one protocol every attention cache follows, and the caches themselves.

  capacity    static int: key slots the cache holds (0 for a fixed-size recurrent state)
  positions   int32 [capacity]: the absolute position each slot holds (or will hold once written);
              EMPTY_POSITION where a slot can hold nothing yet, so causal masking hides it
  write(*chunk, start)  the cache after writing a chunk of T consecutive positions start..start+T-1
              (chunk arrays [B, T, ...] in the cache's field order; `start` may be traced)

Every cache is a `flax.struct.dataclass` (a pytree: jit donates it, nnx.scan carries it). Under
`cfg.scan_layers` a segment's caches are stacked on a leading layer axis; the protocol is read on
one layer's cache, inside the scan body. New per-slot data (e.g. per-block key summaries for a
decode kernel) is one more field and one more line in `write`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from mixtral_jax.kernels.decode_attention.reference import BlockSummaries, block_summaries

# Positions of unwritten cache slots: larger than any real position, so causality hides them.
EMPTY_POSITION = 2 ** 30


@runtime_checkable
class Cache(Protocol):
  """What a decode kernel may rely on, whatever the attention variant."""

  @property
  def capacity(self) -> int: ...

  @property
  def positions(self) -> jax.Array: ...

  def write(self, *chunk_and_start) -> "Cache": ...


def _update(buf, chunk, start):
  """buf [B, S, ...] with chunk [B, T, ...] written at slots start..start+T-1."""
  idx = (0, start) + (0,) * (buf.ndim - 2)
  return jax.lax.dynamic_update_slice(buf, chunk.astype(buf.dtype), idx)


@struct.dataclass
class KVCache:
  """Keys/values of every position so far; slot s holds position s."""
  k_BSKH: jax.Array
  v_BSKH: jax.Array

  @classmethod
  def zeros(cls, batch, max_len, num_kv_heads, head_dim, dtype):
    shape = (batch, max_len, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @property
  def capacity(self) -> int:
    return self.k_BSKH.shape[-3]

  @property
  def positions(self):
    return jnp.arange(self.capacity, dtype=jnp.int32)

  @property
  def positions_1S(self):
    return self.positions[None]

  def write(self, k_BTKH, v_BTKH, start):
    """Writes T new positions starting at slot `start` (a traced scalar is fine)."""
    return self.replace(k_BSKH=_update(self.k_BSKH, k_BTKH, start),
                        v_BSKH=_update(self.v_BSKH, v_BTKH, start))


@struct.dataclass
class RingCache:
  """The last `window` keys/values; slot p % window holds position p (`positions_W`, or empty)."""
  k_BWKH: jax.Array
  v_BWKH: jax.Array
  positions_W: jax.Array  # int32; EMPTY_POSITION where nothing was written yet

  @classmethod
  def zeros(cls, batch, window, num_kv_heads, head_dim, dtype):
    shape = (batch, window, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.full((window,), EMPTY_POSITION, jnp.int32))

  @property
  def capacity(self) -> int:
    return self.positions_W.shape[-1]

  @property
  def positions(self):
    return self.positions_W

  def write(self, k_BTKH, v_BTKH, start):
    """Writes positions start..start+T-1; only the last `window` of them survive."""
    window, t = self.capacity, k_BTKH.shape[1]
    n = min(t, window)
    new_pos = (start + jnp.arange(t - n, t)).astype(jnp.int32)
    slots = new_pos % window
    return RingCache(
        k_BWKH=self.k_BWKH.at[:, slots].set(k_BTKH[:, -n:].astype(self.k_BWKH.dtype)),
        v_BWKH=self.v_BWKH.at[:, slots].set(v_BTKH[:, -n:].astype(self.v_BWKH.dtype)),
        positions_W=self.positions_W.at[slots].set(new_pos))


@struct.dataclass
class MSACache:
  """Main keys/values plus the indexer's key per position (slot s = position s).

  With cfg.msa.decode_selection 'mean' or 'minmax' it also keeps per-block summaries of the index
  keys (`index_summaries`, the decode kernels' `BlockSummaries` with the shared index key as
  their one kv head: [B, C, 1, I], C = ceil(capacity / block_size); only the kind's arrays, the
  others None), so a decode step scores blocks by reading ~1/block_size of the index keys. A
  block is summarized over its written slots; only complete blocks are ever scored. For 'exact'
  both extra fields stay None / 0: the exact cache's leaves are unchanged.
  """
  kv: KVCache
  index_k_BSI: jax.Array
  index_summaries: BlockSummaries | None = None
  block_size: int = struct.field(pytree_node=False, default=0)

  @classmethod
  def zeros(cls, batch, max_len, num_kv_heads, head_dim, index_dim, dtype, *,
            decode_selection="exact", block_size=0):
    """An empty cache; decode_selection 'mean' adds the f32 block means, 'minmax' the per-channel
    bounds in the cache's dtype (zeros until written)."""
    kv = KVCache.zeros(batch, max_len, num_kv_heads, head_dim, dtype)
    index_k = jnp.zeros((batch, max_len, index_dim), dtype)
    if decode_selection == "exact":
      return cls(kv, index_k)
    shape = (batch, -(-max_len // block_size), 1, index_dim)
    summaries = (BlockSummaries(jnp.zeros(shape, jnp.float32), None, None)
                 if decode_selection == "mean" else
                 BlockSummaries(None, jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    return cls(kv, index_k, summaries, block_size)

  @property
  def capacity(self) -> int:
    return self.kv.capacity

  @property
  def positions(self):
    return self.kv.positions

  def write(self, k_BTKH, v_BTKH, index_k_BTI, start):
    """Writes positions start..start+T-1; with summaries, a one-token step (T == 1) re-summarizes
    only its own block (one block of index keys read), a longer chunk (a prefill) every block."""
    index_k_BSI = _update(self.index_k_BSI, index_k_BTI, start)
    new = MSACache(kv=self.kv.write(k_BTKH, v_BTKH, start), index_k_BSI=index_k_BSI,
                   index_summaries=self.index_summaries, block_size=self.block_size)
    if self.index_summaries is None:
      return new
    t, old = index_k_BTI.shape[1], self.index_summaries
    if t > 1:
      lengths_B = jnp.full((index_k_BSI.shape[0],), start + t, jnp.int32)
      fresh = block_summaries(index_k_BSI[:, :, None], lengths_B, block_size=self.block_size)
      summaries = BlockSummaries(*(None if o is None else f.astype(o.dtype)
                                   for o, f in zip(old, fresh)))
    else:
      summaries = _resummarize_block(old, index_k_BSI, start, self.block_size)
    return new.replace(index_summaries=summaries)


def _resummarize_block(summaries, k_BSI, start, bs):
  """`summaries` with the block holding slot `start` re-summarized over its slots <= start (as
  `block_summaries` does): a mean over all bs slots (unwritten ones count as zero), min/max over
  the written ones. The last block of a cache that is not a whole number of blocks is shorter:
  the slice start is clamped and the other block's slots are masked out."""
  s = k_BSI.shape[1]
  blk = start // bs
  first = jnp.minimum(blk * bs, s - bs) if s >= bs else 0
  k_BLI = jax.lax.dynamic_slice_in_dim(k_BSI, first, min(bs, s), axis=1)
  slot_L = first + jnp.arange(min(bs, s))
  valid_L1 = ((slot_L // bs == blk) & (slot_L <= start))[:, None]
  new = []
  for kind, old in zip(("mean", "min", "max"), summaries):
    if old is None:
      new.append(None)
      continue
    if kind == "mean":
      v_BI = jnp.where(valid_L1, k_BLI.astype(jnp.float32), 0.0).sum(axis=1) / bs
    else:
      big = jnp.asarray(jnp.inf, k_BLI.dtype)
      v_BI = (jnp.where(valid_L1, k_BLI, big).min(axis=1) if kind == "min"
              else jnp.where(valid_L1, k_BLI, -big).max(axis=1))
    new.append(jax.lax.dynamic_update_slice_in_dim(old, v_BI[:, None, None].astype(old.dtype),
                                                   blk, axis=1))
  return BlockSummaries(*new)


@struct.dataclass
class MoBACache:
  """Keys/values plus each key block's mean key (MoBA's block summary; slot s = position s,
  block c = slots [c * block_size, (c + 1) * block_size)), so a decode step scores blocks by
  reading 1/block_size of the keys. A block's mean is over all its slots (unwritten ones are
  zero), so it is exact from the step the block fills on; only complete blocks are scored."""
  kv: KVCache
  mean_BCKH: jax.Array  # float32 [B, ceil(capacity / block_size), K, H]
  block_size: int = struct.field(pytree_node=False, default=128)

  @classmethod
  def zeros(cls, batch, max_len, num_kv_heads, head_dim, dtype, *, block_size):
    c = -(-max_len // block_size)
    return cls(KVCache.zeros(batch, max_len, num_kv_heads, head_dim, dtype),
               jnp.zeros((batch, c, num_kv_heads, head_dim), jnp.float32), block_size)

  @property
  def capacity(self) -> int:
    return self.kv.capacity

  @property
  def positions(self):
    return self.kv.positions

  def write(self, k_BTKH, v_BTKH, start):
    """Writes positions start..start+T-1 and re-averages the blocks they touch: a one-token
    step (T == 1) reads only its own block; a longer chunk (a prefill) re-averages every block."""
    kv = self.kv.write(k_BTKH, v_BTKH, start)
    b, s, kh, h = kv.k_BSKH.shape
    bs, c = self.block_size, self.mean_BCKH.shape[1]
    if k_BTKH.shape[1] > 1:
      k = jnp.pad(kv.k_BSKH, ((0, 0), (0, c * bs - s), (0, 0), (0, 0)))
      mean_BCKH = k.reshape(b, c, bs, kh, h).astype(jnp.float32).mean(axis=2)
      return self.replace(kv=kv, mean_BCKH=mean_BCKH)
    blk = start // bs
    # The block's slots (the last block of a cache that is not a whole number of blocks is
    # shorter: the slice start is clamped, so take the mean over exactly its own slots then).
    first = jnp.minimum(blk * bs, s - bs) if s >= bs else 0
    k_BLKH = jax.lax.dynamic_slice_in_dim(kv.k_BSKH, first, min(bs, s), axis=1)
    own_L = (first + jnp.arange(min(bs, s))) // bs == blk
    mean_BKH = jnp.where(own_L[None, :, None, None], k_BLKH.astype(jnp.float32), 0.0).sum(
        axis=1) / bs
    mean = jax.lax.dynamic_update_slice_in_dim(self.mean_BCKH, mean_BKH[:, None], blk, axis=1)
    return self.replace(kv=kv, mean_BCKH=mean)


@struct.dataclass
class LightningCache:
  """Lightning attention's recurrent state: the decayed sum of k^T v over every earlier token,
  float32 [B, N, H, H]. It holds no key slots (capacity 0): its size does not grow with the context."""
  kv_BNHJ: jax.Array

  @property
  def capacity(self) -> int:
    return 0

  @property
  def positions(self):
    return jnp.zeros((0,), jnp.int32)

  def write(self, kv_BNHJ, start):
    """The state after a chunk (computed by the lightning recurrence); `start` is not needed."""
    del start
    return self.replace(kv_BNHJ=kv_BNHJ.astype(self.kv_BNHJ.dtype))

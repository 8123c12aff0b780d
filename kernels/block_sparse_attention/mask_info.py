"""Tile metadata for the kernels: the block mask as per-row / per-column lists of non-empty tiles.

Everything here is jnp and traceable, so masks computed inside jit (e.g. a model's top-k block
selection) work. Lists are padded by repeating their last entry, so a pipelined kernel that keeps
stepping past the count re-addresses the tile it already holds instead of fetching a new one.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MaskInfo(NamedTuple):
  """Per-(batch, kv head) tile lists, int32.

  kv_indices [B, K, nq, nk]: for q tile i, the non-empty kv tiles in ascending order, then padding.
  kv_counts  [B, K, nq]:     how many entries of kv_indices[..., i, :] are real.
  q_indices  [B, K, nk, nq]: for kv tile j, the non-empty q tiles (used by the dk/dv kernels).
  q_counts   [B, K, nk].
  """
  kv_indices: jax.Array
  kv_counts: jax.Array
  q_indices: jax.Array
  q_counts: jax.Array


def _compact(mask):
  """Indices of True entries along the last axis, ascending, padded with the last one; and counts."""
  n = mask.shape[-1]
  order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
  counts = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  indices = jnp.where(jnp.arange(n, dtype=jnp.int32) < counts[..., None], order, last)
  return indices, counts


def make_mask_info(block_mask) -> MaskInfo:
  """block_mask bool [B, K, nq, nk] -> MaskInfo (row lists for forward/dq, column lists for dk/dv)."""
  block_mask = jnp.asarray(block_mask, dtype=jnp.bool_)
  kv_indices, kv_counts = _compact(block_mask)
  q_indices, q_counts = _compact(jnp.swapaxes(block_mask, -1, -2))
  return MaskInfo(kv_indices, kv_counts, q_indices, q_counts)

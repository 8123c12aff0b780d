"""Group metadata for the grouped-matmul kernels, computed on device from group_sizes_E.

Rows are cut into fixed row tiles of block_m rows. A "visit" is one (group, row tile) pair whose
rows intersect; a tile straddling a group boundary is visited once per group and each visit keeps
only its group's rows (MegaBlocks / megablox style). Visits run in row order, so the visits of one
tile (and, for tgmm, of one group) are consecutive. The visit count depends on the data, so the
kernels run a static upper bound of grid steps and skip steps at and past `num_visits`.
"""
from typing import NamedTuple

import jax.numpy as jnp


def cdiv(a, b):
  return -(-a // b)


class GroupMetadata(NamedTuple):
  """starts_G, ends_G int32[G]: each group's row range. visit_group_V, visit_tile_V int32[V]:
  the group and row tile of each visit (steps past num_visits repeat the last real visit).
  num_visits int32[1]."""
  starts_G: jnp.ndarray
  ends_G: jnp.ndarray
  visit_group_V: jnp.ndarray
  visit_tile_V: jnp.ndarray
  num_visits: jnp.ndarray


def max_visits(m: int, num_groups: int, block_m: int) -> int:
  """Static bound on visits: every tile once plus one extra per group boundary (and empty group)."""
  return cdiv(m, block_m) + num_groups


def group_metadata(group_sizes_E, m: int, block_m: int, *, trailing_group: bool,
                   visit_empty: bool) -> GroupMetadata:
  """Metadata of the E groups of group_sizes_E over m rows.

  trailing_group: add group E = the rows [sum(group_sizes), m) (gmm writes zeros there).
  visit_empty: give each empty group one visit over zero rows (tgmm writes its zero gradient).
  """
  sizes = group_sizes_E.astype(jnp.int32)
  ends = jnp.minimum(jnp.cumsum(sizes), m)
  if trailing_group:
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  num_tiles = cdiv(m, block_m)
  first_tile = starts // block_m
  visits_G = jnp.where(ends > starts, cdiv(ends, block_m) - first_tile, 0)
  if visit_empty:
    visits_G = jnp.maximum(visits_G, 1)
  visit_end_G = jnp.cumsum(visits_G)
  num_visits = visit_end_G[-1]
  v_V = jnp.minimum(jnp.arange(max_visits(m, starts.shape[0], block_m)), num_visits - 1)
  # The group of visit v: how many groups' visits end at or before v. ([V, G] compares: G <= ~1K.)
  group_V = jnp.sum(v_V[:, None] >= visit_end_G[None, :], axis=1).astype(jnp.int32)
  tile_V = first_tile[group_V] + v_V - (visit_end_G - visits_G)[group_V]
  tile_V = jnp.clip(tile_V, 0, max(num_tiles - 1, 0)).astype(jnp.int32)
  return GroupMetadata(starts, ends, group_V, tile_V, num_visits.reshape(1).astype(jnp.int32))

"""KV-outer layout: (query, slot) pairs routed to the key block they selected, like tokens to experts.

Each query of a kv group picks k key blocks. Sorting its T * k (query, slot) pairs by block id and
padding every block's run to a multiple of `rows` (the kernels' row tile) makes each row tile belong
to ONE key block: a kernel step then multiplies `rows` queries by that block's keys (an M = rows
matmul on the tensor cores / MXU) instead of the G heads of a single query. Everything is jnp and
traceable (the lists come from a top-k inside jit).

Why KV-outer (per kv head, bf16, H = 128, block bs = 128, G = 6 query heads per kv head):
- query-centric: per (query, slot) load K and V of one block (4 * bs * H bytes) for 4 * G * bs * H
  FLOPs -> ~G = 6 FLOP/byte, and the matmul has only M = G rows (padded to 64 on a Hopper wgmma:
  >= 90% of the tensor core idle).
- KV-outer (this layout): a step loads one K/V block (4 * bs * H bytes) plus `rows` routed query rows
  (2 * rows * H) and writes f32 partials (4 * rows * H + lse) for 4 * rows * bs * H FLOPs ->
  4 * 128 * 128 / (4 * 128 + 6 * 128) ~ 50-85 FLOP/byte with M = rows = 128; the price is the
  routed copy of q and the partial outputs (k x the size of q, bounded by scanning kv heads) and a
  combine over the k slots. The GPU measurement (benchmarks/prefill.py) decides whether it wins.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  """Per (batch, kv head) row r = b * K + kh, int32.

  row_query [R, L]: query index of each sorted row; -1 on padding rows (they see no key).
  slot_row  [R, T, k]: the sorted row holding (query t, slot); L (one past the end) on empty slots.
  tile_block [R, L // rows]: the key block of each row tile; tiles past the last real one repeat
    the last real tile's block (no new DMA, compute skipped).
  tile_count [R]: number of real tiles.
  """
  row_query: jax.Array
  slot_row: jax.Array
  tile_block: jax.Array
  tile_count: jax.Array


def num_sorted_rows(t, k, num_blocks, rows):
  """Static bound on the padded sorted length L: every non-empty block's run rounds up to `rows`."""
  return (-(-t * k // rows) + min(num_blocks, t * k)) * rows


def make_routing(indices_BKTk, num_blocks: int, rows: int) -> Routing:
  """Index lists [B, K, T, k] (-1 = empty; no repeats within a list) -> Routing."""
  b, kh, t, k = indices_BKTk.shape
  length = num_sorted_rows(t, k, num_blocks, rows)
  blk_RE = indices_BKTk.reshape(b * kh, t * k)
  blk_RE = jnp.where(blk_RE < 0, num_blocks, blk_RE)               # empty slots sort last
  order_RE = jnp.argsort(blk_RE, axis=-1, stable=True).astype(jnp.int32)
  sorted_blk = jnp.take_along_axis(blk_RE, order_RE, axis=-1)

  def per_row(blk_E, order_E, sorted_E):
    counts = jnp.zeros(num_blocks + 1, jnp.int32).at[blk_E].add(1)[:num_blocks]
    padded = -(-counts // rows) * rows
    ends = jnp.cumsum(padded)
    starts = ends - padded
    first = jnp.cumsum(counts) - counts                           # unpadded run starts
    pos = jnp.arange(t * k, dtype=jnp.int32)
    safe = jnp.minimum(sorted_E, num_blocks - 1)
    dest_sorted = jnp.where(sorted_E < num_blocks, starts[safe] + pos - first[safe], length)
    row_query = jnp.full(length, -1, jnp.int32).at[dest_sorted].set(order_E // k, mode="drop")
    dest_E = jnp.zeros(t * k, jnp.int32).at[order_E].set(dest_sorted)
    count = ends[-1] // rows
    tile_start = jnp.arange(length // rows, dtype=jnp.int32) * rows
    tile_block = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
    last = tile_block[jnp.maximum(count - 1, 0)]
    tile_block = jnp.where(jnp.arange(length // rows) < count, tile_block, last)
    return row_query, dest_E.reshape(t, k), jnp.minimum(tile_block, num_blocks - 1), count

  row_query, slot_row, tile_block, count = jax.vmap(per_row)(blk_RE, order_RE, sorted_blk)
  return Routing(row_query, slot_row, tile_block, count.astype(jnp.int32))


def to_rows(x_RTX, routing: Routing):
  """Per-query values [R, ..., T, X] -> sorted rows [R, ..., L, X] (padding rows read query 0)."""
  q = jnp.maximum(routing.row_query, 0)
  while q.ndim < x_RTX.ndim - 1:
    q = q[:, None]
  return jnp.take_along_axis(x_RTX, q[..., None], axis=-2)


def from_rows(x_RLX, routing: Routing, fill=0.0):
  """Sorted rows [R, ..., L, X] -> per-(query, slot) values [R, ..., T, k, X] (empty slots: fill)."""
  r, t, k = routing.slot_row.shape
  pad = [(0, 0)] * (x_RLX.ndim - 2) + [(0, 1), (0, 0)]
  x = jnp.pad(x_RLX, pad, constant_values=fill)                    # row L reads `fill`
  idx = routing.slot_row.reshape(r, t * k)
  while idx.ndim < x.ndim - 1:
    idx = idx[:, None]
  y = jnp.take_along_axis(x, idx[..., None], axis=-2)
  return y.reshape(y.shape[:-2] + (t, k, y.shape[-1]))


def visited_blocks(routing: Routing, num_blocks: int):
  """bool [R, C]: key blocks some real tile reads (the others get zero dk/dv)."""
  real = jnp.arange(routing.tile_block.shape[1]) < routing.tile_count[:, None]
  return jax.vmap(lambda blk, re: jnp.zeros(num_blocks, bool).at[blk].max(re))(
      routing.tile_block, real)

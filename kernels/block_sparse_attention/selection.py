"""Block selection: the one vocabulary the kernels and the model share for "which key blocks".

A selection is made per row: a row is one query (the model's per-query selections, bool [B, K, T, C])
or one query tile (the kernels' tile masks, bool [B, K, nq, nk]); the functions here do not care
which. Two equivalent forms:
  index lists  int32 [..., k]: selected block ids, -1 for an unused slot (the HF / MSA format);
  block masks  bool [..., C]: True = the row may attend to block c.
Everything is jnp and traceable (selections are computed inside jit). The model imports these;
nothing here imports the model.
"""
import jax
import jax.numpy as jnp


def block_mask_from_indices(indices, num_blocks: int):
  """Index lists [..., k] (block ids, negative = empty slot) -> bool block mask [..., num_blocks]."""
  onehot = indices[..., None] == jnp.arange(num_blocks)
  return jnp.any(onehot & (indices[..., None] >= 0), axis=-2)


def topk_indices(scores, top_k: int):
  """The top_k blocks of each row by score [..., C] (float), as index lists int32 [..., min(top_k, C)].

  A block whose score is -inf is never selected: its slot holds -1.
  """
  top_scores, indices = jax.lax.top_k(scores, min(top_k, scores.shape[-1]))
  return jnp.where(top_scores == -jnp.inf, -1, indices).astype(jnp.int32)


def local_blocks_mask(row_block, num_blocks: int, local_blocks: int):
  """bool [..., num_blocks]: the `local_blocks` blocks ending at each row's own block `row_block`
  (int [...]), clipped at block 0."""
  local = jnp.zeros(row_block.shape + (num_blocks,), bool)
  for i in range(local_blocks):
    local |= jnp.maximum(row_block - i, 0)[..., None] == jnp.arange(num_blocks)
  return local


def select_blocks(scores, row_block, *, top_k: int, local_blocks: int = 1):
  """Top-k blocks per row with the local blocks forced in, as HF's MiniMax-M3 indexer chooses them.

  scores: float32 [..., C] block scores; blocks holding only future keys must already be -inf.
  row_block: int, broadcastable to scores.shape[:-1] (e.g. [B, 1, T] for [B, K, T, C] scores): the
    block of each row's (last) query.
  The `local_blocks` blocks ending at the row's own block get +inf, so they count among the top_k
  and are always kept; a block whose score stays -inf is never selected.
  Returns (block mask bool [..., C], index lists int32 [..., min(top_k, C)] with -1 for unused slots).
  """
  c = scores.shape[-1]
  scores = jnp.where(local_blocks_mask(row_block, c, local_blocks), jnp.inf, scores)
  indices = topk_indices(scores, top_k)
  return block_mask_from_indices(indices, c), indices

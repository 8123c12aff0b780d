"""Block-sparse attention: Pallas TPU / Triton / Mosaic-GPU kernels, jnp reference, tile masks and
the block-selection helpers the model shares (selection.py)."""
from .api import IMPLEMENTATIONS, block_sparse_attention, default_implementation
from .mask_info import MaskInfo, make_mask_info
from .masks import (broadcast_mask, causal_block_mask, chunked_block_mask, moba_block_mask,
                    msa_block_mask, sliding_window_block_mask, topk_block_mask)
from .reference import block_sparse_attention_reference, dense_mask, masked_attention_reference
from .selection import block_mask_from_indices, local_blocks_mask, select_blocks, topk_indices

__all__ = [
    "IMPLEMENTATIONS", "block_sparse_attention", "default_implementation", "MaskInfo",
    "make_mask_info", "broadcast_mask", "causal_block_mask", "chunked_block_mask",
    "moba_block_mask", "msa_block_mask", "sliding_window_block_mask", "topk_block_mask",
    "block_sparse_attention_reference", "dense_mask", "masked_attention_reference",
    "block_mask_from_indices", "local_blocks_mask", "select_blocks", "topk_indices",
]

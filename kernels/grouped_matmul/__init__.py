"""Grouped matmul (MoE experts): Pallas TPU / Triton kernels, XLA references, group metadata."""
from .api import BlockSizes, DEFAULT_BLOCK_SIZES, IMPLEMENTATIONS, default_implementation, grouped_matmul
from .metadata import GroupMetadata, group_metadata
from .reference import gmm_blocked, gmm_dense_reference, gmm_ragged_dot, tgmm_blocked, tgmm_ragged_dot

__all__ = [
    "BlockSizes", "DEFAULT_BLOCK_SIZES", "IMPLEMENTATIONS", "default_implementation",
    "grouped_matmul", "GroupMetadata", "group_metadata", "gmm_blocked", "gmm_dense_reference",
    "gmm_ragged_dot", "tgmm_blocked", "tgmm_ragged_dot",
]

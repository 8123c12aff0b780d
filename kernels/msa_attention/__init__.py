"""MSA (MiniMax sparse attention) kernels: index block scores, top-k, KV-outer sparse attention, KL."""
from .api import (IMPLEMENTATIONS, BlockSizes, default_implementation, msa_attention,
                  msa_block_scores, msa_indexer_kl, msa_select)
from .reference import (block_scores_reference, indexer_kl_reference, select_blocks,
                        sparse_attention_reference)

__all__ = [
    "IMPLEMENTATIONS", "BlockSizes", "default_implementation", "msa_attention", "msa_block_scores",
    "msa_indexer_kl", "msa_select", "block_scores_reference", "indexer_kl_reference",
    "select_blocks", "sparse_attention_reference",
]

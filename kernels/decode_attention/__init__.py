"""Decode attention (q_len 1) over a KV cache: dense GQA, MSA and block-summary decode.

XLA references, Pallas TPU and Pallas Triton kernels behind one `implementation=` switch (api.py).
"""
from .api import (IMPLEMENTATIONS, SUMMARY_KINDS, BlockSizes, default_implementation, dense_decode,
                  msa_block_scores, msa_decode, msa_summary_block_scores, select_forced,
                  sparse_decode, summary_block_scores, summary_decode)
from .reference import (BlockSummaries, block_summaries, dense_decode_reference,
                        index_block_scores_reference, moba_block_scores_reference,
                        msa_summary_block_scores_reference, quest_block_scores_reference,
                        select_top_blocks, sparse_decode_reference, update_block_summaries)

__all__ = [
    "IMPLEMENTATIONS", "SUMMARY_KINDS", "BlockSizes", "default_implementation", "dense_decode",
    "msa_block_scores", "msa_decode", "msa_summary_block_scores", "select_forced",
    "sparse_decode", "summary_block_scores", "summary_decode",
    "BlockSummaries", "block_summaries", "dense_decode_reference", "index_block_scores_reference",
    "moba_block_scores_reference", "msa_summary_block_scores_reference",
    "quest_block_scores_reference", "select_top_blocks", "sparse_decode_reference",
    "update_block_summaries",
]

"""Synthetic long-context tasks, byte-level text and grain pipelines (numpy only, no jax)."""
from mixtral_jax.data.pipeline import (make_eval_batches, make_train_iterator, mixture, task_names,
                                       train_example)
from mixtral_jax.data.tasks import TASK_IDS, TASKS, TEXT_TASK_ID, generate, score, score_counts
from mixtral_jax.data.text import TextDataset
from mixtral_jax.data.tokenizer import BYTE_VOCAB_SIZE, VOCAB_SIZE, Tokenizer

"""Byte-level text from user files: a deterministic train / held-out split, seq_len-byte examples.

Each file's last `heldout_fraction` of bytes is held out, so the split does not depend on how many
files there are or their order. NUL bytes are dropped on load (NUL is PAD in byte mode).
Examples have the task format of `tasks.py`; text has no answers, so loss_mask == lm_mask.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from mixtral_jax.data.tasks import TEXT_TASK_ID, Example, _finish
from mixtral_jax.data.tokenizer import PAD


def expand_files(patterns) -> list[str]:
  """Sorted, de-duplicated files matched by `patterns` (paths or globs, `~` expanded)."""
  if isinstance(patterns, str):
    patterns = (patterns,)
  files = set()
  for pattern in patterns:
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    if not matches:
      raise ValueError(f"text_files: {pattern!r} matches no file")
    files.update(m for m in matches if os.path.isfile(m))
  return sorted(files)


class TextDataset:
  """Bytes of `patterns` split into train (random windows) and held-out (consecutive windows).

  Args:
    patterns: file paths or globs.
    heldout_fraction: the tail fraction of each file that is held out.
  Attributes:
    train, heldout: uint8 arrays of the concatenated train / held-out bytes.
  """

  def __init__(self, patterns, *, heldout_fraction: float = 0.05):
    if not 0.0 <= heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction: must be in [0, 1), got {heldout_fraction}")
    self.files = expand_files(patterns)
    train, heldout = [], []
    for path in self.files:
      data = np.fromfile(path, dtype=np.uint8)
      data = data[data != PAD]
      cut = len(data) - int(round(heldout_fraction * len(data)))
      train.append(data[:cut])
      heldout.append(data[cut:])
    self.train = np.concatenate(train) if train else np.zeros(0, np.uint8)
    self.heldout = np.concatenate(heldout) if heldout else np.zeros(0, np.uint8)

  def train_example(self, rng: np.random.Generator, seq_len: int) -> Example:
    """seq_len + 1 bytes from a uniform random offset of the train split."""
    n = len(self.train)
    if n < seq_len + 1:
      raise ValueError(f"text_files: the train split has {n} bytes, fewer than "
                       f"seq_len + 1 = {seq_len + 1}")
    off = int(rng.integers(0, n - seq_len))
    return _text_example(self.train[off:off + seq_len + 1], seq_len)

  def heldout_examples(self, seq_len: int, max_examples: int | None = None) -> list[Example]:
    """Consecutive windows with stride seq_len (each held-out byte is a target once); the last
    one is padded."""
    out = []
    for off in range(0, max(len(self.heldout) - 1, 0), seq_len):
      if max_examples is not None and len(out) >= max_examples:
        break
      out.append(_text_example(self.heldout[off:off + seq_len + 1], seq_len))
    return out


def _text_example(chunk: np.ndarray, seq_len: int) -> Example:
  ex = _finish(chunk.astype(np.int32), [], seq_len, TEXT_TASK_ID)
  ex["loss_mask"] = ex["lm_mask"].copy()
  return ex

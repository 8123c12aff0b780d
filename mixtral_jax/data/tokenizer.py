"""Token ids for the synthetic tasks and the byte-level text mode; both fit a vocab of 256.

Synthetic layout (ids):
  0 PAD, 1 BOS, 2 EOS, 3 SEP, 4 QUERY, 5 ANSWER, 6 VAR, 7 EQ, 8 KEY, 9 VALUE, 10-15 reserved
  16-79   KEYS   (64 key / variable-name symbols)
  80-143  VALUES (64 value symbols)
  144-255 WORDS  (112 word symbols: haystack filler, word lists)
Byte mode: id == byte value. NUL (0) doubles as PAD, so text loading drops NUL bytes; no other
specials are needed for plain next-byte prediction, which keeps the byte vocab at exactly 256.
"""
from __future__ import annotations

import numpy as np

PAD, BOS, EOS, SEP, QUERY, ANSWER, VAR, EQ, KEY, VALUE = range(10)
NUM_SPECIAL = 16
KEYS = np.arange(16, 80, dtype=np.int32)
VALUES = np.arange(80, 144, dtype=np.int32)
WORDS = np.arange(144, 256, dtype=np.int32)
VOCAB_SIZE = 256        # synthetic vocab: the largest id + 1
BYTE_VOCAB_SIZE = 256   # byte mode: 256 byte values, PAD == NUL

SPECIAL_NAMES = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", SEP: "<sep>", QUERY: "<query>",
                 ANSWER: "<answer>", VAR: "VAR", EQ: "=", KEY: "<key>", VALUE: "<value>"}
MODES = ("synthetic", "bytes")


def is_key(ids) -> np.ndarray:
  ids = np.asarray(ids)
  return (ids >= KEYS[0]) & (ids <= KEYS[-1])


def is_value(ids) -> np.ndarray:
  ids = np.asarray(ids)
  return (ids >= VALUES[0]) & (ids <= VALUES[-1])


def is_word(ids) -> np.ndarray:
  ids = np.asarray(ids)
  return (ids >= WORDS[0]) & (ids <= WORDS[-1])


class Tokenizer:
  """Maps ids to readable strings (synthetic) or bytes <-> ids (bytes).

  Args:
    mode: "synthetic" or "bytes".
    vocab_size: the model's vocab size; construction fails if this tokenizer's ids do not fit.
  """

  def __init__(self, mode: str = "synthetic", vocab_size: int = 256):
    if mode not in MODES:
      raise ValueError(f"mode: unknown {mode!r}; expected one of {MODES}")
    self.mode = mode
    self.vocab_size = VOCAB_SIZE if mode == "synthetic" else BYTE_VOCAB_SIZE
    if self.vocab_size > vocab_size:
      raise ValueError(f"vocab_size: the {mode} tokenizer needs {self.vocab_size} ids, "
                       f"the model has {vocab_size}")

  def encode(self, text: str | bytes) -> np.ndarray:
    """Byte mode: UTF-8 bytes -> int32[n] ids, NUL bytes dropped (NUL is PAD)."""
    if self.mode != "bytes":
      raise ValueError("encode: only bytes mode encodes text; synthetic tasks build ids directly")
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    return ids[ids != PAD]

  def decode(self, ids) -> str:
    """ids -> text (bytes mode, PAD skipped) or space-separated symbol names (synthetic)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.mode == "bytes":
      return bytes(i for i in ids if i != PAD).decode("utf-8", errors="replace")
    return " ".join(self.token_name(i) for i in ids)

  @staticmethod
  def token_name(i: int) -> str:
    if i in SPECIAL_NAMES:
      return SPECIAL_NAMES[i]
    if KEYS[0] <= i <= KEYS[-1]:
      return f"k{i - KEYS[0]}"
    if VALUES[0] <= i <= VALUES[-1]:
      return f"v{i - VALUES[0]}"
    if WORDS[0] <= i <= WORDS[-1]:
      return f"w{i - WORDS[0]}"
    return f"<unused{i}>"

"""Streaming safetensors: read one tensor at a time (memory-mapped), write sharded files.

A small reader/writer of the safetensors format (8-byte little-endian header length, JSON header
{name: {dtype, shape, data_offsets}}, raw little-endian bytes) so bfloat16 and float8 tensors come
back as numpy arrays (ml_dtypes) without torch, and nothing is read before it is asked for.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointFormatError(ValueError):
  """A checkpoint file or tensor is unreadable; the message names it."""


def _read_header(path: str) -> tuple[dict, int]:
  """(header, data start), checking every tensor's byte range against the file's size, so a
  truncated or foreign file fails here with the file (and tensor) named, not on first read."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointFormatError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise CheckpointFormatError(f"{path}: not a safetensors file or truncated (header of {n} "
                                  f"bytes in a file of {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointFormatError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
  if not isinstance(header, dict):
    raise CheckpointFormatError(f"{path}: not a safetensors file (header is not a JSON object)")
  data_bytes = size - 8 - n
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      begin, end = (int(x) for x in info["data_offsets"])
      shape = tuple(int(d) for d in info["shape"])
      dtype = info["dtype"]
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointFormatError(f"{path}: tensor {name!r}: malformed header entry {info!r}") from e
    if not 0 <= begin <= end:
      raise CheckpointFormatError(f"{path}: tensor {name!r}: bad data_offsets {[begin, end]}")
    if end > data_bytes:
      raise CheckpointFormatError(
          f"{path}: tensor {name!r} (shape {shape}, {dtype}) needs bytes [{begin}, {end}) of the "
          f"data but the file holds {data_bytes}: truncated?")
  return header, 8 + n


class SafetensorsReader:
  """All tensors of a checkpoint: a directory (single `model.safetensors`, or sharded with
  `model.safetensors.index.json`) or one `.safetensors` file. `read(name)` returns a numpy array
  backed by the memory map (no copy until used)."""

  def __init__(self, path: str):
    if os.path.isdir(path):
      index = os.path.join(path, INDEX_FILE)
      if os.path.exists(index):
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
      elif os.path.exists(os.path.join(path, SINGLE_FILE)):
        files = [SINGLE_FILE]
      else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not files:
        raise CheckpointFormatError(f"{path}: no *.safetensors files")
      files = [os.path.join(path, f) for f in files]
    else:
      files = [path]
    self._entries: dict[str, tuple[str, dict, int]] = {}
    self._maps: dict[str, mmap.mmap] = {}
    for file in files:
      if not os.path.exists(file):
        raise CheckpointFormatError(f"{file}: listed in the index but missing")
      header, start = _read_header(file)
      for name, info in header.items():
        if name == "__metadata__":
          continue
        if name in self._entries:
          raise CheckpointFormatError(
              f"tensor {name!r} appears in two files: {self._entries[name][0]} and {file}")
        self._entries[name] = (file, info, start)

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][1]["shape"])

  def read(self, name: str) -> np.ndarray:
    if name not in self._entries:
      raise CheckpointFormatError(f"tensor {name!r} is not in the checkpoint")
    file, info, start = self._entries[name]
    if info["dtype"] not in DTYPES:
      raise CheckpointFormatError(f"{file}: tensor {name!r}: unsupported dtype {info['dtype']}")
    if file not in self._maps:
      with open(file, "rb") as f:
        self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    begin, end = info["data_offsets"]
    dtype = np.dtype(DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise CheckpointFormatError(
          f"{file}: tensor {name!r}: {end - begin} bytes for shape {shape} {dtype}")
    return np.frombuffer(self._maps[file], dtype=dtype, count=count, offset=start + begin).reshape(shape)

  def close(self):
    for m in self._maps.values():
      try:
        m.close()
      except BufferError:  # an array still views it; the map closes when that array is freed
        pass
    self._maps.clear()


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None):
  """Writes one safetensors file (metadata {"format": "pt"} so transformers reads it)."""
  header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
  offset = 0
  arrays = []
  for name, a in tensors.items():
    a = np.ascontiguousarray(a)
    if a.dtype not in _NAMES:
      raise CheckpointFormatError(f"tensor {name!r}: cannot store dtype {a.dtype}")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


class ShardedWriter:
  """Collects tensors and writes `model.safetensors`, or shards of at most `max_shard_bytes`
  named model-0000i-of-0000n.safetensors plus `model.safetensors.index.json`."""

  def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 2**30):
    self.out_dir = out_dir
    self.max_shard_bytes = max_shard_bytes
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[tuple[str, list[str]]] = []
    self._total = 0
    os.makedirs(out_dir, exist_ok=True)

  def add(self, name: str, array: np.ndarray):
    if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending[name] = array
    self._pending_bytes += array.nbytes
    self._total += array.nbytes

  def add_all(self, items: Iterable[tuple[str, np.ndarray]]):
    for name, a in items:
      self.add(name, a)

  def _flush(self):
    tmp = os.path.join(self.out_dir, f".shard-{len(self._shards):05d}.safetensors")
    save_file(self._pending, tmp)
    self._shards.append((tmp, list(self._pending)))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> list[str]:
    """Writes what is left and the index; returns the file names written."""
    if self._pending or not self._shards:
      self._flush()
    n = len(self._shards)
    if n == 1:
      final = os.path.join(self.out_dir, SINGLE_FILE)
      os.replace(self._shards[0][0], final)
      return [SINGLE_FILE]
    weight_map, names = {}, []
    for i, (tmp, tensor_names) in enumerate(self._shards):
      fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(tmp, os.path.join(self.out_dir, fname))
      names.append(fname)
      weight_map.update({t: fname for t in tensor_names})
    with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": self._total}, "weight_map": weight_map}, f, indent=2)
    return names

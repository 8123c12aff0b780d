"""grain pipelines: an infinite, resumable train stream mixing tasks (and text), and eval batches.

Example g of the global train stream is a pure function of (seed, g): its source is drawn from
config.data.tasks weights and its content generated with `default_rng([seed, 0, g])`. Process
`shard_index` of `shard_count` reads, for step s, the global examples
  s * B + shard_index * b + r,   r < b = B // shard_count   (B = config.train.batch_size),
so the shards are disjoint slices of one global batch. With config.data.curriculum (pairs
(until_step, length), ascending), the examples of step s are generated at the length of the first
pair with s < until_step (seq_len after the last) and padded to seq_len: the batch shape, hence the
compiled step, never changes. Random access by index means the iterator
state is just grain's `{"next_index": steps_done}` (JSON), and set_state() resumes exactly.
"""
from __future__ import annotations

import functools

import grain
import numpy as np

from mixtral_jax.data import tasks as tasks_lib
from mixtral_jax.data.text import TextDataset
from mixtral_jax.data.tokenizer import Tokenizer

TRAIN_STREAM, EVAL_STREAM = 0, 1
TEXT = "text"
_INFINITE = 2 ** 50  # "infinite" stream length in examples (grain needs a finite MapDataset)


def mixture(data_config) -> tuple[tuple[str, ...], np.ndarray]:
  """(source names, sampling probabilities) from config.data.

  Sources are config.data.tasks (name -> weight); with config.data.text_files, byte-level text
  is one more source whose weight is tasks["text"] if given, else 1.0.
  """
  weights = dict(data_config.tasks)
  text_files = tuple(data_config.get("text_files", ()) or ())
  if TEXT in weights and not text_files:
    raise ValueError("config.data.tasks: 'text' has a weight but config.data.text_files is empty")
  if text_files:
    weights.setdefault(TEXT, 1.0)
  for name, w in weights.items():
    if name != TEXT and name not in tasks_lib.TASKS:
      raise ValueError(f"config.data.tasks: unknown task {name!r}; "
                       f"expected one of {tuple(tasks_lib.TASKS)}")
    if w < 0:
      raise ValueError(f"config.data.tasks[{name!r}]: negative weight {w}")
  names = tuple(weights)
  p = np.array([weights[n] for n in names], np.float64)
  if not names or p.sum() <= 0:
    raise ValueError("config.data.tasks: no source with a positive weight")
  return names, p / p.sum()


def task_names() -> list[str]:
  """batch["task_id"] -> name: TASKS registry order, then "text". The ids are global (the same for
  every config), so a run's metrics and a mixed evaluation agree on them."""
  return list(tasks_lib.TASKS) + [TEXT]


def content_length(curriculum, step: int, seq_len: int) -> int:
  """Length the examples of `step` are generated at: see the module docstring."""
  for until, length in curriculum or ():
    if step < until:
      return min(int(length), seq_len)
  return seq_len


def _check_curriculum(curriculum, seq_len: int):
  prev = -1
  for pair in curriculum or ():
    if len(pair) != 2 or pair[0] <= prev or not tasks_lib.MIN_SEQ_LEN <= pair[1] <= seq_len:
      raise ValueError(f"config.data.curriculum: {pair!r} is not (until_step, length) with "
                       f"ascending steps and {tasks_lib.MIN_SEQ_LEN} <= length <= seq_len={seq_len}")
    prev = pair[0]


def _pad(example, seq_len: int):
  """Pads a shorter example with PAD and zero masks (PAD == 0) to seq_len."""
  out = {}
  for k, v in example.items():
    out[k] = v if v.ndim == 0 else np.pad(v, (0, seq_len - len(v)))
  return out


def _example(index: int, *, seed: int, seq_len: int, names, probs, text: TextDataset | None,
             curriculum=(), global_batch: int = 1):
  rng = np.random.default_rng([seed, TRAIN_STREAM, int(index)])
  name = names[rng.choice(len(names), p=probs)] if len(names) > 1 else names[0]
  length = content_length(curriculum, int(index) // global_batch, seq_len)
  if name == TEXT:
    return _pad(text.train_example(rng, length), seq_len)
  return _pad(tasks_lib.TASKS[name](rng, length), seq_len)


def _global_index(j: int, *, global_batch: int, local_batch: int, shard_index: int) -> int:
  step, r = divmod(int(j), local_batch)
  return step * global_batch + shard_index * local_batch + r


def train_example(config, seed: int, index: int, text: TextDataset | None = None):
  """Global train example `index` (what make_train_iterator yields), for inspection and tests."""
  names, probs = mixture(config.data)
  if TEXT in names and text is None:
    text = TextDataset(config.data.text_files)
  curriculum = tuple(tuple(p) for p in (config.data.get("curriculum", ()) or ()))
  return _example(index, seed=seed, seq_len=config.train.seq_len, names=names, probs=probs,
                  text=text, curriculum=curriculum, global_batch=config.train.batch_size)


def make_train_iterator(config, *, seed: int, shard_index: int = 0, shard_count: int = 1):
  """Infinite iterator of this process's batches.

  Yields dicts: inputs/targets int32[b, T], loss_mask/lm_mask float32[b, T], task_id int32[b],
  with b = config.train.batch_size // shard_count and T = config.train.seq_len.
  `it.get_state()` is a JSON-serializable dict; `it.set_state(state)` on a fresh iterator from the
  same (config, seed, shard) continues with exactly the next batch.
  """
  global_batch = config.train.batch_size
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index: {shard_index} not in [0, shard_count={shard_count})")
  if global_batch % shard_count:
    raise ValueError(f"config.train.batch_size: {global_batch} is not divisible by "
                     f"shard_count={shard_count}")
  names, probs = mixture(config.data)
  vocab_size = config.model.vocab_size
  if any(n != TEXT for n in names):
    Tokenizer("synthetic", vocab_size)  # raises if the synthetic vocab does not fit the model
  text = None
  if TEXT in names:
    Tokenizer("bytes", vocab_size)
    text = TextDataset(config.data.text_files)
  curriculum = tuple(tuple(p) for p in (config.data.get("curriculum", ()) or ()))
  _check_curriculum(curriculum, config.train.seq_len)
  local_batch = global_batch // shard_count
  ds = grain.MapDataset.range(_INFINITE)
  ds = ds.map(functools.partial(_global_index, global_batch=global_batch,
                                local_batch=local_batch, shard_index=shard_index))
  ds = ds.map(functools.partial(_example, seed=seed, seq_len=config.train.seq_len, names=names,
                                probs=probs, text=text, curriculum=curriculum,
                                global_batch=global_batch))
  ds = ds.batch(local_batch, drop_remainder=True)
  threads = max(1, int(config.data.get("num_workers", 0) or 0))
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4)
  return iter(ds.to_iter_dataset(read))


def _stack(examples):
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def _blank(like):
  """An all-PAD example with zero masks: pads the last eval batch without adding answers."""
  return {k: np.zeros_like(v) for k, v in like.items()}


def make_eval_batches(task: str, seq_len: int, num_examples: int, batch_size: int, seed: int, *,
                      text_files=()) -> list[dict]:
  """Fixed eval batches: ceil(num_examples / batch_size) dicts shaped like the train batches.

  Synthetic tasks: example i comes from `default_rng([seed, 1, task_id, seq_len, i])`, disjoint
  from the train stream. task="text": the first num_examples held-out windows of text_files.
  The last batch is filled with blank examples (zero masks) so every batch has batch_size rows.
  """
  if task == TEXT:
    examples = TextDataset(text_files).heldout_examples(seq_len, num_examples)
    if not examples:
      raise ValueError("text_files: the held-out split is empty")
  elif task in tasks_lib.TASKS:
    tid = tasks_lib.TASK_IDS[task]
    examples = [tasks_lib.TASKS[task](np.random.default_rng([seed, EVAL_STREAM, tid, seq_len, i]),
                                      seq_len) for i in range(num_examples)]
  else:
    raise ValueError(f"task: unknown {task!r}; expected 'text' or one of {tuple(tasks_lib.TASKS)}")
  batches = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    chunk += [_blank(chunk[0])] * (batch_size - len(chunk))
    batches.append(_stack(chunk))
  return batches

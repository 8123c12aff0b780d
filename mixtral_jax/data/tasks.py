"""Synthetic long-context tasks, generated on the fly from a numpy Generator.

Every task is `fn(rng: np.random.Generator, seq_len: int) -> example` with
  inputs    int32[seq_len]    tokens 0..T-1 of a (seq_len + 1)-token sequence
  targets   int32[seq_len]    tokens 1..T (next-token targets)
  loss_mask float32[seq_len]  1 where the target is an answer token
  lm_mask   float32[seq_len]  1 where the target is a real (non-PAD) token
  task_id   int32[]           TASK_IDS[name]
Content scales with seq_len (more pairs / distractors / words / filler), so a model trained at one
length can be evaluated at longer ones; sequences are padded with PAD to exactly seq_len.
Token ids are in `tokenizer.py`. Answers always follow `ANSWER` (or, in mqar, a queried key), so
teacher-forced greedy scoring (`score`) reads the logits at the positions where loss_mask == 1.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from mixtral_jax.data.tokenizer import (ANSWER, BOS, EOS, EQ, KEY, KEYS, PAD, QUERY, VALUE, VALUES,
                                        VAR, WORDS)

MIN_SEQ_LEN = 64
MQAR_POWER_A = 0.01     # Zoology: query gap p(g) ~ g^(a - 1), mostly short gaps, a long tail
MULTI_NEEDLES = 4       # RULER niah_multivalue / niah_multiquery: 4 values / 4 keys
VT_HOPS = 4             # RULER: one chain = 1 + hops variables
TOP_WORDS = 3           # cwe / fwe: how many most-frequent words are asked for
FWE_ALPHA = 2.0         # RULER fwe: Zipf exponent of the word distribution
MQAR_FAR_START = 0.5    # mqar_far: every query in the last half of the query region
VT_MAX_CHAINS = 8       # multi-hop variable tracking: chains (= queries) per example, at most
VT_LEVEL_SPAN = 0.2     # multi-hop variable tracking: level i fills the first fifth of region i

Example = dict[str, np.ndarray]


def _finish(tokens, answer_pos, seq_len: int, task_id: int) -> Example:
  """Pads `tokens` (<= seq_len + 1 ids) and shifts them into inputs / targets / masks."""
  tokens = np.asarray(tokens, np.int32)
  if len(tokens) > seq_len + 1:
    raise AssertionError(f"built {len(tokens)} tokens for seq_len={seq_len}")
  full = np.full(seq_len + 1, PAD, np.int32)
  full[:len(tokens)] = tokens
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[np.asarray(answer_pos, np.int64) - 1] = 1.0  # token p is predicted at input p - 1
  targets = full[1:]
  return {"inputs": full[:-1], "targets": targets, "loss_mask": loss_mask,
          "lm_mask": (targets != PAD).astype(np.float32), "task_id": np.int32(task_id)}


def _embed(rng, filler_len: int, segments) -> tuple[np.ndarray, list[int]]:
  """Random WORDS filler of filler_len with `segments` inserted in order at uniform depths.

  Returns the tokens and the start offset of each segment.
  """
  cuts = np.sort(rng.integers(0, filler_len + 1, size=len(segments)))
  filler = rng.choice(WORDS, size=filler_len)
  out, starts, prev = [], [], 0
  for cut, seg in zip(cuts, segments):
    out.append(filler[prev:cut])
    starts.append(sum(len(o) for o in out))
    out.append(np.asarray(seg, np.int32))
    prev = cut
  out.append(filler[prev:])
  return np.concatenate(out).astype(np.int32), starts


def _check_len(seq_len: int):
  if seq_len < MIN_SEQ_LEN:
    raise ValueError(f"seq_len: {seq_len} is shorter than the minimum {MIN_SEQ_LEN}")


def mqar(rng, seq_len: int, *, far: float = 0.0, name: str = "mqar") -> Example:
  """Multi-query associative recall (Zoology).

  `BOS k1 v1 ... kN vN` then a query region of WORDS noise where each key reappears once, at
  power-law distributed gaps, followed by its value (the answer). N = clip(seq_len // 16, 2, 64):
  8 pairs at 128, 64 from 1024 on (then only the gaps grow). Values are drawn with replacement.
  far > 0: the queries are spread uniformly over the last (1 - far) of the query region instead,
  so every query is at least ~far * seq_len tokens after its pair (mqar_far: beyond any window
  shorter than seq_len / 2).
  """
  _check_len(seq_len)
  n = int(np.clip(seq_len // 16, 2, len(KEYS)))
  keys = rng.choice(KEYS, n, replace=False)
  vals = rng.choice(VALUES, n)
  ctx = np.concatenate([[BOS], np.stack([keys, vals], 1).reshape(-1)]).astype(np.int32)
  region = rng.choice(WORDS, size=seq_len + 1 - len(ctx)).astype(np.int32)
  slots = len(region) // 2
  if far:
    p = (np.arange(slots) >= int(far * slots)).astype(np.float64)
  else:
    p = np.arange(1, slots + 1, dtype=np.float64) ** (MQAR_POWER_A - 1)
  gaps = rng.choice(slots, n, replace=False, p=p / p.sum())
  order = rng.permutation(n)
  region[2 * gaps] = keys[order]
  region[2 * gaps + 1] = vals[order]
  return _finish(np.concatenate([ctx, region]), np.sort(len(ctx) + 2 * gaps + 1), seq_len,
                 TASK_IDS[name])


def mqar_far(rng, seq_len: int) -> Example:
  """MQAR with every query in the last half of the query region (see `mqar`'s `far`)."""
  return mqar(rng, seq_len, far=MQAR_FAR_START, name="mqar_far")


def _niah(rng, seq_len: int, name: str, num_keys: int, values_per_key: int,
          num_queries: int) -> Example:
  """Needles `KEY k VALUE v` in WORDS haystack; per queried key `QUERY k ANSWER v...` at the end.

  The answer lists the key's values in the order they appear in the haystack.
  """
  _check_len(seq_len)
  keys = rng.choice(KEYS, num_keys, replace=False)
  needles = [(k, v) for k in keys for v in rng.choice(VALUES, values_per_key, replace=False)]
  needles = [needles[i] for i in rng.permutation(len(needles))]  # haystack order
  tail, answer_off = [], []
  for k in keys[:num_queries]:
    tail += [QUERY, k, ANSWER]
    for kk, v in needles:
      if kk == k:
        answer_off.append(len(tail))
        tail.append(v)
  tail.append(EOS)
  filler_len = seq_len + 1 - 1 - 4 * len(needles) - len(tail)
  body, _ = _embed(rng, filler_len, [[KEY, k, VALUE, v] for k, v in needles])
  tokens = np.concatenate([[BOS], body, tail])
  start = 1 + len(body)
  return _finish(tokens, [start + o for o in answer_off], seq_len, TASK_IDS[name])


def niah_single(rng, seq_len: int) -> Example:
  """One needle in the haystack, asked for its value."""
  return _niah(rng, seq_len, "niah_single", 1, 1, 1)


def niah_multikey(rng, seq_len: int) -> Example:
  """One queried needle among distractors of other keys; clip(seq_len // 64, 2, 32) needles."""
  return _niah(rng, seq_len, "niah_multikey", int(np.clip(seq_len // 64, 2, 32)), 1, 1)


def niah_multivalue(rng, seq_len: int) -> Example:
  """One key with 4 needles (distinct values); the answer is all 4 values in haystack order."""
  return _niah(rng, seq_len, "niah_multivalue", 1, MULTI_NEEDLES, 1)


def niah_multiquery(rng, seq_len: int) -> Example:
  """4 needles of distinct keys; 4 queries (`QUERY k ANSWER v` each), one per key."""
  return _niah(rng, seq_len, "niah_multiquery", MULTI_NEEDLES, 1, MULTI_NEEDLES)


def variable_tracking(rng, seq_len: int) -> Example:
  """RULER variable tracking, "find all variables holding the value" form.

  C = clip(seq_len // 64, 2, 12) chains of VT_HOPS + 1 variables (names from KEYS, values from
  VALUES, both distinct): `VAR x0 = val`, `VAR x1 = x0`, ..., statements of all chains interleaved
  (in order within a chain) in WORDS filler. Query `QUERY val0 ANSWER x0 x1 ... x4` for chain 0.
  Learnable teacher forced: each answer token is one lookup, the statement that assigns the
  previous answer token (or the value, for x0).
  """
  _check_len(seq_len)
  n_chains, n_vars = int(np.clip(seq_len // 64, 2, 12)), VT_HOPS + 1
  names = rng.choice(KEYS, n_chains * n_vars, replace=False).reshape(n_chains, n_vars)
  vals = rng.choice(VALUES, n_chains, replace=False)
  order = rng.permutation(np.repeat(np.arange(n_chains), n_vars))
  step = np.zeros(n_chains, np.int64)
  statements = []
  for c in order:
    i = step[c]
    statements.append([VAR, names[c, i], EQ, vals[c] if i == 0 else names[c, i - 1]])
    step[c] += 1
  tail = [QUERY, vals[0], ANSWER, *names[0], EOS]
  filler_len = seq_len + 1 - 1 - 4 * len(statements) - len(tail)
  body, _ = _embed(rng, filler_len, statements)
  start = 1 + len(body) + 3
  return _finish(np.concatenate([[BOS], body, tail]), np.arange(start, start + n_vars), seq_len,
                 TASK_IDS["variable_tracking"])


def _place(rng, span: int, n: int, seg_len: int) -> np.ndarray:
  """Sorted start offsets of n non-overlapping seg_len-token segments inside [0, span)."""
  cuts = np.sort(rng.integers(0, span - n * seg_len + 1, size=n))
  return cuts + seg_len * np.arange(n)


def vt_chains(seq_len: int) -> int:
  """Chains (and queries) per multi-hop variable-tracking example: 2 at 256, 8 from 1024 on."""
  return int(np.clip(seq_len // 128, 2, VT_MAX_CHAINS))


def variable_tracking_hops(rng, seq_len: int, hops: int) -> Example:
  """Multi-hop variable tracking: each answer needs `hops` chained lookups in one forward pass.

  C = vt_chains(seq_len) chains of `hops` variables (names from KEYS, values
  from VALUES, all distinct): `VAR x0 = val`, `VAR x1 = x0`, ..., `VAR x{hops-1} = x{hops-2}`.
  Then one query per chain, in random order: `QUERY x{hops-1} ANSWER val` (val is the answer).
  Unlike `variable_tracking` (teacher forced, every answer token is one lookup), the answer
  token here is reached only by following the whole chain back to its value.

  Distances are controlled: the body (everything before the queries, length Lb) is cut into
  `hops` regions of R = Lb // hops tokens; the level-i statements of all chains sit in the first
  VT_LEVEL_SPAN of region i, so consecutive links of a chain are >= (1 - VT_LEVEL_SPAN) * R - 4
  tokens apart, and the last link is >= that far from the queries. At 2048 tokens: >= 400 tokens
  at 4 hops, >= 1600 at 1 hop; k stacked windowed layers of window W bridge only k * (W - 1)
  (3 x 127 = 381 for the 3 : 1 hybrid at W = 128), so they cannot join two links locally.
  """
  _check_len(seq_len)
  name = f"variable_tracking_h{hops}"
  if name not in TASKS:
    raise ValueError(f"hops: {hops} has no registered task; expected 1..{VT_HOPS}")
  n_chains = vt_chains(seq_len)
  names = rng.choice(KEYS, n_chains * hops, replace=False).reshape(n_chains, hops)
  vals = rng.choice(VALUES, n_chains, replace=False)
  tail, answer_off = [], []
  for c in rng.permutation(n_chains):
    tail += [QUERY, names[c, -1], ANSWER]
    answer_off.append(len(tail))
    tail.append(vals[c])
  tail.append(EOS)
  body_len = seq_len + 1 - 1 - len(tail)
  body = rng.choice(WORDS, size=body_len).astype(np.int32)
  region = body_len // hops
  span = max(4 * n_chains, int(region * VT_LEVEL_SPAN))
  for level in range(hops):
    starts = level * region + _place(rng, span, n_chains, 4)
    for c, o in zip(rng.permutation(n_chains), starts):
      body[o:o + 4] = [VAR, names[c, level], EQ, vals[c] if level == 0 else names[c, level - 1]]
  tokens = np.concatenate([[BOS], body, tail])
  start = 1 + body_len
  return _finish(tokens, [start + o for o in answer_off], seq_len, TASK_IDS[name])


def _word_list(counts: np.ndarray, words: np.ndarray, rng, seq_len: int, name: str) -> Example:
  """`BOS w... QUERY ANSWER a1..aK EOS`: words repeated `counts` times, shuffled.

  The answer is the TOP_WORDS most frequent words by decreasing count, ties by ascending id
  (generators guarantee the top K are strictly more frequent than the rest).
  """
  lst = rng.permutation(np.repeat(words, counts))
  top = sorted(zip(-counts, words))[:TOP_WORDS]
  answer = [w for _, w in top]
  tokens = np.concatenate([[BOS], lst, [QUERY, ANSWER], answer, [EOS]])
  start = 1 + len(lst) + 2
  return _finish(tokens, np.arange(start, start + TOP_WORDS), seq_len, TASK_IDS[name])


def _list_budget(seq_len: int) -> int:
  return seq_len + 1 - 1 - (2 + TOP_WORDS + 1)


def common_words(rng, seq_len: int) -> Example:
  """RULER cwe: TOP_WORDS common words occur c = 3u times, U uncommon words u (or u + 1) times.

  U = min(109, max(2, L // 4)) and u = max(1, L // (U + 3 * TOP_WORDS)) for a list budget L, so
  the list grows with seq_len. Answer: the common words in ascending id order (they tie).
  """
  _check_len(seq_len)
  budget, k = _list_budget(seq_len), TOP_WORDS
  u_count = min(len(WORDS) - k, max(2, budget // 4))
  u = max(1, budget // (u_count + 3 * k))
  u_count = min(u_count, (budget - 3 * u * k) // u)
  words = rng.permutation(WORDS)[:k + u_count]
  counts = np.array([3 * u] * k + [u] * u_count)
  extra = min(budget - counts.sum(), u_count)  # fill the budget: +1 stays below 3u
  counts[k + rng.choice(u_count, extra, replace=False)] += 1
  return _word_list(counts, words, rng, seq_len, "common_words")


def frequent_words(rng, seq_len: int) -> Example:
  """RULER fwe: L words drawn from Zipf(FWE_ALPHA) over a random ranking of WORDS.

  Answer: the TOP_WORDS most frequent words, most frequent first. Draws are redone until the
  top counts are strictly ordered (falls back to the rounded-down expected counts).
  """
  _check_len(seq_len)
  budget = _list_budget(seq_len)
  words = rng.permutation(WORDS)
  p = np.arange(1, len(WORDS) + 1, dtype=np.float64) ** -FWE_ALPHA
  p /= p.sum()
  for _ in range(32):
    counts = rng.multinomial(budget, p)
    top = np.sort(counts)[::-1][:TOP_WORDS + 1]
    if np.all(np.diff(top) < 0):
      break
  else:
    counts = np.floor(budget * p).astype(np.int64)  # strictly decreasing top 4 for budget >= 58
  return _word_list(counts, words, rng, seq_len, "frequent_words")


TASKS: dict[str, Callable[[np.random.Generator, int], Example]] = {
    "mqar": mqar,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
    # Appended, so the ids of the tasks above do not move.
    "mqar_far": mqar_far,
    **{f"variable_tracking_h{h}": functools.partial(variable_tracking_hops, hops=h)
       for h in range(1, VT_HOPS + 1)},
}
TASK_IDS = {name: i for i, name in enumerate(TASKS)}
TEXT_TASK_ID = len(TASKS)  # byte-level text examples (text.py)


def generate(task: str, seq_len: int, rng: np.random.Generator | int) -> Example:
  """One example of `task`; `rng` is a Generator or an int seed."""
  if task not in TASKS:
    raise ValueError(f"task: unknown {task!r}; expected one of {tuple(TASKS)}")
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(rng)
  return TASKS[task](rng, seq_len)


def answer_spans(loss_mask_T) -> list[tuple[int, int]]:
  """Maximal runs [start, end) of loss_mask_T == 1: one answer each."""
  m = np.concatenate([[0], (np.asarray(loss_mask_T) > 0).astype(np.int8), [0]])
  d = np.diff(m)
  return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def score_counts(task: str, predictions, example) -> tuple[int, int]:
  """(answers exactly right, answers) for a batch; see `score`."""
  if task not in TASKS and task != "text":
    raise ValueError(f"task: unknown {task!r}")
  targets = np.asarray(example["targets"])
  mask = np.asarray(example["loss_mask"])
  preds = np.asarray(predictions)
  if preds.ndim == targets.ndim + 1:  # logits [..., T, V]: greedy, teacher forced
    preds = preds.argmax(-1)
  if preds.shape != targets.shape:
    raise ValueError(f"predictions: shape {preds.shape} does not match targets {targets.shape}")
  correct = preds == targets
  if task == "text":  # no answers in text: per-token accuracy over real tokens
    m = mask > 0
    return int(correct[m].sum()), int(m.sum())
  correct, mask = correct.reshape(-1, targets.shape[-1]), mask.reshape(-1, targets.shape[-1])
  right = total = 0
  for c_T, m_T in zip(correct, mask):
    for s, e in answer_spans(m_T):
      right += int(c_T[s:e].all())
      total += 1
  return right, total


def score(task: str, predictions, example) -> float:
  """Exact-match accuracy of the answers (one answer = one contiguous run of loss_mask).

  predictions: logits [B, T, V] / [T, V] (argmax taken) or token ids [B, T] / [T], aligned with
  example["targets"] (position t predicts targets[t]). Returns the fraction of answers whose every
  token is right (mqar: per query; multi-token answers must be right in full and in order).
  """
  right, total = score_counts(task, predictions, example)
  return right / max(total, 1)

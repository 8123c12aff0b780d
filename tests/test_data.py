"""Data package: task formats, oracles that read only the inputs, determinism, resume, sharding."""
import json
from collections import Counter

import numpy as np
import pytest

from mixtral_jax.config import default_config
from mixtral_jax.data import pipeline, tasks, text, tokenizer as tok
from mixtral_jax.data.tokenizer import ANSWER, BOS, EQ, KEY, PAD, QUERY, VALUE, VAR

LENGTHS = (64, 128, 333, 1024, 4096)


# Oracles: each reads inputs[: p + 1] for the answer predicted at position p and nothing else.

def _oracle_mqar(inputs, p):
  key = inputs[p]
  first = np.flatnonzero(inputs[:p] == key)
  assert len(first) and first[0] + 1 < p, "queried key never shown in context"
  return inputs[first[0] + 1]


def _query_start(inputs, p):
  return int(np.flatnonzero(inputs[:p + 1] == QUERY)[-1])


def _oracle_niah(inputs, p):
  q = _query_start(inputs, p)
  key, n_before = inputs[q + 1], p - (q + 2)  # answers already given for this query
  needles = [inputs[i + 3] for i in range(q - 3)
             if inputs[i] == KEY and inputs[i + 1] == key and inputs[i + 2] == VALUE]
  return needles[n_before]


def _oracle_vt(inputs, p):
  q = _query_start(inputs, p)
  assign = {}  # var -> what it is assigned (value or var)
  for i in range(q - 3):
    if inputs[i] == VAR and inputs[i + 2] == EQ:
      assign[inputs[i + 1]] = inputs[i + 3]
  chain, current = [], inputs[q + 1]
  while True:
    nxt = [v for v, src in assign.items() if src == current]
    if not nxt:
      break
    assert len(nxt) == 1
    chain.append(nxt[0])
    current = nxt[0]
  return chain[p - (q + 2)]


def _oracle_vt_hops(inputs, p):
  """Follows `VAR x = src` back from the queried variable to a value; also checks the hop count."""
  q = _query_start(inputs, p)
  assign = {inputs[i + 1]: inputs[i + 3] for i in range(q - 3)
            if inputs[i] == VAR and inputs[i + 2] == EQ}
  current, hops = inputs[q + 1], 0
  while not tok.is_value(current):
    current, hops = assign[current], hops + 1
  return current, hops


def _oracle_words(inputs, p, k=tasks.TOP_WORDS):
  q = _query_start(inputs, p)
  counts = Counter(int(w) for w in inputs[1:q])
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  assert ranked[k - 1][1] > ranked[k][1], "top words not separable by count"
  return ranked[p - (q + 1)][0]  # QUERY ANSWER a1..: a1 is predicted at q + 1


ORACLES = {
    "mqar": _oracle_mqar, "niah_single": _oracle_niah, "niah_multikey": _oracle_niah,
    "niah_multivalue": _oracle_niah, "niah_multiquery": _oracle_niah,
    "variable_tracking": _oracle_vt, "common_words": _oracle_words,
    "frequent_words": _oracle_words, "mqar_far": _oracle_mqar,
    **{f"variable_tracking_h{h}": (lambda inputs, p, h=h: _checked_hops(inputs, p, h))
       for h in range(1, tasks.VT_HOPS + 1)},
}


def _checked_hops(inputs, p, hops):
  answer, found = _oracle_vt_hops(inputs, p)
  assert found == hops, (found, hops)
  return answer


def test_every_task_has_an_oracle():
  assert set(ORACLES) == set(tasks.TASKS)


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_task_format_and_oracle(name):
  for seq_len in LENGTHS:
    for seed in range(3):
      ex = tasks.generate(name, seq_len, seed)
      inputs, targets = ex["inputs"], ex["targets"]
      assert inputs.shape == targets.shape == ex["loss_mask"].shape == (seq_len,)
      assert inputs.dtype == targets.dtype == np.int32 and ex["loss_mask"].dtype == np.float32
      assert int(ex["task_id"]) == tasks.TASK_IDS[name]
      assert inputs[0] == BOS and inputs.max() < tok.VOCAB_SIZE and inputs.min() >= 0
      np.testing.assert_array_equal(inputs[1:], targets[:-1])  # next-token targets
      np.testing.assert_array_equal(ex["lm_mask"], targets != PAD)
      answer_pos = np.flatnonzero(ex["loss_mask"])
      assert len(answer_pos) > 0 and np.all(ex["lm_mask"][answer_pos] == 1)
      assert set(np.unique(ex["loss_mask"])) <= {0.0, 1.0}
      for p in answer_pos:
        assert _oracle_answer(name, inputs, p) == targets[p], (name, seq_len, seed, p)


def _oracle_answer(name, inputs, p):
  return ORACLES[name](inputs[:p + 1].copy(), p)


def test_oracle_can_fail():
  ex = tasks.generate("niah_multivalue", 128, 0)
  p = np.flatnonzero(ex["loss_mask"])[1]
  corrupted = ex["inputs"].copy()
  needle = np.flatnonzero(corrupted == VALUE)[1]
  corrupted[needle + 1] = tok.VALUES[(corrupted[needle + 1] - tok.VALUES[0] + 1) % 64]
  assert _oracle_answer("niah_multivalue", corrupted, p) != ex["targets"][p]


def test_multihop_distances_beat_windows():
  """Every link of a chain (and the last link to its query) is far apart: beyond a window of 128
  with 3 stacked windowed layers at 2048 tokens, and the gaps double at 2x."""
  for hops in range(1, tasks.VT_HOPS + 1):
    for seq_len in (2048, 4096):
      ex = tasks.generate(f"variable_tracking_h{hops}", seq_len, hops + 10 * (seq_len == 4096))
      x = ex["inputs"]
      body_end = int(np.flatnonzero(x == QUERY)[0])
      region = (body_end - 1) // hops
      where = {x[i + 1]: (i, x[i + 3]) for i in range(body_end) if x[i] == VAR}
      queried = x[np.flatnonzero(x == QUERY) + 1]
      assert len(queried) == tasks.VT_MAX_CHAINS
      for var in queried:
        pos, gaps = body_end, []
        while not tok.is_value(var):
          start, src = where[var]
          gaps.append(pos - (start + 4))
          pos, var = start, src
        assert len(gaps) == hops
        assert min(gaps) >= (1 - tasks.VT_LEVEL_SPAN) * region - 4, (hops, seq_len, gaps)
        if seq_len == 2048:
          assert min(gaps) > 3 * 127, gaps  # what 3 stacked windows of 128 bridge
  # mqar_far: every query at least half the query region after its key-value pair (plain mqar's
  # power-law gaps put most queries close).
  def min_distance(name, seq_len):
    ex = tasks.generate(name, seq_len, 0)
    x, answers = ex["inputs"], np.flatnonzero(ex["loss_mask"])
    dist = [p - np.flatnonzero(x[:p] == x[p])[0] for p in answers]
    return min(dist), (seq_len - 2 * len(answers)) // 2 - 2
  for seq_len in (256, 2048):
    got, bound = min_distance("mqar_far", seq_len)
    assert got >= bound, (seq_len, got, bound)
    assert min_distance("mqar", seq_len)[0] < bound


def test_content_scales_with_length():
  def count(name, seq_len, token):
    return int((tasks.generate(name, seq_len, 0)["inputs"] == token).sum())
  assert count("niah_multikey", 2048, KEY) > count("niah_multikey", 128, KEY)
  assert count("variable_tracking", 1024, VAR) > count("variable_tracking", 128, VAR)
  mq = [int(tasks.generate("mqar", n, 0)["loss_mask"].sum()) for n in (64, 256, 1024)]
  assert mq == [4, 16, 64]
  # Only padding after the answer, and only a little of it.
  for name in tasks.TASKS:
    assert tasks.generate(name, 1024, 1)["lm_mask"].sum() >= 1024 - 3 * tasks.TOP_WORDS - 2


def test_determinism_and_short_length_error():
  for name in tasks.TASKS:
    a, b, c = (tasks.generate(name, 256, s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])
  with pytest.raises(ValueError, match="seq_len"):
    tasks.generate("mqar", 16, 0)


def test_score_exact_match():
  ex = pipeline.make_eval_batches("niah_multivalue", 128, 4, 4, seed=0)[0]
  perfect = ex["targets"].copy()
  assert tasks.score("niah_multivalue", perfect, ex) == 1.0
  logits = np.eye(tok.VOCAB_SIZE, dtype=np.float32)[perfect]  # [B, T, V]
  assert tasks.score("niah_multivalue", logits, ex) == 1.0
  wrong = perfect.copy()
  p = np.flatnonzero(ex["loss_mask"][0])[2]  # one of the 4 values of row 0
  wrong[0, p] = PAD
  assert tasks.score("niah_multivalue", wrong, ex) == 0.75
  wrong[:, :] = PAD
  assert tasks.score_counts("niah_multivalue", wrong, ex) == (0, 4)
  # Non-answer positions do not count.
  other = perfect.copy()
  other[ex["loss_mask"] == 0] = PAD
  assert tasks.score("niah_multivalue", other, ex) == 1.0


def test_tokenizer():
  with pytest.raises(ValueError, match="vocab_size"):
    tok.Tokenizer("synthetic", vocab_size=128)
  t = tok.Tokenizer("bytes", vocab_size=256)
  ids = t.encode("héllo\x00!")
  assert ids.dtype == np.int32 and PAD not in ids
  assert t.decode(ids) == "héllo!"
  names = tok.Tokenizer().decode([BOS, tok.KEYS[3], tok.VALUES[0], tok.WORDS[5]])
  assert names == "<bos> k3 v0 w5"


def _config(**tasks_w):
  c = default_config()
  c.data.tasks = tasks_w or {"mqar": 1.0, "niah_multiquery": 1.0, "common_words": 1.0}
  c.train.batch_size, c.train.seq_len = 8, 64
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_iterator_deterministic_and_mixed():
  c = _config()
  a = _take(pipeline.make_train_iterator(c, seed=3), 4)
  b = _take(pipeline.make_train_iterator(c, seed=3), 4)
  d = next(pipeline.make_train_iterator(c, seed=4))
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["inputs"], d["inputs"])
  assert a[0]["inputs"].shape == (8, 64) and a[0]["task_id"].shape == (8,)
  ids = set(np.concatenate([x["task_id"] for x in a]).tolist())
  assert ids == {tasks.TASK_IDS[n] for n in c.data.tasks}
  assert {pipeline.task_names()[i] for i in ids} == set(c.data.tasks)
  # Batch rows are the global examples of the index map.
  np.testing.assert_array_equal(a[1]["inputs"][2], pipeline.train_example(c, 3, 8 + 2)["inputs"])


def test_train_iterator_resume():
  c = _config()
  it = pipeline.make_train_iterator(c, seed=0)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
  expected = _take(it, 3)
  resumed = pipeline.make_train_iterator(c, seed=0)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 3)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_sharding():
  c = _config()
  full = _take(pipeline.make_train_iterator(c, seed=1), 2)
  halves = [_take(pipeline.make_train_iterator(c, seed=1, shard_index=i, shard_count=2), 2)
            for i in range(2)]
  for step in range(2):
    assert halves[0][step]["inputs"].shape == (4, 64)
    glued = np.concatenate([halves[0][step]["inputs"], halves[1][step]["inputs"]])
    np.testing.assert_array_equal(glued, full[step]["inputs"])
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.make_train_iterator(c, seed=0, shard_count=3)


def test_config_errors():
  with pytest.raises(ValueError, match="unknown task"):
    pipeline.make_train_iterator(_config(bogus=1.0), seed=0)
  c = _config()
  c.model.vocab_size = 100
  with pytest.raises(ValueError, match="vocab_size"):
    pipeline.make_train_iterator(c, seed=0)


def test_text_dataset_and_mixture(tmp_path):
  data = bytes(range(1, 256)) * 40  # 10200 bytes, no NUL
  (tmp_path / "a.txt").write_bytes(data)
  (tmp_path / "b.txt").write_bytes(b"hello world\x00 " * 100)
  ds = text.TextDataset([str(tmp_path / "*.txt")], heldout_fraction=0.1)
  assert ds.files == sorted(str(p) for p in tmp_path.glob("*.txt"))
  assert len(ds.train) + len(ds.heldout) == len(data) + 12 * 100 and PAD not in ds.train
  ex = ds.train_example(np.random.default_rng(0), 64)
  np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
  assert int(ex["task_id"]) == tasks.TEXT_TASK_ID and ex["loss_mask"].sum() == 64
  # Held-out windows tile the held-out bytes exactly once.
  held = ds.heldout_examples(64)
  got = np.concatenate([h["targets"][h["lm_mask"] > 0] for h in held])
  np.testing.assert_array_equal(got, ds.heldout[1:])
  batches = pipeline.make_eval_batches("text", 64, 3, 2, seed=0,
                                       text_files=[str(tmp_path / "*.txt")])
  assert len(batches) == 2 and batches[1]["lm_mask"][1].sum() == 0  # padded row
  with pytest.raises(ValueError, match="matches no file"):
    text.TextDataset([str(tmp_path / "*.md")])

  c = _config(mqar=1.0)
  c.data.text_files = (str(tmp_path / "a.txt"),)
  tids = np.concatenate([b["task_id"] for b in _take(pipeline.make_train_iterator(c, seed=0), 4)])
  assert set(tids.tolist()) == {tasks.TASK_IDS["mqar"], tasks.TEXT_TASK_ID}


def test_eval_batches():
  a = pipeline.make_eval_batches("variable_tracking", 128, 10, 4, seed=0)
  b = pipeline.make_eval_batches("variable_tracking", 128, 10, 4, seed=0)
  assert len(a) == 3 and all(x["inputs"].shape == (4, 128) for x in a)
  np.testing.assert_array_equal(a[2]["inputs"], b[2]["inputs"])
  assert a[2]["loss_mask"][2:].sum() == 0  # blank padding rows carry no answers
  assert tasks.score_counts("variable_tracking", a[2]["targets"], a[2]) == (2, 2)
  # Eval examples differ from the train stream of the same seed.
  c = _config(variable_tracking=1.0)
  c.train.seq_len = 128
  assert not np.array_equal(pipeline.train_example(c, 0, 0)["inputs"], a[0]["inputs"][0])


def test_curriculum_pads_short_steps_then_full_length():
  c = _config(mqar=1.0, variable_tracking_h2=1.0)
  c.train.seq_len = 128
  c.data.curriculum = ((2, 64),)
  batches = _take(pipeline.make_train_iterator(c, seed=0), 3)
  for step, b in enumerate(batches):
    assert b["inputs"].shape == (8, 128)
    real = b["lm_mask"].sum(1)
    if step < 2:  # generated at 64 tokens, then PAD with zero masks
      assert real.max() <= 64 and b["loss_mask"][:, 64:].sum() == 0 and (b["inputs"][:, 64:] == PAD).all()
    else:
      assert real.min() > 120
  np.testing.assert_array_equal(batches[1]["inputs"][3], pipeline.train_example(c, 0, 8 + 3)["inputs"])
  assert pipeline.content_length(c.data.curriculum, 1, 128) == 64
  assert pipeline.content_length(c.data.curriculum, 2, 128) == 128
  c.data.curriculum = ((2, 64), (1, 96))
  with pytest.raises(ValueError, match="curriculum"):
    pipeline.make_train_iterator(c, seed=0)

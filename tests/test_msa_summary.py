"""Block-summary MSA decode (cfg.msa.decode_selection 'mean' | 'minmax') and its recall.

A decode step scores complete past blocks from the cache's summaries of the index keys (mean key,
or Quest's per-channel min/max bound) instead of reading every index key; a prefill stays exact.
Checked against a float64 numpy reference that makes the same approximate selection (prefill rows:
the exact selection), on XLA and on the decode kernels (interpret mode), at 2e-5; the cached
summaries against summaries rebuilt from scratch; `msa.summary_recall` against a brute-force count.
Sequences of 64 tokens in blocks of 8, top_k 2: most blocks are dropped for late queries.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_naive as naive
from mixtral_jax import config as config_lib
from mixtral_jax.kernels import decode_attention as da
from mixtral_jax.kernels.decode_attention import api as da_api
from mixtral_jax.model.attention import msa
from mixtral_jax.model.attention.cache import KVCache, MSACache
from test_attention import build, close, decode, inputs, small_cfg
from test_attention_msa import naive_index, naive_msa

T = 64
CHUNKS = (20,) + (1,) * 12 + (13,) + (1,) * 19  # prefill, decode, a second prefill at 32, decode


def test_config_names_the_bad_decode_selection():
  m = config_lib.model_defaults()
  m.attention_pattern = ("msa",)
  m.msa.decode_selection = "median"
  with pytest.raises(config_lib.ConfigError, match=r"model\.msa\.decode_selection"):
    config_lib.validate_model(m)
  for ok in config_lib.MSA_DECODE_SELECTIONS:
    m.msa.decode_selection = ok
    config_lib.validate_model(m)


def summary_scores(q_KI, k_SI, i, bs, kind):
  """[K, i // bs + 1] block scores of a query at position i: complete past blocks from their mean
  index key (kind 'mean') or Quest's bound sum max(q min, q max) ('minmax'); -inf elsewhere."""
  block = np.full((q_KI.shape[0], i // bs + 1), -np.inf)
  for c in range(i // bs):
    keys = k_SI[c * bs:(c + 1) * bs]
    for g, q in enumerate(q_KI):
      block[g, c] = (q @ keys.mean(0) if kind == "mean" else
                     np.sum(np.maximum(q * keys.min(0), q * keys.max(0))))
  return block


def naive_summary_table(m, x, cfg, kind, rows):
  """Allowed keys per (batch, group, query) for the query positions `rows` under the summary
  selection: complete past blocks scored from their mean / min-max index key, local blocks forced."""
  iq, ik = naive_index(m, x, cfg)
  mc, kh, bs = cfg.msa, cfg.num_kv_heads, cfg.msa.block_size
  table = {}
  for b in range(x.shape[0]):
    for i in rows:
      block = summary_scores(iq[b, i], ik[b], i, bs, kind)
      if mc.selection == "max_heads":
        block = np.broadcast_to(block.max(0), block.shape)
      forced = [max(i // bs - l, 0) for l in range(mc.local_blocks)]
      for g in range(kh):
        table[b, g, i] = naive.blocks_to_keys(naive.top_blocks(block[g], forced, mc.top_k), bs, i)
  return table


@pytest.mark.parametrize("impl,kind,selection,local_blocks,max_len", [
    ("xla", "mean", "per_group", 1, T + 3),     # a cache that is no whole number of blocks
    ("xla", "minmax", "max_heads", 1, T + 3),
    ("xla", "minmax", "per_group", 2, T),
    ("pallas_triton", "mean", "per_group", 1, T),
    ("pallas_triton", "minmax", "max_heads", 1, T),
    ("pallas_tpu", "minmax", "max_heads", 2, T),
    ("pallas_tpu", "mean", "max_heads", 1, T),
])
def test_summary_decode_matches_reference(impl, kind, selection, local_blocks, max_len,
                                          monkeypatch):
  calls = []
  for mod, fn in ((da_api, "summary_block_scores"), (da, "msa_block_scores"),
                  (da, "sparse_decode")):
    real = getattr(mod, fn)
    monkeypatch.setattr(mod, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(
        (_fn, k.get("implementation"))) or _real(*a, **k))
  cfg = small_cfg(qk_norm="per_head", attention_impl=impl, **{
      "msa.decode_selection": kind, "msa.selection": selection,
      "msa.local_blocks": local_blocks, "msa.top_k": max(2, local_blocks + 1)})
  m = build(cfg, "msa")
  x, _ = inputs(T, seed=5)
  y, cache = decode(m, x, CHUNKS, max_len, return_cache=True)

  rows = np.cumsum((0,) + CHUNKS)[:-1][np.asarray(CHUNKS) == 1]  # the decode steps' positions
  exact, _, q, k, v = naive_msa(m, x, cfg)
  approx = naive_summary_table(m, x, cfg, kind, rows)
  assert any(approx[key] != exact[key] for key in approx)  # the approximation changes blocks
  table = {**exact, **approx}
  close(y, naive.out(m, naive.attend(q, k, v, lambda b, g, i: table[b, g, i])))

  on_kernel = impl != "xla"
  want = {("sparse_decode", impl)} if on_kernel else set()
  if on_kernel and (kind, selection) == ("minmax", "max_heads"):
    want.add(("summary_block_scores", impl))
  assert set(calls) == want  # never the exact index scores; the kernels ran where they can

  s = cache.index_summaries
  fresh = da.block_summaries(cache.index_k_BSI[:, :, None], jnp.full((x.shape[0],), T),
                             block_size=8)
  c = T // 8
  for got, rebuilt in zip(s, fresh):
    if got is not None:
      np.testing.assert_allclose(got[:, :c], rebuilt[:, :c], rtol=1e-6, atol=1e-6)
  assert (s.mean_BCKH is None) == (kind == "minmax") and (s.min_BCKH is None) == (kind == "mean")


@pytest.mark.parametrize("kind", ["mean", "minmax"])
@pytest.mark.parametrize("max_len", [16, 14])  # a whole number of blocks, and a short last one
def test_cache_summaries_kept_one_token_at_a_time_equal_a_rebuild(kind, max_len):
  ik = jax.random.normal(jax.random.key(0), (2, max_len, 4))
  kv = jnp.zeros((2, max_len, 1, 2))
  zeros = lambda: MSACache.zeros(2, max_len, 1, 2, 4, jnp.float32, decode_selection=kind,
                                 block_size=4)
  step = zeros().write(kv[:, :5], kv[:, :5], ik[:, :5], 0)
  write = jax.jit(lambda c, a, b, t: c.write(a, a, b, t))
  for t in range(5, max_len):
    step = write(step, kv[:, t:t + 1], ik[:, t:t + 1], t)
  whole = zeros().write(kv, kv, ik, 0)
  want = da.block_summaries(ik[:, :, None], jnp.full((2,), max_len), block_size=4)
  for got in (step.index_summaries, whole.index_summaries):
    for g, w in zip(got, want):
      if g is not None:
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_exact_cache_is_unchanged():
  cfg = small_cfg()
  cache = build(cfg, "msa").init_cache(2, 16, jnp.float32)
  assert cache.index_summaries is None
  assert len(jax.tree.leaves(cache)) == len(jax.tree.leaves(
      MSACache(KVCache.zeros(2, 16, 2, 8, jnp.float32), jnp.zeros((2, 16, 8)))))


def brute_force_recall(iq, ik, positions, mc, kind):
  """(hits, exact, hits outside the forced blocks, exact outside them) by explicit loops."""
  bs, (b_, t, kh, _), s = mc.block_size, iq.shape, ik.shape[1]
  counts = np.zeros(4)
  for b in range(b_):
    for j in range(t):
      i = int(positions[b, j])
      nblk = i // bs + 1
      ex = np.array([[max(iq[b, j, g] @ ik[b, n] for n in range(c * bs, min((c + 1) * bs, i + 1)))
                      for c in range(nblk)] for g in range(kh)])
      ap = summary_scores(iq[b, j], ik[b], i, bs, kind)
      if mc.selection == "max_heads":
        ex, ap = ex.max(0, keepdims=True).repeat(kh, 0), ap.max(0, keepdims=True).repeat(kh, 0)
      forced = [max(i // bs - l, 0) for l in range(mc.local_blocks)]
      for g in range(kh):
        e = set(naive.top_blocks(ex[g], forced, mc.top_k))
        a = set(naive.top_blocks(ap[g], forced, mc.top_k))
        counts += [len(e & a), len(e), len((e & a) - set(forced)), len(e - set(forced))]
  assert s > positions.max()
  return counts


@pytest.mark.parametrize("kind,selection,local_blocks", [
    ("mean", "per_group", 1), ("minmax", "max_heads", 2), ("minmax", "per_group", 1)])
def test_recall_equals_a_brute_force_count(kind, selection, local_blocks):
  cfg = small_cfg(**{"msa.block_size": 4, "msa.top_k": 3, "msa.selection": selection,
                     "msa.local_blocks": local_blocks})
  kq, kk, kp = jax.random.split(jax.random.key(7), 3)
  iq = jax.random.normal(kq, (2, 6, 2, 4))
  ik = jax.random.normal(kk, (2, 40, 4))
  pos = jax.random.randint(kp, (2, 6), 0, 40)
  got = msa.summary_recall(iq, ik, pos, cfg.msa, kind, chunk=4)  # 6 queries: a padded chunk
  hit, total, hit_free, total_free = brute_force_recall(np.asarray(iq, np.float64),
                                                        np.asarray(ik, np.float64),
                                                        np.asarray(pos), cfg.msa, kind)
  assert 0 < hit_free < total_free  # the summaries miss some blocks: the count can fail
  np.testing.assert_allclose(got["recall"], hit / total, rtol=1e-6)
  np.testing.assert_allclose(got["recall_unforced"], hit_free / total_free, rtol=1e-6)
  np.testing.assert_allclose(got["exact_unforced"], total_free / (2 * 2 * 6), rtol=1e-6)


@pytest.mark.parametrize("kind", ["mean", "minmax"])
def test_recall_is_one_when_top_k_covers_every_block(kind):
  cfg = small_cfg(**{"msa.top_k": 8})  # 64 keys in blocks of 8: 8 blocks
  iq = jax.random.normal(jax.random.key(1), (1, 5, 2, 8))
  ik = jax.random.normal(jax.random.key(2), (1, T, 8))
  pos = jnp.asarray([[3, 17, 40, 55, 63]], jnp.int32)
  got = msa.summary_recall(iq, ik, pos, cfg.msa, kind)
  assert float(got["recall"]) == 1.0 and float(got["recall_unforced"]) == 1.0
  cfg.msa.top_k = 2
  assert float(msa.summary_recall(iq, ik, pos, cfg.msa, kind)["recall_unforced"]) < 1.0

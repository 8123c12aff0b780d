"""decode_attention: kernels (interpret mode) vs the XLA reference, the reference vs numpy, the
block selection vs the model's (MSA and MoBA), summaries kept incrementally, validation.

Tolerances (max abs error over max(1, max |reference|)): float32 1e-5, bfloat16 2e-2. Shapes are
tiny (S = 64 slots, blocks of 8) with B = 4 rows at lengths 1 (first token), 20 (every block
fits in top_k = 3: all selected), 37 (a partial last block) and 64 (a full cache).
"""
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import decode_attention as da
from mixtral_jax.kernels.decode_attention import api

B, S, K, G, H, I, BS, TOP_K = 4, 64, 2, 3, 16, 16, 8, 3
LENGTHS = np.array([1, 20, 37, 64], np.int32)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
KERNELS = ["pallas_tpu", "pallas_triton"]


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def _inputs(dtype=jnp.float32, seed=0, h=H):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (B, K * G, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, K, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, K, h), jnp.float32).astype(dtype)
  iq = jax.random.normal(ks[3], (B, K, I), jnp.float32).astype(dtype)
  ik = jax.random.normal(ks[4], (B, S, I), jnp.float32).astype(dtype)
  return q, k, v, iq, ik, jnp.asarray(LENGTHS)


def _numpy_decode(q, k, v, mask_BKS, scale):
  out = np.zeros(q.shape, np.float64)
  for b in range(q.shape[0]):
    for n in range(q.shape[1]):
      sel = mask_BKS[b, n // G]
      logits = k[b, sel, n // G].astype(np.float64) @ q[b, n] * scale
      w = np.exp(logits - logits.max())
      out[b, n] = (w / w.sum()) @ v[b, sel, n // G]
  return out


def test_reference_matches_numpy():
  q, k, v, _, _, lengths = _inputs()
  want = _numpy_decode(*(np.asarray(x) for x in (q, k, v)),
                       np.broadcast_to((np.arange(S) < LENGTHS[:, None])[:, None], (B, K, S)),
                       H ** -0.5)
  got = da.dense_decode(q, k, v, lengths, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Sparse over blocks {0, 2} of kv head 0 and {1} of kv head 1 (-1 slots unused).
  idx = jnp.broadcast_to(jnp.array([[0, 2, -1], [1, -1, -1]], jnp.int32), (B, K, 3))
  blocks = np.zeros((B, K, S // BS), bool)
  blocks[:, 0, [0, 2]] = blocks[:, 1, 1] = True
  got = da.sparse_decode(q, k, v, jnp.maximum(lengths, 20), idx, block_size=BS,
                         implementation="xla")
  mask = np.repeat(blocks, BS, axis=-1) & (np.arange(S) < np.maximum(LENGTHS, 20)[:, None])[:, None]
  want = _numpy_decode(*(np.asarray(x) for x in (q, k, v)), mask, H ** -0.5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_kernel_matches_reference(impl, dtype):
  q, k, v, _, _, lengths = _inputs(dtype)
  want = da.dense_decode(q, k, v, lengths, implementation="xla")
  # Tiles of 8 and 3 splits per (row, kv head) on Triton: split-K and skipped splits both run.
  bs = da.BlockSizes(block_kv=8, num_splits=3)
  got = jax.jit(lambda q, k, v, n: da.dense_decode(
      q, k, v, n, implementation=impl, interpret=True, block_sizes=bs))(q, k, v, lengths)
  assert got.shape == q.shape and got.dtype == q.dtype
  assert _rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_msa_kernel_matches_reference(impl, dtype):
  q, k, v, iq, ik, lengths = _inputs(dtype, seed=1)
  kw = dict(block_size=BS, top_k=TOP_K, return_indices=True)
  want, want_idx = da.msa_decode(q, k, v, lengths, iq, ik, implementation="xla", **kw)
  got, got_idx = jax.jit(lambda *a: da.msa_decode(
      *a, implementation=impl, interpret=True, block_sizes=da.BlockSizes(blocks_per_program=2),
      **kw))(q, k, v, lengths, iq, ik)
  np.testing.assert_array_equal(np.sort(got_idx, -1), np.sort(want_idx, -1))
  assert _rel_err(got, want) <= TOL[dtype]
  scores = da.msa_block_scores(iq, ik, lengths, block_size=BS, implementation=impl,
                               interpret=True, block_sizes=da.BlockSizes(index_blocks=2))
  ref = da.msa_block_scores(iq, ik, lengths, block_size=BS, implementation="xla")
  np.testing.assert_array_equal(np.isinf(scores), np.isinf(ref))
  finite = np.isfinite(np.asarray(ref))
  assert _rel_err(np.asarray(scores)[finite], np.asarray(ref)[finite]) <= TOL[dtype]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("kind", da.SUMMARY_KINDS)
def test_summary_kernel_matches_reference(impl, kind):
  q, k, v, _, _, lengths = _inputs(seed=2)
  sm = da.block_summaries(k, lengths, block_size=BS)
  kw = dict(kind=kind, block_size=BS, top_k=TOP_K, return_indices=True)
  want, want_idx = da.summary_decode(q, k, v, lengths, sm, implementation="xla", **kw)
  got, got_idx = jax.jit(lambda *a: da.summary_decode(
      *a, implementation=impl, interpret=True, block_sizes=da.BlockSizes(summary_blocks=4),
      **kw))(q, k, v, lengths, sm)
  np.testing.assert_array_equal(np.sort(got_idx, -1), np.sort(want_idx, -1))
  assert _rel_err(got, want) <= 1e-5


def test_sparse_kernels_take_unsorted_lists_with_gaps():
  q, k, v, _, _, lengths = _inputs(seed=3)
  idx = jnp.broadcast_to(jnp.array([[-1, 2, 0], [4, -1, 7]], jnp.int32), (B, K, 3))
  lengths = jnp.maximum(lengths, 60)  # every listed block holds keys
  want = da.sparse_decode(q, k, v, lengths, idx, block_size=BS, implementation="xla")
  for impl in KERNELS:
    got = da.sparse_decode(q, k, v, lengths, idx, block_size=BS, implementation=impl,
                           interpret=True)
    assert _rel_err(got, want) <= 1e-5, impl


def _msa_cfg(local_blocks):
  return types.SimpleNamespace(block_size=BS, top_k=TOP_K, local_blocks=local_blocks,
                               selection="per_group")


@pytest.mark.parametrize("local_blocks", [1, 2])
def test_msa_selection_equals_model(local_blocks):
  from mixtral_jax.model.attention import msa
  _, _, _, iq, ik, lengths = _inputs(seed=4)
  q_pos_BT = (lengths - 1)[:, None]
  k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (B, S))
  scores_BKTS = msa.index_scores(iq[:, None], ik, q_pos_BT, k_pos_BS)
  want_BKTC = msa.msa_selection(scores_BKTS, q_pos_BT, _msa_cfg(local_blocks))
  scores = da.index_block_scores_reference(iq, ik, lengths, block_size=BS)
  idx = da.select_top_blocks(scores, lengths, block_size=BS, top_k=TOP_K,
                             local_blocks=local_blocks)
  got = np.zeros((B, K, S // BS), bool)
  for b, kk, j in np.argwhere(np.asarray(idx) >= 0):
    got[b, kk, idx[b, kk, j]] = True
  np.testing.assert_array_equal(got, np.asarray(want_BKTC)[:, :, 0])
  # Bit for bit: the block maxima equal the model's token scores maxed per block.
  model_blocks = np.asarray(scores_BKTS[:, :, 0]).reshape(B, K, -1, BS).max(-1)
  np.testing.assert_array_equal(np.asarray(scores), model_blocks)
  # Row 1 (20 tokens, 3 blocks <= top_k) selects all of its blocks; row 0 only block 0.
  assert got[1].sum(-1).tolist() == [3, 3] and got[0].sum(-1).tolist() == [1, 1]


def test_moba_selection_equals_model():
  from mixtral_jax.model.attention import moba
  q, k, _, _, _, lengths = _inputs(seed=5)
  want = moba.moba_selection(q[:, None], k, (lengths - 1)[:, None], block_size=BS, top_k=TOP_K)
  sm = da.block_summaries(k, lengths, block_size=BS)
  scores = da.moba_block_scores_reference(q, sm.mean_BCKH, lengths, block_size=BS)
  idx = da.select_top_blocks(scores, lengths, block_size=BS, top_k=TOP_K)
  got = np.zeros((B, K, S // BS), bool)
  for b, kk, j in np.argwhere(np.asarray(idx) >= 0):
    got[b, kk, idx[b, kk, j]] = True
  np.testing.assert_array_equal(got, np.asarray(want)[:, :, 0])


def test_update_block_summaries_equals_rebuild():
  _, k, _, _, _, _ = _inputs(seed=6)
  start = jnp.array([1, 7, 8, 50], jnp.int32)
  sm = da.block_summaries(k, start, block_size=BS)
  update = jax.jit(lambda sm, n: da.update_block_summaries(sm, k, n, block_size=BS))
  for step in range(1, 12):  # rows cross block boundaries at different steps
    sm = update(sm, start + step)
  want = da.block_summaries(k, start + 11, block_size=BS)
  np.testing.assert_allclose(sm.mean_BCKH, want.mean_BCKH, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(sm.min_BCKH, want.min_BCKH)
  np.testing.assert_array_equal(sm.max_BCKH, want.max_BCKH)
  # Quest bound holds: every visible key's logit <= its block's bound.
  q = jax.random.normal(jax.random.key(7), (B, K * G, H))
  full = da.block_summaries(k, jnp.full((B,), S, jnp.int32), block_size=BS)
  bound = da.quest_block_scores_reference(q, full.min_BCKH, full.max_BCKH,
                                          jnp.full((B,), S, jnp.int32), block_size=BS)
  logits = np.einsum("bkgh,bskh->bkgs", np.asarray(q).reshape(B, K, G, H), np.asarray(k))
  per_block = logits.reshape(B, K, G, -1, BS).max(axis=(2, 4))[..., :-1]
  assert np.all(per_block <= np.asarray(bound)[..., :-1] + 1e-4)


def test_validation_names_the_argument():
  q, k, v, iq, ik, lengths = _inputs()
  with pytest.raises(ValueError, match="q must be 3-D"):
    da.dense_decode(q[:, None], k, v, lengths)
  with pytest.raises(ValueError, match="lengths"):
    da.dense_decode(q, k, v, lengths[:2])
  with pytest.raises(ValueError, match="implementation"):
    da.dense_decode(q, k, v, lengths, implementation="cuda")
  with pytest.raises(ValueError, match="top_k"):
    da.msa_decode(q, k, v, lengths, iq, ik, top_k=0)
  with pytest.raises(ValueError, match="local_blocks"):
    da.msa_decode(q, k, v, lengths, iq, ik, top_k=2, local_blocks=3)
  with pytest.raises(ValueError, match="index_k"):
    da.msa_block_scores(iq, ik[:, :, :4], lengths, block_size=BS)
  with pytest.raises(ValueError, match="kind"):
    da.summary_decode(q, k, v, lengths, da.block_summaries(k, lengths, block_size=BS),
                      kind="max", block_size=BS)
  with pytest.raises(ValueError, match="indices"):
    da.sparse_decode(q, k, v, lengths, jnp.zeros((B, K), jnp.int32), block_size=BS)
  with pytest.raises(ValueError, match="BlockSizes.block_kv"):
    da.BlockSizes(block_kv=0)


def test_none_falls_back_where_a_kernel_cannot_run(monkeypatch, caplog):
  # head_dim 12 is no power of two: compiled Triton refuses it by name, None falls back to XLA.
  q, k, v, _, _, lengths = _inputs(h=12)
  bs = da.BlockSizes(block_kv=16)
  with pytest.raises(ValueError, match="head/index dim 12"):
    da.dense_decode(q, k, v, lengths, implementation="pallas_triton", block_sizes=bs)
  monkeypatch.setattr(api, "default_implementation", lambda backend=None: "pallas_triton")
  with caplog.at_level(logging.WARNING):
    got = da.dense_decode(q, k, v, lengths, block_sizes=bs)
  assert "falling back to xla" in caplog.text
  assert _rel_err(got, da.dense_decode_reference(q, k, v, lengths, sm_scale=12 ** -0.5)) == 0.0


def test_chunked_selection_equals_one_top_k():
  scores = jax.random.normal(jax.random.key(8), (3, 2, 64))
  scores = scores.at[:, :, 40:].set(-jnp.inf).at[0, 0, :8].set(0.5)  # future blocks, ties
  lengths = jnp.array([1, 300, 5000], jnp.int32)
  want = da.select_top_blocks(scores, lengths, block_size=128, top_k=5)
  got = da.select_top_blocks(scores, lengths, block_size=128, top_k=5, chunk=16)
  np.testing.assert_array_equal(got, want)

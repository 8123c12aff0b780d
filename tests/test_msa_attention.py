"""msa_attention kernels and XLA reference against the model's MSA math (`attention/msa.py`).

The oracle is msa.py itself on dense [T, S] tensors: `index_scores` + `msa_selection` for the block
choice, `attention_core` (XLA) for attention, `indexer_kl` for the KL loss. Every implementation
runnable on CPU (XLA; Pallas TPU and Triton in interpret mode) must match it in float32 at 1e-5
(max abs error over max(1, max |oracle|)): forward, dq/dk/dv of a random cotangent, and the KL's
gradients in the index q/k (zero in the main q/k). Cases cover T not a multiple of the block,
S > T (queries last), local_blocks > 1, top_k >= number of blocks, B > 1, GQA groups > 1.
"""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import msa_attention as M
from mixtral_jax.kernels.msa_attention import routing
from mixtral_jax.kernels.block_sparse_attention import selection
from mixtral_jax.model.attention import common, msa

TOL = 1e-5
SMALL = M.BlockSizes(scores_q=16, scores_chunk=16, rows=8)
# (batch, T, S, q heads, kv heads, block, top_k, local_blocks, selection)
CASES = {
    "ragged_T_gqa3_local2": (2, 37, 37, 6, 2, 8, 3, 2, "per_group"),
    "topk_ge_blocks_max_heads": (1, 24, 24, 4, 1, 8, 5, 1, "max_heads"),
    "prefill_S_gt_T": (1, 20, 44, 4, 2, 8, 2, 1, "per_group"),
}
KERNELS = ["pallas_tpu", "pallas_triton"]


def _err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref), initial=0.0) / max(1.0, float(np.max(np.abs(ref), initial=0.0))))


def _inputs(case, seed=0):
  b, t, s, n, kh, bs, top_k, local, selection = case
  ks = jax.random.split(jax.random.key(seed), 6)
  i = 8
  q = jax.random.normal(ks[0], (b, t, n, 8))
  k = jax.random.normal(ks[1], (b, s, kh, 8))
  v = jax.random.normal(ks[2], (b, s, kh, 8))
  q_idx = jax.random.normal(ks[3], (b, t, kh, i))
  k_idx = jax.random.normal(ks[4], (b, s, i))
  do = jax.random.normal(ks[5], q.shape)
  cfg = SimpleNamespace(block_size=bs, top_k=top_k, local_blocks=local, selection=selection)
  q_pos = jnp.broadcast_to(jnp.arange(t) + s - t, (b, t))
  k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  return q, k, v, q_idx, k_idx, do, cfg, q_pos, k_pos


def _oracle_mask(q_idx, k_idx, cfg, q_pos, k_pos):
  return msa.msa_selection(msa.index_scores(q_idx, k_idx, q_pos, k_pos), q_pos, cfg)


def _select(q_idx, k_idx, cfg, impl):
  return M.msa_select(q_idx, k_idx, block_size=cfg.block_size, top_k=cfg.top_k,
                      local_blocks=cfg.local_blocks, selection=cfg.selection, implementation=impl,
                      interpret=True, block_sizes=SMALL)


@pytest.mark.parametrize("impl", ["xla"] + KERNELS)
@pytest.mark.parametrize("name", list(CASES))
def test_block_scores_and_selection_match_msa(name, impl):
  q, k, v, q_idx, k_idx, do, cfg, q_pos, k_pos = _inputs(CASES[name])
  bs = cfg.block_size
  dense = msa.index_scores(q_idx, k_idx, q_pos, k_pos)
  want = common.pad_to_blocks(dense, bs, axis=-1, value=-jnp.inf).reshape(
      *dense.shape[:3], -1, bs).max(axis=-1)
  got = M.msa_block_scores(q_idx, k_idx, block_size=bs, implementation=impl, interpret=True,
                           block_sizes=SMALL)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  assert _err(jnp.where(jnp.isinf(want), 0, got), jnp.where(jnp.isinf(want), 0, want)) <= TOL
  indices = _select(q_idx, k_idx, cfg, impl)
  num_blocks = want.shape[-1]
  np.testing.assert_array_equal(selection.block_mask_from_indices(indices, num_blocks),
                                _oracle_mask(q_idx, k_idx, cfg, q_pos, k_pos))


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_selection_in_query_chunks(monkeypatch, impl):
  # Long sequences score and select a chunk of queries per step (traced query offset).
  from mixtral_jax.kernels.msa_attention import api
  q, k, v, q_idx, k_idx, do, cfg, q_pos, k_pos = _inputs(CASES["prefill_S_gt_T"])
  monkeypatch.setattr(api, "SCORE_BYTES", 1)
  np.testing.assert_array_equal(
      selection.block_mask_from_indices(_select(q_idx, k_idx, cfg, impl), 44 // 8 + 1),
      _oracle_mask(q_idx, k_idx, cfg, q_pos, k_pos))


def test_select_blocks_equals_model_select_blocks():
  scores = jax.random.normal(jax.random.key(3), (2, 3, 40, 5))
  q_pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
  # Future blocks must be -inf, as msa.py hands them over.
  scores = jnp.where(jnp.arange(5) > (q_pos[:, None, :, None] // 8), -jnp.inf, scores)
  for top_k, local in ((2, 1), (3, 2), (7, 3)):
    _, want = selection.select_blocks(scores, (q_pos // 8)[:, None], top_k=top_k,
                                      local_blocks=local)
    got = M.select_blocks(scores, block_size=8, top_k=top_k, local_blocks=local, num_keys=40)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", ["xla"] + KERNELS)
@pytest.mark.parametrize("name", list(CASES))
def test_attention_and_grads_match_msa(name, impl):
  _check_attention(name, impl)


def test_attention_split_into_head_chunks(monkeypatch):
  # Long sequences run the kernels one (kv head, head chunk) at a time; force one head per step.
  from mixtral_jax.kernels.msa_attention import api
  monkeypatch.setattr(api, "UNIT_BYTES", 1)
  _check_attention("ragged_T_gqa3_local2", "pallas_tpu")


def _check_attention(name, impl):
  q, k, v, q_idx, k_idx, do, cfg, q_pos, k_pos = _inputs(CASES[name])
  mask = _oracle_mask(q_idx, k_idx, cfg, q_pos, k_pos)
  indices = _select(q_idx, k_idx, cfg, "xla")

  def oracle(q, k, v):
    return common.attention_core(q, k, v, q_positions_BT=q_pos, k_positions_BS=k_pos,
                                 block_mask_BKTC=mask, block_kv=cfg.block_size)

  def ours(q, k, v):
    return M.msa_attention(q, k, v, indices, block_size=cfg.block_size, implementation=impl,
                           interpret=True, block_sizes=SMALL)

  want, want_vjp = jax.vjp(oracle, q, k, v)
  got, got_vjp = jax.vjp(jax.jit(ours), q, k, v)
  assert got.shape == q.shape and got.dtype == q.dtype
  assert _err(got, want) <= TOL
  for name_, g, w in zip(("dq", "dk", "dv"), got_vjp(do), want_vjp(do)):
    assert np.all(np.isfinite(np.asarray(g))), name_
    assert _err(g, w) <= TOL, (name_, _err(g, w))


@pytest.mark.parametrize("name", list(CASES))
def test_indexer_kl_and_grads_match_msa(name):
  q, k, v, q_idx, k_idx, do, cfg, q_pos, k_pos = _inputs(CASES[name], seed=1)
  mask = _oracle_mask(q_idx, k_idx, cfg, q_pos, k_pos)
  token_mask = common.token_mask(q_pos, k_pos, block_mask_BKTC=mask, block_kv=cfg.block_size)
  indices = _select(q_idx, k_idx, cfg, "xla")
  kw = dict(scale=8 ** -0.5, index_scale=8 ** -0.5)

  def oracle(q, k, q_idx, k_idx):
    return msa.indexer_kl(q, k, msa.index_scores(q_idx, k_idx, q_pos, k_pos), token_mask, **kw)

  def ours(q, k, q_idx, k_idx):
    return M.msa_indexer_kl(q, k, q_idx, k_idx, indices, block_size=cfg.block_size, **kw)

  args = (q, k, q_idx, k_idx)
  want, got = oracle(*args), jax.jit(ours)(*args)
  assert float(got) > 0 and _err(got, want) <= TOL
  grads_want = jax.grad(oracle, argnums=(0, 1, 2, 3))(*args)
  grads_got = jax.jit(jax.grad(ours, argnums=(0, 1, 2, 3)))(*args)
  for name_, g, w in zip(("q", "k", "q_idx", "k_idx"), grads_got, grads_want):
    assert _err(g, w) <= TOL, (name_, _err(g, w))
  assert not np.any(np.asarray(grads_got[0])) and not np.any(np.asarray(grads_got[1]))
  assert np.any(np.asarray(grads_got[2])) and np.any(np.asarray(grads_got[3]))


def test_routing_places_every_slot_in_a_tile_of_its_block():
  idx = jnp.array([[[[0, -1], [1, 0], [2, 1], [2, 0], [1, -1]]]], jnp.int32)  # [1, 1, 5, 2]
  rt = routing.make_routing(idx, num_blocks=3, rows=2)
  rows_of = np.asarray(rt.slot_row[0])
  length = rt.row_query.shape[1]
  for t in range(5):
    for j in range(2):
      if idx[0, 0, t, j] < 0:
        assert rows_of[t, j] == length
      else:
        r = rows_of[t, j]
        assert rt.row_query[0, r] == t and rt.tile_block[0, r // 2] == idx[0, 0, t, j]
  assert int(rt.tile_count[0]) == 2 + 2 + 1  # blocks 0, 1, 2 hold 3, 3, 2 slots in tiles of 2


@pytest.mark.parametrize("top_k,local", [(3, 1), (4, 2), (9, 1)])
def test_fused_triton_selection_breaks_ties_as_top_k(top_k, local):
  # Integer index vectors make many equal block scores: the running top-k must keep lower block
  # ids on ties, as lax.top_k does; k >= number of blocks leaves -1 slots.
  ks = jax.random.split(jax.random.key(7), 2)
  q_idx = jax.random.randint(ks[0], (2, 45, 2, 4), -1, 2).astype(jnp.float32)
  k_idx = jax.random.randint(ks[1], (2, 61, 4), -1, 2).astype(jnp.float32)
  kw = dict(block_size=8, top_k=top_k, local_blocks=local, interpret=True, block_sizes=SMALL)
  want = M.msa_select(q_idx, k_idx, implementation="xla", **kw)
  got = M.msa_select(q_idx, k_idx, implementation="pallas_triton", **kw)
  assert got.shape == want.shape
  np.testing.assert_array_equal(selection.block_mask_from_indices(got, 8),
                                selection.block_mask_from_indices(want, 8))
  np.testing.assert_array_equal((got < 0).sum(-1), (want < 0).sum(-1))

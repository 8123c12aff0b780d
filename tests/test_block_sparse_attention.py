"""block_sparse_attention: every CPU-runnable implementation against the jnp reference, plus masks,
mask metadata and input validation.

Tolerances (max abs error over max(1, max |reference|)): float32 1e-5 (forward) and 2e-5 (grads);
bfloat16 2e-2; compiled Triton on a GPU (skipped elsewhere) float32 1e-4. The reference itself is
checked against a per-row numpy softmax. BSA_HYPOTHESIS_EXAMPLES=n draws more shapes.
"""
import os

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import (IMPLEMENTATIONS, block_mask_from_indices, block_sparse_attention,
                                 causal_block_mask, chunked_block_mask, default_implementation,
                                 local_blocks_mask, make_mask_info, moba_block_mask, msa_block_mask,
                                 select_blocks, sliding_window_block_mask, topk_indices)

TOL = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (2e-2, 2e-2)}  # (forward, gradients)


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref), initial=0.0) / max(1.0, float(np.max(np.abs(ref), initial=0.0))))


@st.composite
def _cases(draw, dtype, kind):
  kv_heads, groups = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (1, 4), (2, 2)]))
  block_q, block_kv = draw(st.sampled_from([8, 16])), draw(st.sampled_from([8, 16]))
  nq, nk = draw(st.integers(1, 3)), draw(st.integers(1, 3))
  return dict(batch=draw(st.integers(1, 2)), kv_heads=kv_heads, groups=groups, head_dim=draw(
      st.sampled_from([8, 16])), block_q=block_q, block_kv=block_kv, t=nq * block_q, s=nk * block_kv,
      dtype=dtype, causal=draw(st.booleans()),
      kind=kind, density=draw(st.floats(0.2, 0.9)), seed=draw(st.integers(0, 2**16)))


def _inputs(c):
  kq, kk, kv, km, kd = jax.random.split(jax.random.key(c["seed"]), 5)
  b, kh, h = c["batch"], c["kv_heads"], c["head_dim"]
  q = jax.random.normal(kq, (b, c["t"], kh * c["groups"], h), jnp.float32).astype(c["dtype"])
  k = jax.random.normal(kk, (b, c["s"], kh, h), jnp.float32).astype(c["dtype"])
  v = jax.random.normal(kv, (b, c["s"], kh, h), jnp.float32).astype(c["dtype"])
  shape = (b, kh, c["t"] // c["block_q"], c["s"] // c["block_kv"])
  if c["kind"] == "full":
    mask = jnp.ones(shape, jnp.bool_)
  else:
    mask = jax.random.bernoulli(km, c["density"], shape)
    if c["kind"] == "empty_rows":
      mask = mask.at[:, :, 0].set(False)
  do = jax.random.normal(kd, q.shape, jnp.float32).astype(c["dtype"])
  return q, k, v, mask, do


def _check_against_reference(implementation, c, interpret=True, tol=None):
  """Kernel vs 'xla' reference: forward and the vjp of a random cotangent; returns the output."""
  q, k, v, mask, do = _inputs(c)

  def run(impl):
    fn = lambda q, k, v: block_sparse_attention(
        q, k, v, mask, block_q=c["block_q"], block_kv=c["block_kv"], causal=c["causal"],
        implementation=impl, interpret=interpret)
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    return out, vjp(do)

  out, grads = run(implementation)
  ref_out, ref_grads = run("xla")
  fwd_tol, grad_tol = tol or TOL[c["dtype"]]
  assert out.dtype == q.dtype and out.shape == q.shape
  assert _rel_err(out, ref_out) <= fwd_tol, c
  for name, g, r in zip("qkv", grads, ref_grads):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert _rel_err(g, r) <= grad_tol, (f"d{name}", _rel_err(g, r), c)
  return out


# Interpret mode compiles a fresh kernel per shape (~10 s each on a shared 2-core box), so each
# (dtype, mask kind) pair draws few shapes; BSA_HYPOTHESIS_EXAMPLES raises it for a longer sweep.
_SETTINGS = hypothesis.settings(
    max_examples=int(os.environ.get("BSA_HYPOTHESIS_EXAMPLES", "2")), deadline=None,
    derandomize=True, suppress_health_check=list(hypothesis.HealthCheck))
_DTYPE_KIND = pytest.mark.parametrize("dtype, kind", [
    (jnp.float32, "random"), (jnp.float32, "empty_rows"), (jnp.bfloat16, "full"),
    (jnp.bfloat16, "empty_rows")])


@_DTYPE_KIND
@_SETTINGS
@hypothesis.given(data=st.data())
def test_pallas_tpu_interpret_matches_reference(dtype, kind, data):
  _check_against_reference("pallas_tpu", data.draw(_cases(dtype, kind)))


@_DTYPE_KIND
@_SETTINGS
@hypothesis.given(data=st.data())
def test_pallas_triton_interpret_matches_reference(dtype, kind, data):
  _check_against_reference("pallas_triton", data.draw(_cases(dtype, kind)))


def test_triton_pads_non_power_of_two_head_dim():
  # T > S: the first T - S queries precede every key and must come out as zeros.
  c = dict(batch=1, kv_heads=1, groups=2, head_dim=12, block_q=8, block_kv=8, t=24, s=16,
           dtype=jnp.float32, causal=True, kind="full", density=1.0, seed=3)
  out = _check_against_reference("pallas_triton", c)
  assert np.all(np.asarray(out)[:, :8] == 0.0)


def _numpy_attention(q, k, v, mask_BKTS, sm_scale):
  b, t, n, h = q.shape
  groups = n // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for bi in range(b):
    for ni in range(n):
      for ti in range(t):
        sel = np.asarray(mask_BKTS[bi, ni // groups, ti])
        if not sel.any():
          continue
        logits = k[bi, sel, ni // groups].astype(np.float64) @ q[bi, ti, ni] * sm_scale
        w = np.exp(logits - logits.max())
        out[bi, ti, ni] = (w / w.sum()) @ v[bi, sel, ni // groups]
  return out


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles Triton kernels: needs a GPU")
@pytest.mark.parametrize("dtype, causal, head_dim, block", [
    (jnp.float32, True, 64, 64), (jnp.bfloat16, True, 128, 64), (jnp.bfloat16, False, 128, 128),
    (jnp.bfloat16, True, 96, 32)])
def test_pallas_triton_on_gpu(dtype, causal, head_dim, block):
  c = dict(batch=2, kv_heads=2, groups=4, head_dim=head_dim, block_q=block, block_kv=block, t=512,
           s=1024, dtype=dtype, causal=causal, kind="empty_rows", density=0.5, seed=1)
  # GPU f32 matmuls (TF32-free 'highest') still reassociate: 1e-4 instead of the interpret 1e-5.
  _check_against_reference("pallas_triton", c, interpret=False,
                           tol=(1e-4, 1e-4) if dtype == jnp.float32 else None)


def test_pallas_tpu_splits_calls_to_fit_smem(monkeypatch):
  # One (batch, kv head) row per pallas_call, as for long sequences whose tile lists fill SMEM.
  from mixtral_jax.kernels.block_sparse_attention import pallas_tpu
  monkeypatch.setattr(pallas_tpu, "SMEM_BUDGET_INTS", 1)
  # T > S: the first T - S queries precede every key and must come out as zeros.
  c = dict(batch=2, kv_heads=2, groups=2, head_dim=8, block_q=8, block_kv=8, t=24, s=16,
           dtype=jnp.float32, causal=True, kind="random", density=0.7, seed=11)
  out = _check_against_reference("pallas_tpu", c)
  assert np.all(np.asarray(out)[:, :8] == 0.0)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_numpy_softmax(causal):
  # T < S so the causal offset S - T matters; row tile 0 of kv head 0 is empty -> zeros.
  q, k, v, _, _ = _inputs(dict(batch=1, kv_heads=2, groups=2, head_dim=8, t=8, s=16, block_q=4,
                               block_kv=4, dtype=jnp.float32, kind="full", density=1.0, seed=0))
  mask = jax.random.bernoulli(jax.random.key(1), 0.6, (1, 2, 2, 4)).at[0, 0, 0].set(False)
  out = block_sparse_attention(q, k, v, mask, block_q=4, block_kv=4, causal=causal,
                               implementation="xla")
  dense = np.repeat(np.repeat(np.asarray(mask), 4, axis=2), 4, axis=3)
  if causal:
    dense &= np.arange(16)[None, :] <= np.arange(8)[:, None] + 8
  want = _numpy_attention(*(np.asarray(x) for x in (q, k, v)), dense, 8 ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out)[0, :4, :2] == 0.0)


def test_mask_computed_inside_jit():
  # A MoBA top-k mask built from the activations under jit, consumed by the TPU kernel.
  q, k, v, _, do = _inputs(dict(batch=1, kv_heads=1, groups=2, head_dim=8, t=32, s=32, block_q=8,
                                block_kv=8, dtype=jnp.float32, kind="full", density=1.0, seed=5))

  def fn(impl):
    def attend(q, k, v):
      mask = moba_block_mask(q, k, block_q=8, block_kv=8, top_k=2)
      return block_sparse_attention(q, k, v, mask, block_q=8, block_kv=8, implementation=impl,
                                    interpret=True)
    return jax.jit(attend)

  out, grads = jax.vjp(fn("pallas_tpu"), q, k, v)
  ref, ref_grads = jax.vjp(fn("xla"), q, k, v)
  assert _rel_err(out, ref) <= 1e-5
  for g, r in zip(grads(do), ref_grads(do)):
    assert _rel_err(g, r) <= 2e-5


def test_mask_info_lists_nonempty_tiles():
  mask = np.array([[[[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]]], bool)  # [1, 1, 3, 4]
  info = jax.jit(make_mask_info)(mask)
  np.testing.assert_array_equal(info.kv_counts[0, 0], [3, 0, 1])
  np.testing.assert_array_equal(info.kv_indices[0, 0], [[0, 2, 3, 3], [0, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(info.q_counts[0, 0], [1, 1, 1, 1])
  np.testing.assert_array_equal(info.q_indices[0, 0], [[0] * 3, [2] * 3, [0] * 3, [0] * 3])


def test_block_mask_builders():
  # T=8 queries are the last 8 of S=16 positions; 4x4 tiles.
  np.testing.assert_array_equal(causal_block_mask(8, 16, block_q=4, block_kv=4),
                                [[1, 1, 1, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(
      sliding_window_block_mask(16, 16, block_q=4, block_kv=4, window=4),
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(chunked_block_mask(16, 16, block_q=4, block_kv=4, chunk=8),
                                [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
  idx = jnp.array([[[[2, -1], [0, 3]]]])  # [B=1, K=1, nq=2, k=2]
  np.testing.assert_array_equal(jax.jit(msa_block_mask, static_argnums=1)(idx, 4)[0, 0],
                                [[0, 0, 1, 0], [1, 0, 0, 1]])
  with pytest.raises(ValueError, match="chunk"):
    chunked_block_mask(16, 16, block_q=4, block_kv=4, chunk=6)


def test_moba_block_mask_is_causal_topk_with_diagonal():
  q, k, _, _, _ = _inputs(dict(batch=2, kv_heads=2, groups=2, head_dim=8, t=32, s=32, block_q=4,
                               block_kv=4, dtype=jnp.float32, kind="full", density=1.0, seed=7))
  mask = np.asarray(jax.jit(lambda q, k: moba_block_mask(q, k, block_q=4, block_kv=4, top_k=2))(q, k))
  assert mask.shape == (2, 2, 8, 8)
  assert not np.any(mask & ~np.tril(np.ones((8, 8), bool)))      # no future tiles
  assert np.all(np.diagonal(mask, axis1=2, axis2=3))               # own tile always kept
  counts = mask.sum(-1)
  assert np.all(counts <= 3) and np.all(counts[..., 2:] >= 2)


def test_selection_topk_local_blocks_and_index_lists():
  # Rows are queries or q tiles alike: [R=3, C=5] scores, -inf = future blocks.
  ninf = -jnp.inf
  scores = jnp.array([[3.0, ninf, ninf, ninf, ninf],
                      [1.0, 5.0, 2.0, ninf, ninf],
                      [4.0, 0.0, 3.0, 1.0, 9.0]])
  idx = topk_indices(scores, 3)
  np.testing.assert_array_equal(idx, [[0, -1, -1], [1, 2, 0], [4, 0, 2]])  # -inf never selected
  np.testing.assert_array_equal(block_mask_from_indices(idx, 5),
                                [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 0, 1]])
  # Local blocks (the 2 ending at the row's own block) are forced in, counted within top_k.
  mask, idx = select_blocks(scores, jnp.array([0, 2, 3]), top_k=3, local_blocks=2)
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(local_blocks_mask(jnp.array([0, 3]), 5, 2),
                                [[1, 0, 0, 0, 0], [0, 0, 1, 1, 0]])
  # The kernels' index-list tile mask is the same function.
  np.testing.assert_array_equal(msa_block_mask(idx, 5), mask)


def _args(**over):
  a = dict(q=jnp.zeros((1, 16, 4, 8)), k=jnp.zeros((1, 16, 2, 8)), v=jnp.zeros((1, 16, 2, 8)),
           block_mask=jnp.ones((1, 2, 2, 2), bool), block_q=8, block_kv=8)
  a.update(over)
  return a


@pytest.mark.parametrize("over, name", [
    (dict(q=jnp.zeros((16, 4, 8))), "q"),
    (dict(k=jnp.zeros((1, 16, 2, 4))), "k"),
    (dict(k=jnp.zeros((1, 16, 3, 8)), v=jnp.zeros((1, 16, 3, 8))), "heads"),
    (dict(v=jnp.zeros((1, 8, 2, 8))), "v"),
    (dict(q=jnp.zeros((1, 16, 4, 8), jnp.int32)), "q"),
    (dict(k=jnp.zeros((1, 16, 2, 8), jnp.bfloat16)), "k and v"),
    (dict(block_q=5), "block_q"),
    (dict(block_kv=0), "block_kv"),
    (dict(block_mask=jnp.ones((1, 2, 2, 3), bool)), "block_mask"),
    (dict(block_mask=jnp.ones((1, 2, 2, 2), jnp.int32)), "block_mask"),
])
def test_validation_names_the_argument(over, name):
  with pytest.raises(ValueError, match=name):
    block_sparse_attention(**_args(**over))


def test_default_falls_back_when_mosaic_gpu_rejects_the_shapes(monkeypatch):
  # On Hopper the default is Mosaic GPU; where it raises ValueError while tracing, Triton runs.
  from mixtral_jax.kernels.block_sparse_attention import api
  calls = []

  class Rejecting:
    @staticmethod
    def mha_forward(*args, **kwargs):
      raise ValueError("unsupported head_dim")

  def fake_module(implementation):
    calls.append(implementation)
    return Rejecting if implementation == "pallas_mosaic_gpu" else real_module(implementation)

  real_module = api._backend_module
  monkeypatch.setattr(api, "_backend_module", fake_module)
  monkeypatch.setattr(api, "default_implementation", lambda: "pallas_mosaic_gpu")
  a = _args()
  out = jax.eval_shape(lambda q, k, v: api.block_sparse_attention(
      q, k, v, a["block_mask"], block_q=8, block_kv=8, interpret=True), a["q"], a["k"], a["v"])
  assert out.shape == a["q"].shape
  assert calls[0] == "pallas_mosaic_gpu" and set(calls[1:]) == {"pallas_triton"}


def test_default_falls_back_to_xla_when_triton_tiles_overflow(monkeypatch):
  # f32 128 x 128 tiles of head_dim 128 overflow GPU shared memory: the compiled Triton path
  # refuses them while tracing, and the default path then runs the reference.
  from mixtral_jax.kernels.block_sparse_attention import api
  monkeypatch.setattr(api, "default_implementation", lambda: "pallas_triton")
  q, k, v, mask, _ = _inputs(dict(batch=1, kv_heads=1, groups=1, head_dim=128, t=256, s=256,
                                  block_q=128, block_kv=128, dtype=jnp.float32, kind="random",
                                  density=0.5, seed=2))
  with pytest.raises(ValueError, match="block_q"):
    block_sparse_attention(q, k, v, mask, block_q=128, block_kv=128, implementation="pallas_triton")
  out = block_sparse_attention(q, k, v, mask, block_q=128, block_kv=128)
  ref = block_sparse_attention(q, k, v, mask, block_q=128, block_kv=128, implementation="xla")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_implementation_choice():
  with pytest.raises(ValueError, match="implementation"):
    block_sparse_attention(**_args(), implementation="cuda")
  assert default_implementation("cpu") == "xla"
  assert default_implementation("tpu") == "pallas_tpu"
  assert jax.default_backend() != "cpu" or default_implementation() == "xla"
  assert set(IMPLEMENTATIONS) == {"xla", "pallas_tpu", "pallas_triton", "pallas_mosaic_gpu"}

"""block_sparse_attention with a sliding window (partial tiles masked token by token, full tiles not)
and with lengths that are not block multiples: Triton and TPU kernels in interpret mode against the
XLA reference, forward and the vjp of a random cotangent, float32 at 1e-5 (max abs error over
max(1, max |reference|)). The reference itself is checked against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import block_sparse_attention, sliding_window_block_mask

TOL = 1e-5


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def _inputs(t, s, kv_heads=2, groups=2, head_dim=8, seed=0):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (1, t, kv_heads * groups, head_dim), jnp.float32)
  k = jax.random.normal(kk, (1, s, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(kv, (1, s, kv_heads, head_dim), jnp.float32)
  return q, k, v, jax.random.normal(kd, q.shape, jnp.float32)


def _run(impl, q, k, v, do, mask, block, window):
  fn = lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=block, block_kv=block,
                                              window=window, implementation=impl, interpret=True)
  out, vjp = jax.vjp(jax.jit(fn), q, k, v)
  return (out,) + vjp(do)


# Windows smaller than a tile (3), between one and two tiles (13), longer than the sequence (64);
# T = 37 is no multiple of the 8-row tile; T < S puts the queries at the end of the keys.
@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("t, s, window, random_mask", [
    (32, 32, 3, False), (37, 37, 13, False), (16, 32, 13, True), (37, 37, 64, False)])
def test_window_matches_reference(impl, t, s, window, random_mask):
  q, k, v, do = _inputs(t, s, seed=t + window)
  shape = (1, 2, -(-t // 8), -(-s // 8))
  mask = (jax.random.bernoulli(jax.random.key(1), 0.7, shape) if random_mask
          else jnp.ones(shape, bool))
  got = _run(impl, q, k, v, do, mask, 8, window)
  want = _run("xla", q, k, v, do, mask, 8, window)
  for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.shape == r.shape and np.all(np.isfinite(np.asarray(g))), name
    assert _rel_err(g, r) <= TOL, (name, _rel_err(g, r))


def test_window_reference_matches_numpy():
  t, w = 20, 5
  q, k, v, _ = _inputs(t, t, kv_heads=1, groups=1)
  out = block_sparse_attention(q, k, v, jnp.ones((1, 1, 3, 3), bool), block_q=8, block_kv=8,
                               window=w, implementation="xla")
  qn, kn, vn = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v))
  want = np.zeros_like(qn)
  for i in range(t):
    lo = max(0, i - w + 1)
    logits = kn[lo:i + 1] @ qn[i] / np.sqrt(8)
    p = np.exp(logits - logits.max())
    want[i] = p @ vn[lo:i + 1] / p.sum()
  np.testing.assert_allclose(np.asarray(out)[0, :, 0], want, rtol=1e-5, atol=1e-5)


def test_window_tiles_are_pruned_and_counted():
  # 4x4 tiles, window 4: each q tile keeps its diagonal tile and the one before (partial at the
  # far edge); nothing older. Kept share at 16 tokens: 7 of 16 tiles.
  mask = np.asarray(sliding_window_block_mask(16, 16, block_q=4, block_kv=4, window=4))
  assert mask.sum() == 7 and np.all(np.diagonal(mask))


@pytest.mark.parametrize("kw, match", [
    (dict(window=0), "window"), (dict(window=2.5), "window"), (dict(window=4, causal=False), "causal"),
    (dict(causal=False, t=13), "block_q"),
])
def test_window_validation(kw, match):
  t = kw.pop("t", 16)
  q, k, v, _ = _inputs(t, t)
  mask = jnp.ones((1, 2, -(-t // 8), -(-t // 8)), bool)
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, mask, block_q=8, block_kv=8, implementation="pallas_triton",
                           interpret=True, **kw)

"""full / swa / moba attention vs naive numpy references, decode == forward, HF MiniMax-M2 parity.

MSA has its own file (tests/test_attention_msa.py). Tolerances: float32 model vs float64 naive
reference at atol=rtol=2e-5; decode vs forward and HF parity at 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_naive as naive
from mixtral_jax.config import model_defaults
from mixtral_jax.kernels.block_sparse_attention import selection
from mixtral_jax.model.attention import common, make_attention

B, D = 2, 32


def small_cfg(**overrides):
  cfg = model_defaults()
  cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim = D, 4, 2, 8, 4
  cfg.window = 5
  cfg.moba.block_size, cfg.moba.top_k = 4, 2
  cfg.msa.update(block_size=8, top_k=2, index_head_dim=8, local_blocks=1)
  for k, v in overrides.items():
    target = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = v
  return cfg


def randomize(module, seed=1, zero_centered=False):
  """O(1) weights so the comparisons are not dominated by tiny outputs; non-trivial norm scales."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = []
  for (path, leaf), key in zip(leaves, keys):
    noise = jax.random.normal(key, leaf.shape, leaf.dtype)
    if "scale" in jax.tree_util.keystr(path):
      new.append(0.3 * noise if zero_centered else 1.0 + 0.3 * noise)
    else:
      new.append(noise * leaf.shape[0] ** -0.5)
  nnx.update(module, jax.tree_util.tree_unflatten(treedef, new))
  return module


def build(cfg, kind, seed=1):
  m = make_attention(cfg, kind, rngs=nnx.Rngs(0))
  return randomize(m, seed, cfg.norm_zero_centered)


def inputs(t, seed=0):
  x = jax.random.normal(jax.random.key(seed), (B, t, D), jnp.float32)
  return x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))


def forward(m, x, pos):
  # One compile of the whole layer is cheaper than compiling every eager op for new shapes.
  y, cache, losses = nnx.jit(lambda m, x, p: m(x, p))(m, x, pos)
  assert cache is None
  return y, losses


def decode(m, x, chunks, max_len, *, return_cache=False):
  """Feeds x through the cache in chunks (a prefill chunk first, then more); returns all y (and
  the final cache with return_cache)."""
  step = nnx.jit(lambda m, x, p, c: m(x, p, c)[:2])
  cache = m.init_cache(x.shape[0], max_len, jnp.float32)
  ys, start = [], 0
  for n in chunks:
    pos = jnp.broadcast_to(jnp.arange(start, start + n, dtype=jnp.int32), (x.shape[0], n))
    y, cache = step(m, x[:, start:start + n], pos, cache)
    ys.append(y)
    start += n
  assert start == x.shape[1]
  y = jnp.concatenate(ys, axis=1)
  return (y, cache) if return_cache else y


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


@pytest.mark.parametrize("qk_norm,heads,zero_centered", [
    ("none", (4, 2), False), ("full", (4, 2), False), ("per_head", (4, 2), True),
    ("full", (4, 4), False), ("per_head", (4, 1), False), ("none", (6, 2), False)])
def test_full_matches_naive(qk_norm, heads, zero_centered):
  cfg = small_cfg(qk_norm=qk_norm, num_heads=heads[0], num_kv_heads=heads[1],
                  norm_zero_centered=zero_centered)
  m = build(cfg, "full")
  x, pos = inputs(12)
  y, losses = forward(m, x, pos)
  q, k, v = naive.qkv(m, x, cfg)
  ref = naive.out(m, naive.attend(q, k, v, lambda b, g, i: list(range(i + 1))))
  close(y, ref)
  assert losses == {}


def test_swa_matches_naive():
  cfg = small_cfg(qk_norm="per_head")
  m = build(cfg, "swa")
  x, pos = inputs(16)
  y, _ = forward(m, x, pos)
  q, k, v = naive.qkv(m, x, cfg)
  w = cfg.window
  ref = naive.out(m, naive.attend(q, k, v, lambda b, g, i: list(range(max(0, i - w + 1), i + 1))))
  close(y, ref)


def naive_moba_allowed(q, k, cfg):
  """Per (batch, kv group, query): own block + the best (top_k - 1) complete past blocks."""
  bs, top_k = cfg.moba.block_size, cfg.moba.top_k
  g = q.shape[2] // k.shape[2]
  table = {}
  for b in range(q.shape[0]):
    for grp in range(k.shape[2]):
      for i in range(q.shape[1]):
        qg = q[b, i, grp * g:(grp + 1) * g].mean(0)
        own = i // bs
        scores = np.array([k[b, c * bs:(c + 1) * bs, grp].mean(0) @ qg for c in range(own)])
        past = list(np.argsort(-scores, kind="stable")[:top_k - 1]) if own else []
        table[b, grp, i] = naive.blocks_to_keys([own] + past, bs, i)
  return table


def test_moba_matches_naive_and_drops_blocks():
  cfg = small_cfg(qk_norm="full")
  m = build(cfg, "moba")
  x, pos = inputs(24)
  y, _ = forward(m, x, pos)
  q, k, v = naive.qkv(m, x, cfg)
  table = naive_moba_allowed(q, k, cfg)
  close(y, naive.out(m, naive.attend(q, k, v, lambda b, g, i: table[b, g, i])))
  # The test must exercise sparsity: late queries see fewer keys than full causal attention.
  assert len(table[0, 0, 23]) == cfg.moba.top_k * cfg.moba.block_size
  # ... and selections differ between kv groups somewhere (selection is per group).
  assert any(table[b, 0, i] != table[b, 1, i] for b in range(B) for i in range(24))


@pytest.mark.parametrize("kind,chunks,max_len", [
    ("full", (5,) + (1,) * 7, 16),
    ("full", (4, 3, 1, 1, 3), 13),          # chunked prefill, cache longer than used
    ("swa", (3,) + (1,) * 9, 16),
    ("swa", (7, 1, 6, 1, 1), 16),           # prefill chunks longer than the window (5)
    ("moba", (6,) + (1,) * 14, 20),         # cache length not a multiple of the block
])
def test_decode_matches_forward(kind, chunks, max_len):
  cfg = small_cfg(qk_norm="per_head", norm_zero_centered=True)
  m = build(cfg, kind)
  x, pos = inputs(sum(chunks), seed=3)
  y_full, _ = forward(m, x, pos)
  close(decode(m, x, chunks, max_len), y_full, tol=1e-5)


def test_select_blocks_hf_index_format():
  # One query at position 9 (block 2 of size 4): block 2 forced, block 3 future, best of 0/1.
  scores = jnp.array([[[[0.5, 2.0, -jnp.inf, -jnp.inf]]]])
  mask, idx = selection.select_blocks(scores, jnp.array([[[9 // 4]]]), top_k=3)
  np.testing.assert_array_equal(idx[0, 0, 0], [2, 1, 0])
  np.testing.assert_array_equal(mask[0, 0, 0], [True, True, True, False])
  mask, idx = selection.select_blocks(scores, jnp.array([[[1 // 4]]]), top_k=3)
  np.testing.assert_array_equal(idx[0, 0, 0], [0, 1, -1])  # -inf slots become -1
  np.testing.assert_array_equal(selection.block_mask_from_indices(idx, 4), mask)


def test_registry_and_unknown_impl():
  with pytest.raises(ValueError, match="unknown attention type"):
    make_attention(small_cfg(), "nope", rngs=nnx.Rngs(0))
  m = build(small_cfg(attention_impl="pallas_bogus"), "full")
  x, pos = inputs(4)
  with pytest.raises(ValueError, match="pallas_bogus"):
    m(x, pos)


def test_full_qk_norm_full_matches_hf_minimax_m2():
  torch = pytest.importorskip("torch")
  from transformers import MiniMaxM2Config
  from transformers.models.minimax_m2 import modeling_minimax_m2 as hf

  cfg = small_cfg(qk_norm="full", num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=4)
  m = build(cfg, "full")
  hcfg = MiniMaxM2Config(
      hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rotary_dim=4,
      num_hidden_layers=1, rms_norm_eps=cfg.norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                       "partial_rotary_factor": 0.5})
  hcfg._attn_implementation = "eager"
  ref = hf.MiniMaxM2Attention(hcfg, layer_idx=0).eval()
  t = lambda a: torch.tensor(np.asarray(a))
  with torch.no_grad():
    for name in ("q_proj", "k_proj", "v_proj"):
      getattr(ref, name).weight.copy_(t(getattr(m, name).kernel[...]).reshape(D, -1).T)
    ref.o_proj.weight.copy_(t(m.o_proj.kernel[...]).reshape(-1, D).T)
    ref.q_norm.weight.copy_(t(m.q_norm.scale[...]))
    ref.k_norm.weight.copy_(t(m.k_norm.scale[...]))
  x, pos = inputs(12)
  y, _ = forward(m, x, pos)
  cos, sin = hf.MiniMaxM2RotaryEmbedding(hcfg)(t(x), t(pos).long())
  assert cos.shape[-1] == cfg.rotary_dim
  causal = torch.full((12, 12), float("-inf")).triu(1)[None, None]
  with torch.no_grad():
    y_ref, _ = ref(t(x), (cos, sin), causal)
  close(y, y_ref.numpy(), tol=1e-5)


@pytest.mark.parametrize("kind", ["full", "swa", "moba", "msa"])
def test_full_size_shapes(kind):
  # MiniMax-M3 attention dimensions, traced only (jax.eval_shape): nothing is allocated.
  cfg = small_cfg(d_model=6144, num_heads=64, num_kv_heads=4, head_dim=128, rotary_dim=64,
                  qk_norm="per_head", norm_zero_centered=True, window=512, dtype="bfloat16",
                  **{"msa.block_size": 128, "msa.top_k": 16, "msa.index_head_dim": 128,
                     "msa.kl_loss_weight": 0.1, "moba.block_size": 128, "moba.top_k": 8})
  x = jax.ShapeDtypeStruct((1, 2048, 6144), jnp.bfloat16)
  pos = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
  y, _, losses = jax.eval_shape(lambda x, p: make_attention(cfg, kind, rngs=nnx.Rngs(0))(x, p), x, pos)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
  assert set(losses) == ({"msa_kl"} if kind == "msa" else set())
  params = nnx.state(nnx.eval_shape(lambda: make_attention(cfg, kind, rngs=nnx.Rngs(0))), nnx.Param)
  n = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
  main = 6144 * 128 * (64 * 2 + 4 * 2) + 2 * 128
  assert n == main + (6144 * 128 * 5 + 2 * 128 if kind == "msa" else 0)


def test_registry_builds_lightning_with_layer_idx():
  cfg = small_cfg(num_layers=4)
  m = make_attention(cfg, "lightning", rngs=nnx.Rngs(0), layer_idx=3)
  assert type(m).__name__ == "LightningAttention"
  ref = make_attention(cfg, "lightning", rngs=nnx.Rngs(0), layer_idx=0)
  x, pos = inputs(4)
  y3, y0 = m(x, pos)[0], ref(x, pos)[0]
  assert not np.allclose(np.asarray(y3), np.asarray(y0))  # layer_idx reached the decay slopes


def test_softmax_attention_empty_rows_are_zero_like_the_kernel_reference():
  from mixtral_jax.kernels import masked_attention_reference
  b, t, s, n, k, h = 2, 5, 7, 4, 2, 8
  kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (b, t, n, h))
  keys = jax.random.normal(kk, (b, s, k, h))
  vals = jax.random.normal(kv, (b, s, k, h))
  mask_BKTS = jax.random.bernoulli(km, 0.5, (b, k, t, s)).at[:, :, 1].set(False)  # row 1 sees nothing
  y = common.softmax_attention(q, keys, vals, mask_BKTS[:, :, None])
  ref = masked_attention_reference(q, keys, vals, mask_BKTS, sm_scale=h ** -0.5)
  close(y, ref, tol=1e-5)
  np.testing.assert_array_equal(y[:, 1], 0.0)
  grads = jax.grad(lambda q, k, v: common.softmax_attention(q, k, v, mask_BKTS[:, :, None]).sum(),
                   argnums=(0, 1, 2))(q, keys, vals)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_array_equal(grads[0][:, 1], 0.0)

"""Lightning attention: block-wise form vs the quadratic reference, decode vs forward, HF parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.config import model_defaults
from mixtral_jax.model.attention import lightning as la

B, N, H, D, L = 2, 4, 8, 32, 4

# Jitted: one compile per shape is cheaper on CPU than op-by-op dispatch.
_core = jax.jit(la.lightning_core, static_argnames=("block_size",))
_reference = jax.jit(la.lightning_reference)
_call = nnx.jit(lambda layer, x, pos, cache: layer(x, pos, cache))


def _cfg(block=8):
  cfg = model_defaults()
  cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers = D, N, N, H, L
  cfg.lightning_block = block
  cfg.attention_pattern = ("lightning",)
  return cfg


def _qkv(t, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  # silu-like positive-ish values of order 1, as the layer feeds them.
  return [jax.nn.silu(jax.random.normal(k, (B, t, N, H))) for k in ks]


def _close(a, b, rtol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.max(np.abs(a - b)) / np.max(np.abs(b))
  assert err < rtol, f"max abs error / max abs value = {err:.2e} >= {rtol}"


@pytest.mark.parametrize("t,block,layer_idx", [(32, 8, 0), (37, 8, 2), (5, 64, 1), (1, 8, 3)])
def test_block_form_matches_quadratic_reference(t, block, layer_idx):
  q, k, v = _qkv(t)
  slopes = jnp.asarray(la.lightning_slopes(N, layer_idx, L))
  o, kv = _core(q, k, v, slopes, block_size=block)
  _close(o, _reference(q, k, v, slopes), 1e-5)
  # The final state is sum_s exp(-slope (t-1-s)) k_s^T v_s, decayed to the last real token.
  decay_TN = jnp.exp(-(t - 1 - jnp.arange(t))[:, None] * slopes)
  kv_ref = jnp.einsum("BTNH,BTNJ->BNHJ", k * decay_TN[:, :, None], v)
  _close(kv, kv_ref, 1e-5)


def test_block_form_continues_from_state():
  q, k, v = _qkv(29, seed=1)
  slopes = jnp.asarray(la.lightning_slopes(N, 1, L))
  o_full, kv_full = _core(q, k, v, slopes, block_size=8)
  o1, kv = _core(q[:, :11], k[:, :11], v[:, :11], slopes, block_size=8)
  o2, kv = _core(q[:, 11:], k[:, 11:], v[:, 11:], slopes, kv, block_size=8)
  _close(jnp.concatenate([o1, o2], 1), o_full, 1e-5)
  _close(kv, kv_full, 1e-5)


def test_slopes_formula():
  s = la.lightning_slopes(8, 3, 10)
  factor = 1 - 3 / (9 + 1e-5) + 1e-5
  np.testing.assert_allclose(s, [(2 ** (-8 / 8)) ** (i + 1) * factor for i in range(8)], rtol=1e-6)
  assert la.lightning_slopes(4, 3, 4).max() < 1e-4  # the last layer barely decays


def test_prefill_then_decode_equals_forward():
  t, prefill = 14, (5, 6)  # prefill into an empty cache, a second chunk from its state, then decode
  layer = la.LightningAttention(_cfg(block=8), rngs=nnx.Rngs(0), layer_idx=1)
  x = jax.random.normal(jax.random.key(3), (B, t, D))
  pos = jnp.broadcast_to(jnp.arange(t), (B, t))
  y_full, cache, losses = _call(layer, x, pos, None)
  assert cache is None and losses == {}
  cache = layer.init_cache(B, t, jnp.float32)
  ys, start = [], 0
  for n in prefill:  # chunked prefill (block form from a state), then one token at a time
    y, cache, _ = _call(layer, x[:, start:start + n], pos[:, start:start + n], cache)
    ys.append(y)
    start += n
  for i in range(start, t):
    y, cache, _ = _call(layer, x[:, i:i + 1], pos[:, i:i + 1], cache)
    ys.append(y)
  assert cache.kv_BNHJ.shape == (B, N, H, H) and cache.kv_BNHJ.dtype == jnp.float32
  _close(jnp.concatenate(ys, 1), y_full, 1e-5)


def test_bfloat16_compute_runs():
  cfg = _cfg()
  cfg.dtype = "bfloat16"
  layer = la.LightningAttention(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (B, 13, D))
  pos = jnp.zeros((B, 13), jnp.int32)
  y, _, _ = _call(layer, x, pos, None)
  y32, _, _ = _call(la.LightningAttention(_cfg(), rngs=nnx.Rngs(0)), x, pos, None)
  assert y.dtype == jnp.bfloat16
  _close(y, y32, 3e-2)


# --- parity with transformers' MiniMaxLightningAttention --------------------------------------

def _hf_layer(layer_idx, block):
  torch = pytest.importorskip("torch")
  minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")
  from transformers import MiniMaxConfig
  config = MiniMaxConfig(vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=L,
                         num_attention_heads=N, num_key_value_heads=N, head_dim=H, block_size=block,
                         num_local_experts=2)
  torch.manual_seed(layer_idx)
  hf = minimax.MiniMaxLightningAttention(config, layer_idx).float().eval()
  with torch.no_grad():  # weights of order 1 so every term matters
    for p in hf.parameters():
      p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.2))
    hf.norm.weight.add_(1.0)
  return torch, minimax, hf


def _to_jax(hf, layer_idx, block):
  layer = la.LightningAttention(_cfg(block), rngs=nnx.Rngs(0), layer_idx=layer_idx)
  w = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  layer.qkv_proj.kernel[...] = jnp.asarray(w["qkv_proj.weight"].T.reshape(D, N, 3, H))
  layer.output_gate.kernel[...] = jnp.asarray(w["output_gate.weight"].T.reshape(D, N, H))
  layer.norm.scale[...] = jnp.asarray(w["norm.weight"])
  layer.out_proj.kernel[...] = jnp.asarray(w["out_proj.weight"].T.reshape(N, H, D))
  return layer


def test_slopes_match_transformers():
  for layer_idx in range(L):
    _, _, hf = _hf_layer(layer_idx, 8)
    np.testing.assert_allclose(la.lightning_slopes(N, layer_idx, L), hf.slope_rate.numpy().reshape(-1),
                               rtol=1e-6)


@pytest.mark.parametrize("layer_idx", [1, 3])
def test_matches_transformers(layer_idx):
  block, t, t_prefill = 8, 13, 10  # t and t_prefill not multiples of the block
  torch, minimax, hf = _hf_layer(layer_idx, block)
  layer = _to_jax(hf, layer_idx, block)
  x = np.random.default_rng(layer_idx).normal(size=(B, t, D)).astype(np.float32)
  pos = jnp.broadcast_to(jnp.arange(t), (B, t))

  with torch.no_grad():
    y_hf, _ = hf(torch.from_numpy(x), None, None)
  y, _, _ = _call(layer, jnp.asarray(x), pos, None)
  _close(y, y_hf.numpy(), 1e-5)

  # HF's cached path: block form for the prompt, then its recurrent loop per token.
  cache_hf = minimax.MiniMaxCache()
  cache = layer.init_cache(B, t, jnp.float32)
  with torch.no_grad():
    ys_hf = [hf(torch.from_numpy(x[:, :t_prefill]), None, None, cache=cache_hf)[0]]
    for i in range(t_prefill, t):
      ys_hf.append(hf(torch.from_numpy(x[:, i:i + 1]), None, None, cache=cache_hf)[0])
  ys = []
  y, cache, _ = _call(layer, jnp.asarray(x[:, :t_prefill]), pos[:, :t_prefill], cache)
  ys.append(y)
  for i in range(t_prefill, t):
    y, cache, _ = _call(layer, jnp.asarray(x[:, i:i + 1]), pos[:, i:i + 1], cache)
    ys.append(y)
  _close(jnp.concatenate(ys, 1), torch.cat(ys_hf, 1).numpy(), 1e-5)
  _close(cache.kv_BNHJ, cache_hf.get_linear_cache(layer_idx).numpy(), 1e-5)

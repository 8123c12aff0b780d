"""swa and moba layers on the kernels under a Pallas attention_impl (interpret mode on CPU):
training logits and every parameter gradient match the XLA path, the kernels are really called,
and prefill-then-decode still equals the forward (SWA prefill split: in-chunk queries on the
kernel, the first window - 1 on XLA over the ring)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax.model import generate
from mixtral_jax.model.attention import moba as moba_lib
from mixtral_jax.model.transformer import Transformer


def tiny(pattern, **kw):
  m = config_lib.model_defaults()
  m.update(vocab_size=64, d_model=32, num_layers=len(pattern), num_heads=4, num_kv_heads=2,
           head_dim=8, rotary_dim=4, mlp_dim=48, num_dense_layers=len(pattern),
           attention_pattern=pattern, window=6, attention_block=8)
  m.moba.update(block_size=8, top_k=2)
  m.update(**kw)
  config_lib.validate_model(m)
  return m


def _logits_and_grads(cfg, impl, tokens):
  c = cfg.copy_and_resolve_references()
  c.attention_impl = impl
  model = Transformer(c, rngs=nnx.Rngs(0))
  loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])
  return model(tokens), nnx.grad(loss)(model)


@pytest.mark.parametrize("layer, impl, t", [("swa", "pallas_triton", 37), ("swa", "pallas_tpu", 32),
                                            ("moba", "pallas_triton", 40)])
def test_layer_on_kernels_matches_xla(layer, impl, t, monkeypatch):
  # T = 37 is no multiple of the 8-token tile; the window of 6 is smaller than a tile.
  from mixtral_jax import kernels
  from mixtral_jax.kernels import msa_attention as msa_kernels
  calls = []
  for mod, name in ((kernels, "block_sparse_attention"), (msa_kernels, "msa_attention")):
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, (lambda real, name: lambda *a, **kw: calls.append(
        (name, kw.get("window"))) or real(*a, **kw))(real, name))
  cfg = tiny((layer,))
  tokens = jax.random.randint(jax.random.key(3), (2, t), 0, cfg.vocab_size)
  want_logits, want_grads = _logits_and_grads(cfg, "xla", tokens)
  assert not calls
  got_logits, got_grads = _logits_and_grads(cfg, impl, tokens)
  want_call = ("block_sparse_attention", 6) if layer == "swa" else ("msa_attention", None)
  assert calls and set(calls) == {want_call}
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
  for (path, g), (_, w) in zip(nnx.to_flat_state(got_grads), nnx.to_flat_state(want_grads)):
    np.testing.assert_allclose(g[...], w[...], atol=1e-5, rtol=1e-4, err_msg=str(path))


@pytest.mark.parametrize("layer, prompt, max_len", [("swa", 21, 28), ("moba", 24, 24)])
def test_prefill_on_kernels_then_decode_equals_forward(layer, prompt, max_len):
  cfg = tiny((layer, "full"))
  tokens = jax.random.randint(jax.random.key(1), (1, max_len), 0, cfg.vocab_size)
  ref = Transformer(cfg, rngs=nnx.Rngs(0))
  full = ref(tokens)
  c = cfg.copy_and_resolve_references()
  c.attention_impl = "pallas_triton"
  model = Transformer(c, rngs=nnx.Rngs(0))
  logits, cache = generate.prefill(model, tokens[:, :prompt], max_len=max_len)
  np.testing.assert_allclose(logits, full[:, :prompt], atol=2e-5, rtol=2e-5)
  for t in range(prompt, max_len):
    step, cache = generate.decode_step(model, tokens[:, t:t + 1], t, cache)
    np.testing.assert_allclose(step, full[:, t], atol=2e-5, rtol=2e-5, err_msg=f"position {t}")


def test_moba_indices_in_chunks_equal_the_selection():
  q = jax.random.normal(jax.random.key(0), (1, 50, 4, 8))
  k = jax.random.normal(jax.random.key(1), (1, 50, 2, 8))
  pos = jnp.arange(50)[None]
  mask = moba_lib.moba_selection(q, k, pos, block_size=8, top_k=3)
  idx = moba_lib.moba_indices(q, k, pos, block_size=8, top_k=3, chunk=16)
  from mixtral_jax.kernels.block_sparse_attention.selection import block_mask_from_indices
  np.testing.assert_array_equal(block_mask_from_indices(idx, mask.shape[-1]), mask)

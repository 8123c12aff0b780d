"""MSA layers on kernels.msa_attention (attention_impl set) against the same layer on XLA.

Interpret mode on CPU, float32, tolerance 1e-5: the layer output, its KL loss, and the gradients of
<y, dy> + KL in every parameter (main projections through attention, the indexer through the KL);
a prefill chunk written into a longer cache, then decode steps, equals the full forward.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.kernels import msa_attention as ma
from test_attention import build, close, decode, inputs, small_cfg

T = 40  # not a multiple of the block (8): a ragged last block


def _pair(impl, **overrides):
  kw = {"msa.kl_loss_weight": 0.5, "msa.top_k": 2, **overrides}
  xla = build(small_cfg(qk_norm="per_head", **kw), "msa")
  ker = build(small_cfg(qk_norm="per_head", attention_impl=impl, **kw), "msa")
  return xla, ker


@pytest.mark.parametrize("impl,selection,local_blocks", [
    ("pallas_triton", "per_group", 1), ("pallas_tpu", "max_heads", 2)])
def test_msa_layer_on_kernels_matches_xla(monkeypatch, impl, selection, local_blocks):
  calls = []
  real = ma.msa_attention
  monkeypatch.setattr(ma, "msa_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
  xla, ker = _pair(impl, **{"msa.selection": selection, "msa.local_blocks": local_blocks})
  x, pos = inputs(T, seed=3)
  dy = jax.random.normal(jax.random.key(4), (x.shape[0], T, x.shape[2]))

  def loss(m):
    y, _, losses = m(x, pos)
    return jnp.sum(y * dy) + losses["msa_kl"], (y, losses["msa_kl"])

  (_, (y_ref, kl_ref)), g_ref = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(xla)
  (_, (y, kl)), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(ker)
  assert calls and calls[0]["implementation"] == impl
  close(y, y_ref, tol=1e-5)
  close(kl, kl_ref, tol=1e-5)
  flat_ref, flat = nnx.to_flat_state(g_ref), nnx.to_flat_state(g)
  for (path, a), (_, b) in zip(flat_ref, flat):
    a, b = np.asarray(a[...]), np.asarray(b[...])
    scale = max(1.0, float(np.abs(a).max()))
    assert np.abs(a - b).max() <= 1e-5 * scale, path
  assert any(np.any(np.asarray(v[...])) for p, v in flat if "indexer" in p)


def test_msa_prefill_on_kernels_then_decode_matches_forward():
  xla, ker = _pair("pallas_triton")
  x, pos = inputs(T, seed=5)
  y_full = nnx.jit(lambda m, x, p: m(x, p)[0])(xla, x, pos)
  # A prefill chunk at position 0 and another at 21 (q_offset traced), decode steps between.
  chunks = (16,) + (1,) * 5 + (12,) + (1,) * 7
  close(decode(ker, x, chunks, max_len=T + 8), y_full, tol=1e-5)

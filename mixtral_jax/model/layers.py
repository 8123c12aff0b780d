"""Building blocks shared by every model family: linear maps, RMSNorm, rotary embeddings, SwiGLU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.sharding import partitioned

default_init = nnx.initializers.normal(stddev=0.02)


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class Linear(nnx.Module):
  """y = x @ W with W of shape `shape` (input dims first), created sharded by logical `names`.

  `einsum` says how the input contracts with the kernel, e.g. 'BTD,DNH->BTNH'.
  """

  def __init__(self, shape, names, einsum: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, init=default_init):
    self.kernel = nnx.Param(partitioned(init, *names)(rngs.params(), shape, param_dtype))
    self.einsum = einsum
    self.dtype = dtype

  def __call__(self, x):
    return jnp.einsum(self.einsum, x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class RMSNorm(nnx.Module):
  """x / rms(x) * w, computed in float32 (the HF reference's order of casts).

  zero_centered: the weight is stored as w - 1 (Gemma3 / MiniMax-M3 style: scale = 1 + w).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, zero_centered: bool = False,
               names=("embed",), rngs: nnx.Rngs | None = None, param_dtype=jnp.float32):
    init = nnx.initializers.zeros if zero_centered else nnx.initializers.ones
    key = rngs.params() if rngs is not None else jax.random.key(0)
    self.scale = nnx.Param(partitioned(init, *names)(key, (dim,), param_dtype))
    self.eps = eps
    self.zero_centered = zero_centered

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    w = self.scale[...].astype(jnp.float32)
    if self.zero_centered:
      return (x * (1.0 + w)).astype(dtype)
    return w.astype(dtype) * x.astype(dtype)


def rope_cos_sin(positions_BT, rotary_dim: int, theta: float):
  """cos, sin of shape [B, T, rotary_dim] (frequencies repeated for the two halves, HF layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rotary_dim/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BTNH, cos_BTR, sin_BTR):
  """Rotates the first R = cos.shape[-1] dims of each head (rotate-half layout); the rest pass."""
  r = cos_BTR.shape[-1]
  if r == 0:
    return x_BTNH
  dtype = x_BTNH.dtype
  x = x_BTNH.astype(jnp.float32)
  x_rot, x_pass = x[..., :r], x[..., r:]
  x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
  out = x_rot * cos + rotated * sin
  return jnp.concatenate([out, x_pass], axis=-1).astype(dtype)


def gated_activation(gate, up, kind: str = "swiglu", alpha: float = 1.702, limit: float = 7.0):
  """The gated MLP nonlinearity (see config.mlp_activation)."""
  if kind == "swiglu":
    return jax.nn.silu(gate) * up
  if kind == "swiglu_clamped":
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(gate * alpha) * (up + 1.0)
  raise ValueError(f"unknown activation {kind!r}")


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x), up(x))), act from `gated_activation`."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, activation: str = "swiglu", alpha: float = 1.702,
               limit: float = 7.0):
    self.activation = (activation, alpha, limit)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = Linear((d_model, hidden), ("embed", "mlp"), "BTD,DF->BTF", **kw)
    self.up = Linear((d_model, hidden), ("embed", "mlp"), "BTD,DF->BTF", **kw)
    self.down = Linear((hidden, d_model), ("mlp", "embed"), "BTF,FD->BTD", **kw)

  def __call__(self, x_BTD):
    return self.down(gated_activation(self.gate(x_BTD), self.up(x_BTD), *self.activation))


class Embed(nnx.Module):
  """Token embedding; `attend` gives logits through the same table (tied embeddings)."""

  def __init__(self, vocab: int, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    init = nnx.initializers.normal(stddev=1.0)
    self.embedding = nnx.Param(partitioned(init, "vocab", "embed")(rngs.params(), (vocab, d_model), param_dtype))
    self.dtype = dtype

  def __call__(self, tokens_BT):
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD):
    return jnp.einsum("BTD,VD->BTV", x_BTD, self.embedding[...].astype(x_BTD.dtype))

"""MiniMax-01 Lightning attention: linear attention with a per-head exponential decay.

  o_t = sum_{s<=t} exp(-slope_n * (t - s)) (q_t . k_s) v_s,   q, k, v = silu(qkv_proj(x))
  y   = out_proj(sigmoid(output_gate(x)) * RMSNorm(o))        (RMSNorm over all heads at once)

Matches transformers' `MiniMaxLightningAttention` (parameter names, layouts, slopes, norm placement).
Training / prefill use the block-wise form (masked, decayed QK^T V inside a block of
`cfg.lightning_block` tokens; a running kv state [B, N, H, H] between blocks); decoding uses the
recurrent form kv <- exp(-slope) kv + k^T v, o = q kv. Heads: cfg.num_heads for q, k and v (no GQA,
as in the reference). The decay terms and the kv state are float32.

Extra shape letters here: P block index, C query position inside a block, S key position inside a
block, J value head dim (the second H of the kv state), I which of q/k/v (3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import sharding
from mixtral_jax.model.attention.cache import LightningCache
from mixtral_jax.model.layers import Linear, RMSNorm, dtype_of

# transformers builds the lightning norm as MiniMaxRMSNorm(N * H) with its default eps, not
# config.rms_norm_eps.
NORM_EPS = 1e-6


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> np.ndarray:
  """Per-head decay rates, float32 [N], as transformers' `get_slope_rate`.

  slope_n = (2^(-8/N))^(n+1) * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5): ALiBi-like
  geometric rates, shrunk linearly with depth (the last layer decays almost not at all).
  `layer_idx` is the decoder layer's index among all num_layers layers (not among lightning ones).
  """
  base = 1.0 / (2.0 ** (8.0 / num_heads))
  factor = 1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
  return (base ** np.arange(1, num_heads + 1, dtype=np.float64) * factor).astype(np.float32)


def lightning_reference(q_BTNH, k_BTNH, v_BTNH, slopes_N):
  """Quadratic O(T^2) reference of the decayed causal linear attention, float32 [B, T, N, H]."""
  q, k, v = (a.astype(jnp.float32) for a in (q_BTNH, k_BTNH, v_BTNH))
  t = jnp.arange(q.shape[1])
  dist_TS = (t[:, None] - t[None, :]).astype(jnp.float32)
  decay_NTS = jnp.where(dist_TS >= 0, jnp.exp(-slopes_N[:, None, None] * jnp.maximum(dist_TS, 0)), 0.0)
  scores_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q, k) * decay_NTS
  return jnp.einsum("BNTS,BSNJ->BTNJ", scores_BNTS, v)


def lightning_step(q_BNH, k_BNH, v_BNH, slopes_N, kv_BNHJ):
  """One decode token, recurrent form: kv <- exp(-slope) kv + k^T v; o = q kv.

  Returns (o float32 [B, N, H], kv float32 [B, N, H, H]).
  """
  q, k, v = (a.astype(jnp.float32) for a in (q_BNH, k_BNH, v_BNH))
  kv = jnp.exp(-slopes_N)[None, :, None, None] * kv_BNHJ + jnp.einsum("BNH,BNJ->BNHJ", k, v)
  return jnp.einsum("BNH,BNHJ->BNJ", q, kv), kv


def lightning_core(q_BTNH, k_BTNH, v_BTNH, slopes_N, kv_BNHJ=None, *, block_size: int):
  """Block-wise decayed causal linear attention over T tokens that follow the state `kv_BNHJ`.

  Args:
    q_BTNH, k_BTNH, v_BTNH: [B, T, N, H], any float dtype (computed in float32).
    slopes_N: float32 [N] decay rates.
    kv_BNHJ: float32 [B, N, H, H] state after the earlier tokens (sum_s exp(-slope (t0-1-s)) k_s^T v_s),
      or None for an empty history.
    block_size: tokens per block; T need not be a multiple (the last block is shorter).
    (There is no Pallas lightning kernel yet: cfg.attention_impl does not apply here.)
  Returns:
    (o float32 [B, T, N, H], kv float32 [B, N, H, H] state after the last of the T tokens).
  """
  b, t, n, h = q_BTNH.shape
  c = min(block_size, t)
  num_blocks = -(-t // c)
  pad = num_blocks * c - t
  slopes_N = jnp.asarray(slopes_N, jnp.float32)
  if kv_BNHJ is None:
    kv_BNHJ = jnp.zeros((b, n, h, v_BTNH.shape[-1]), jnp.float32)

  def blocks(a):  # zero padding: padded keys/values add nothing to the state
    a = jnp.pad(a.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return a.reshape(b, num_blocks, c, n, a.shape[-1])

  q_BPCNH, k_BPSNH, v_BPSNJ = blocks(q_BTNH), blocks(k_BTNH), blocks(v_BTNH)

  # Intra-block: causal QK^T with decay exp(-slope (c - s)) for key s <= query c, all blocks at once.
  pos = jnp.arange(c)
  dist_CS = (pos[:, None] - pos[None, :]).astype(jnp.float32)
  diag_NCS = jnp.where(dist_CS >= 0, jnp.exp(-slopes_N[:, None, None] * jnp.maximum(dist_CS, 0)), 0.0)
  scores_BPNCS = jnp.einsum("BPCNH,BPSNH->BPNCS", q_BPCNH, k_BPSNH) * diag_NCS
  o_intra_BPCNJ = jnp.einsum("BPNCS,BPSNJ->BPCNJ", scores_BPNCS, v_BPSNJ)

  # Inter-block: the state is decayed to the last real token of each block; a short last block
  # (length n_p < c) decays its keys by n_p - 1 - s and the state by n_p, never by the padding.
  len_P = np.full((num_blocks,), c, np.float32)
  len_P[-1] = t - (num_blocks - 1) * c
  len_P = jnp.asarray(len_P)
  q_decay_CN = jnp.exp(-(pos[:, None] + 1).astype(jnp.float32) * slopes_N)
  k_dist_PS = len_P[:, None] - 1 - pos[None, :]
  k_decay_PSN = jnp.where(k_dist_PS[..., None] >= 0,
                          jnp.exp(-jnp.maximum(k_dist_PS, 0)[..., None] * slopes_N), 0.0)
  block_decay_PN = jnp.exp(-len_P[:, None] * slopes_N)

  def step(kv, xs):
    q_BCNH, k_BSNH, v_BSNJ, k_decay_SN, block_decay_N = xs
    o_BCNJ = jnp.einsum("BCNH,BNHJ->BCNJ", q_BCNH * q_decay_CN[:, :, None], kv)
    kv = (kv * block_decay_N[:, None, None]
          + jnp.einsum("BSNH,BSNJ->BNHJ", k_BSNH * k_decay_SN[:, :, None], v_BSNJ))
    return kv, o_BCNJ

  kv_BNHJ, o_inter_PBCNJ = jax.lax.scan(
      step, kv_BNHJ.astype(jnp.float32),
      (jnp.moveaxis(q_BPCNH, 1, 0), jnp.moveaxis(k_BPSNH, 1, 0), jnp.moveaxis(v_BPSNJ, 1, 0),
       k_decay_PSN, block_decay_PN))
  o_BPCNJ = o_intra_BPCNJ + jnp.moveaxis(o_inter_PBCNJ, 0, 1)
  o_BTNJ = o_BPCNJ.reshape(b, num_blocks * c, n, -1)[:, :t]
  return o_BTNJ, kv_BNHJ


class LightningAttention(nnx.Module):
  """MiniMax-01 lightning attention layer (attention module contract of docs/DESIGN.md).

  Parameters (HF names; kernels input dims first):
    qkv_proj.kernel [D, N, 3, H]  (HF qkv_proj.weight [N*3*H, D]: per head q, k, v)
    output_gate.kernel [D, N, H]  (HF output_gate.weight [N*H, D])
    norm.scale [N*H]              (HF norm.weight; RMSNorm over all heads jointly, eps 1e-6)
    out_proj.kernel [N, H, D]     (HF out_proj.weight [D, N*H])
  `layer_idx`: this layer's index among all cfg.num_layers decoder layers (default 0); it sets the
  decay slopes (see `lightning_slopes`), so pass the real index to match a pretrained MiniMax-01.
  The cache is a `LightningCache`: float32 kv_BNHJ [B, N, H, H], the decayed sum of k^T v over all
  earlier tokens.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, layer_idx: int = 0):
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    self.qkv_proj = Linear((d, n, 3, h), ("embed", "heads", None, "head_dim"), "BTD,DNIH->BTNIH", **kw)
    self.output_gate = Linear((d, n, h), ("embed", "heads", "head_dim"), "BTD,DNH->BTNH", **kw)
    self.norm = RMSNorm(n * h, eps=NORM_EPS, names=("heads",), rngs=rngs,
                        param_dtype=dtype_of(cfg.param_dtype))
    self.out_proj = Linear((n, h, d), ("heads", "head_dim", "embed"), "BTNH,NHD->BTD", **kw)
    self.num_heads, self.head_dim = n, h
    self.block_size = cfg.lightning_block
    self.layer_idx = layer_idx
    # Python floats (static), turned into a float32 array at each call.
    self.slopes = tuple(float(s) for s in lightning_slopes(n, layer_idx, cfg.num_layers))
    self.dtype = dtype_of(cfg.dtype)

  def __call__(self, x_BTD, positions_BT, cache=None):
    """x_BTD [B, T, D], positions_BT [B, T] (unused: no positional encoding) -> (y_BTD, cache, {})."""
    del positions_BT
    b, t, _ = x_BTD.shape
    n, h = self.num_heads, self.head_dim
    qkv_BTNIH = jax.nn.silu(self.qkv_proj(x_BTD))
    qkv_BTNIH = sharding.constrain(qkv_BTNIH, "batch", "length", "heads", None, "head_dim")
    q_BTNH, k_BTNH, v_BTNH = qkv_BTNIH[:, :, :, 0], qkv_BTNIH[:, :, :, 1], qkv_BTNIH[:, :, :, 2]
    slopes_N = jnp.asarray(self.slopes, jnp.float32)

    kv_BNHJ = None if cache is None else cache.kv_BNHJ
    if cache is not None and t == 1:
      o_BNH, kv_BNHJ = lightning_step(q_BTNH[:, 0], k_BTNH[:, 0], v_BTNH[:, 0], slopes_N, kv_BNHJ)
      o_BTNH = o_BNH[:, None]
    else:
      o_BTNH, kv_BNHJ = lightning_core(q_BTNH, k_BTNH, v_BTNH, slopes_N, kv_BNHJ,
                                       block_size=self.block_size)
    # The norm spans all heads together: flatten to [B, T, N*H] as the reference does.
    o_flat = self.norm(o_BTNH.astype(self.dtype).reshape(b, t, n * h))
    gate_flat = jax.nn.sigmoid(self.output_gate(x_BTD)).reshape(b, t, n * h)
    y_BTD = self.out_proj((gate_flat * o_flat).reshape(b, t, n, h))
    if cache is not None:
      cache = cache.write(sharding.constrain(kv_BNHJ, "batch", "heads", "head_dim", None), None)
    return y_BTD, cache, {}

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """Empty LightningCache (zeros float32 [B, N, H, H]); its size does not grow with max_len, and
    it stays float32 whatever `dtype` (the decayed state loses precision in low precision)."""
    del max_len, dtype
    kv = jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
    return LightningCache(sharding.constrain(kv, "batch", "heads", "head_dim", None))

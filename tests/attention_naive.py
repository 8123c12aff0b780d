"""Naive numpy references for the attention tests: loops and explicit allowed-key sets.

Written independently of mixtral_jax.model.attention (own rope, own norm, own masks) so the tests
compare two implementations, not one implementation with itself.
"""
import numpy as np


def np_(x):
  return np.asarray(x, dtype=np.float64)


def rmsnorm(x, w, eps, zero_centered):
  x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  return x * (1.0 + w) if zero_centered else x * w


def rope(x_TNH, positions_T, rotary_dim, theta):
  """Rotate-half rope on the first rotary_dim dims of x [T, N, H]."""
  if rotary_dim == 0:
    return x_TNH
  half = rotary_dim // 2
  inv = theta ** (-np.arange(0, rotary_dim, 2) / rotary_dim)
  ang = positions_T[:, None] * inv[None]               # [T, half]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  x1, x2 = x_TNH[..., :half], x_TNH[..., half:rotary_dim]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_TNH[..., rotary_dim:]], -1)


def qkv(module, x_BTD, cfg):
  """q [B,T,N,H], k, v [B,T,K,H] from the module's parameters, positions 0..T-1."""
  x = np_(x_BTD)
  b, t, _ = x.shape
  q = np.einsum("btd,dnh->btnh", x, np_(module.q_proj.kernel[...]))
  k = np.einsum("btd,dkh->btkh", x, np_(module.k_proj.kernel[...]))
  v = np.einsum("btd,dkh->btkh", x, np_(module.v_proj.kernel[...]))
  z = cfg.norm_zero_centered
  if cfg.qk_norm == "full":
    q = rmsnorm(q.reshape(b, t, -1), np_(module.q_norm.scale[...]), cfg.norm_eps, z).reshape(q.shape)
    k = rmsnorm(k.reshape(b, t, -1), np_(module.k_norm.scale[...]), cfg.norm_eps, z).reshape(k.shape)
  elif cfg.qk_norm == "per_head":
    q = rmsnorm(q, np_(module.q_norm.scale[...]), cfg.norm_eps, z)
    k = rmsnorm(k, np_(module.k_norm.scale[...]), cfg.norm_eps, z)
  pos = np.arange(t, dtype=np.float64)
  q = np.stack([rope(q[i], pos, cfg.rotary_dim, cfg.rope_theta) for i in range(b)])
  k = np.stack([rope(k[i], pos, cfg.rotary_dim, cfg.rope_theta) for i in range(b)])
  return q, k, v


def attend(q, k, v, allowed):
  """allowed(b, kv_group, i) -> sorted list of key indices. Returns y [B, T, N, H]."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  y = np.zeros_like(q)
  for bi in range(b):
    for head in range(n):
      grp = head // g
      for i in range(t):
        js = np.asarray(allowed(bi, grp, i))
        s = k[bi, js, grp] @ q[bi, i, head] / np.sqrt(h)
        p = np.exp(s - s.max())
        p /= p.sum()
        y[bi, i, head] = p @ v[bi, js, grp]
  return y


def out(module, y_BTNH):
  return np.einsum("btnh,nhd->btd", y_BTNH, np_(module.o_proj.kernel[...]))


def top_blocks(scores, forced, top_k):
  """Forced blocks, then the best finite-scoring other blocks up to top_k in total."""
  chosen = list(dict.fromkeys(forced))[:top_k]
  rest = [c for c in np.argsort(-scores, kind="stable") if c not in chosen and np.isfinite(scores[c])]
  return chosen + rest[:max(top_k - len(chosen), 0)]


def blocks_to_keys(blocks, block, i):
  return sorted(j for c in blocks for j in range(c * block, (c + 1) * block) if j <= i)

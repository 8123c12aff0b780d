"""Pure-jnp block-sparse attention: the 'xla' implementation and the reference the kernels are tested against."""
import jax
import jax.numpy as jnp

# Finite stand-in for -inf: keeps fully masked rows free of inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense_mask(block_mask, *, t, s, block_q, block_kv, causal, window=None):
  """Token-level mask [B, K, T, S] from a tile mask [B, K, T//block_q, S//block_kv].

  With `causal`, query i sees key j iff j <= i + S - T (queries are the last T of S positions);
  with a `window` W too, only keys with q_pos - W < j (the query and the W - 1 keys before it).
  """
  mask_BKTS = jnp.repeat(jnp.repeat(block_mask, block_q, axis=2), block_kv, axis=3)
  q_pos = jnp.arange(t)[:, None] + (s - t)
  k_pos = jnp.arange(s)[None, :]
  if causal:
    mask_BKTS = mask_BKTS & (k_pos <= q_pos)[None, None]
  if window is not None:
    mask_BKTS = mask_BKTS & (k_pos > q_pos - window)[None, None]
  return mask_BKTS


def masked_attention_reference(q, k, v, mask_BKTS, *, sm_scale):
  """Softmax attention under a token-level mask; fp32 softmax; rows with no visible key give zeros.

  q [B, T, N, H], k/v [B, S, K, H] (N a multiple of K), mask_BKTS bool [B, K, T, S] (shared by the
  N // K query heads of a kv head). Returns [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  q_BTKGH = q.reshape(b, t, kh, n // kh, h).astype(jnp.float32)
  logits_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k.astype(jnp.float32)) * sm_scale
  mask_BK1TS = mask_BKTS[:, :, None]
  logits_BKGTS = jnp.where(mask_BK1TS, logits_BKGTS, MASK_VALUE)
  m_BKGT1 = jax.lax.stop_gradient(jnp.max(logits_BKGTS, axis=-1, keepdims=True))
  p_BKGTS = jnp.where(mask_BK1TS, jnp.exp(logits_BKGTS - m_BKGT1), 0.0)
  l_BKGT1 = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
  p_BKGTS = p_BKGTS / jnp.where(l_BKGT1 == 0.0, 1.0, l_BKGT1)
  o_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', p_BKGTS, v.astype(jnp.float32))
  return o_BTKGH.reshape(b, t, n, h).astype(q.dtype)


def block_sparse_attention_reference(q, k, v, block_mask, *, block_q, block_kv, causal, sm_scale,
                                     window=None):
  """Reference block-sparse attention; same contract as `api.block_sparse_attention`."""
  mask_BKTS = dense_mask(block_mask, t=q.shape[1], s=k.shape[1], block_q=block_q,
                         block_kv=block_kv, causal=causal, window=window)
  return masked_attention_reference(q, k, v, mask_BKTS, sm_scale=sm_scale)

"""MoE routers (softmax top-k, sigmoid + selection bias), their losses, and the bias update rule.

The router is chosen by `cfg.moe.router`, never by a model's name:
  softmax  Mixtral: p = softmax(logits); top-k of p; weights = p[top-k] (renormalized if normalize_topk).
  sigmoid  MiniMax-M2/M3, DeepSeek-V3: s = sigmoid(logits); experts = top-k of s + bias (bias only CHOOSES);
           weights = s[top-k] (the un-biased scores), renormalized if normalize_topk.
Both then multiply the weights by `routed_scaling_factor` (M3 2.0, DeepSeek-V3 2.5; M2 and Mixtral
1.0, as their transformers blocks apply none). Scaling the weights equals M3's `experts(...) * factor`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.model.layers import default_init
from mixtral_jax.sharding import partitioned


class RouterBias(nnx.Variable):
  """Per-expert selection bias, float32 [E]. Not a Param: optimizers (wrt=nnx.Param) and nnx.grad
  never touch it; it changes only through `update_bias`."""


class Router(nnx.Module):
  """Logits = x @ kernel in float32; `__call__` returns the chosen experts and their gate weights.

  Held by the MoE block as `gate` (like HF's `mlp.gate.weight`, transposed to [D, E]); the selection
  bias, when `cfg.moe.use_bias`, is `gate.e_score_correction_bias` (HF M3's place for it).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m = cfg.moe
    self.kind = m.router
    self.top_k = m.top_k
    self.normalize_topk = m.normalize_topk
    self.routed_scaling_factor = m.routed_scaling_factor
    # Kept in float32 whatever param_dtype: the top-k choice is sensitive to small logit changes.
    self.kernel = nnx.Param(partitioned(default_init, "embed", None)(
        rngs.params(), (cfg.d_model, m.num_experts), jnp.float32))
    self.e_score_correction_bias = (
        RouterBias(jnp.zeros((m.num_experts,), jnp.float32)) if m.use_bias else None)

  def logits(self, x_ND):
    """f32[N, E] router logits (float32 whatever the compute dtype)."""
    return jnp.einsum("ND,DE->NE", x_ND.astype(jnp.float32), self.kernel[...].astype(jnp.float32))

  def __call__(self, x_ND):
    """x_ND: [N, D] tokens. Returns (idx_NK int32, w_NK f32, logits_NE f32, scores_NE f32)."""
    logits_NE = self.logits(x_ND)
    bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias[...]
    idx_NK, w_NK, scores_NE = route(
        logits_NE, kind=self.kind, top_k=self.top_k, normalize_topk=self.normalize_topk,
        routed_scaling_factor=self.routed_scaling_factor, bias_E=bias)
    return idx_NK, w_NK, logits_NE, scores_NE


def route(logits_NE, *, kind: str, top_k: int, normalize_topk: bool = True,
          routed_scaling_factor: float = 1.0, bias_E=None):
  """Pure routing function on float32 logits [N, E].

  Returns idx_NK (int32 chosen experts), w_NK (float32 gate weights) and scores_NE (the softmax
  probabilities or sigmoid scores, un-biased; used by the balance loss).
  """
  if kind == "softmax":
    scores_NE = jax.nn.softmax(logits_NE, axis=-1)
  elif kind == "sigmoid":
    scores_NE = jax.nn.sigmoid(logits_NE)
  else:
    raise ValueError(f"router: unknown kind {kind!r}; expected 'softmax' or 'sigmoid'")
  choice_NE = scores_NE
  if bias_E is not None:
    # DeepSeek-V3 aux-loss-free balancing: the bias moves the choice, not the weights.
    choice_NE = scores_NE + bias_E.astype(jnp.float32)
  _, idx_NK = jax.lax.top_k(jax.lax.stop_gradient(choice_NE), top_k)
  w_NK = jnp.take_along_axis(scores_NE, idx_NK, axis=-1)
  if normalize_topk:
    w_NK = w_NK / jnp.sum(w_NK, axis=-1, keepdims=True)
  return idx_NK.astype(jnp.int32), w_NK * routed_scaling_factor, scores_NE


def _token_weights(mask_N, n: int):
  """f32 [N, 1]: 1 for the tokens that count (mask_N true), all ones when mask_N is None."""
  if mask_N is None:
    return jnp.ones((n, 1), jnp.float32)
  return mask_N.reshape(n, 1).astype(jnp.float32)


def expert_load(idx_NK, num_experts: int, mask_N=None):
  """f32[E]: token-expert assignments per expert (before any capacity dropping), counting only the
  tokens of mask_N (PAD positions of a padded batch would all pick the same experts)."""
  w_N1 = _token_weights(mask_N, idx_NK.shape[0])
  return jnp.sum(jax.nn.one_hot(idx_NK, num_experts, dtype=jnp.float32) * w_N1[..., None],
                 axis=(0, 1))


def sequence_balance_loss(idx_BTK, scores_BTE, mask_BT=None):
  """DeepSeek-V3 sequence-wise balance loss, averaged over the B sequences.

  Per sequence: f_i = E / (K T) * #{t : i in topk(t)},  P_i = 1/T * sum_t s_ti / sum_j s_tj,
  loss = sum_i f_i P_i (1 when routing is perfectly uniform). s are the softmax probabilities or
  sigmoid scores (un-biased); the selection is the biased top-k actually used. With mask_BT, T is
  each sequence's count of masked-in tokens and the others do not count.
  """
  b, t, k = idx_BTK.shape
  e = scores_BTE.shape[-1]
  w_BT = jnp.ones((b, t), jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
  t_B1 = jnp.maximum(jnp.sum(w_BT, axis=1, keepdims=True), 1.0)
  counts_BE = jnp.sum(jax.nn.one_hot(idx_BTK, e, dtype=jnp.float32) * w_BT[..., None, None],
                      axis=(1, 2))
  f_BE = jax.lax.stop_gradient(counts_BE * e / (k * t_B1))
  p_BTE = scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)
  p_BE = jnp.sum(p_BTE * w_BT[..., None], axis=1) / t_B1
  return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


def switch_balance_loss(idx_NK, scores_NE, mask_N=None):
  """Switch-Transformer / Mixtral load-balancing loss over all N tokens of the call (HF Mixtral's
  `load_balancing_loss_func` for one layer): E * sum_e f_e P_e with f_e = #{(n, k): idx_nk = e} / N
  and P_e = mean_n s_ne, so K when routing is uniform. Mixtral trained with weight 0.02. With mask_N,
  N counts only the masked-in tokens."""
  e = scores_NE.shape[-1]
  w_N1 = _token_weights(mask_N, idx_NK.shape[0])
  n = jnp.maximum(jnp.sum(w_N1), 1.0)
  f_E = jnp.sum(jax.nn.one_hot(idx_NK, e, dtype=jnp.float32) * w_N1[..., None], axis=(0, 1)) / n
  return e * jnp.sum(jax.lax.stop_gradient(f_E) * (jnp.sum(scores_NE * w_N1, axis=0) / n))


def z_loss(logits_NE):
  """Router z-loss: mean over tokens of logsumexp(logits)^2 (ST-MoE)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))


def bias_update(bias_E, load_E, rate):
  """bias + rate * sign(mean(load) - load): under-loaded experts become likelier, over-loaded less."""
  load_E = load_E.astype(jnp.float32)
  return bias_E + rate * jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)


def router_biases(model) -> list[tuple[tuple, RouterBias]]:
  """Every RouterBias in `model` as (path, variable), in `nnx.iter_graph` order.

  That order visits a module's attributes sorted by name and list entries by index, so for a
  Transformer keeping its blocks in one `nnx.List` it is layer order -- the order in which the
  Transformer stacks the per-layer loads into aux["load"] [L_moe, E]. Dense layers have no bias.
  """
  return [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, RouterBias)]


def update_bias(model, loads_LE, rate: float):
  """Applies `bias_update` to each MoE layer's RouterBias in place, row l of loads to the l-th bias.

  loads_LE: [L_moe, E] (or [E] for a single MoE). A bias with leading dims (scanned layers, [L, E])
  takes that many consecutive rows. A model without biases (use_bias=False) is left unchanged.
  """
  biases = router_biases(model)
  if not biases:
    return
  loads_LE = jnp.asarray(loads_LE)
  loads_LE = loads_LE.reshape(-1, loads_LE.shape[-1])
  rows = sum(int(np.prod(v.shape[:-1])) for _, v in biases)
  if rows != loads_LE.shape[0]:
    raise ValueError(f"update_bias: loads_LE has {loads_LE.shape[0]} rows but the model has {rows} "
                     f"MoE router biases ({[p for p, _ in biases]})")
  start = 0
  for _, v in biases:
    n = int(np.prod(v.shape[:-1]))
    load = loads_LE[start:start + n].reshape(v.shape)
    v[...] = bias_update(v[...], load, rate).astype(v[...].dtype)
    start += n

"""Mixture-of-experts block: router, SwiGLU experts with stacked weights, optional shared experts.

Dispatch (`cfg.moe.dispatch`):
  dropless  sort the N*K token-expert assignments by expert, grouped matmuls
            (`kernels.grouped_matmul`, chosen by `cfg.moe.grouped_matmul`; None = the backend's
            best: Pallas TPU / Pallas Triton kernels, on CPU the blocked XLA path), unsort and
            weight-combine. No token is dropped. The row permutations are gathers both ways (the
            inverse permutation replaces the unsort's scatter).
  capacity  each expert takes at most C = ceil(capacity_factor * N*K / E) assignments of the call's
            N tokens; the rest are dropped (contribute 0). Priority: every token's 1st choice, in token
            order, before any 2nd choice, and so on (GShard). Scatter into an [E, C] buffer, gather back.
  With `moe.expert_parallel` (default) on a mesh with expert > 1, dropless runs expert-parallel
  (moe_ep.py: local routing per data shard, all-to-all to the experts' devices); expert == 1 (or
  capacity dispatch) keeps the global-view path below.
Both are differentiable with respect to the expert weights, the router kernel (through the gate
weights) and the input. Under jit with a data-sharded batch the arrays are global, so the sort, the
capacity and aux["load"] are over the whole global batch.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.kernels import grouped_matmul as gmm_lib
from mixtral_jax.model import router as router_lib
from mixtral_jax.model.layers import MLP, default_init, dtype_of, gated_activation
from mixtral_jax.sharding import batch_shards, mesh_platform, partitioned


def swiglu_experts_dense(x_ND, idx_NK, w_NK, gate_EDF, up_EDF, down_EFD, act=gated_activation):
  """Per-token reference: every token through its K experts, gathered weights. [N, D] float32."""
  g = jnp.einsum("ND,NKDF->NKF", x_ND, gate_EDF[idx_NK])
  u = jnp.einsum("ND,NKDF->NKF", x_ND, up_EDF[idx_NK])
  y_NKD = jnp.einsum("NKF,NKFD->NKD", act(g, u), down_EFD[idx_NK])
  return jnp.einsum("NKD,NK->ND", y_NKD.astype(jnp.float32), w_NK)


def grouped_matmul(x_MD, w_EDF, group_sizes_E, *, impl: str | None = None, block: int | None = None):
  """Rows grouped by expert (group e = the next group_sizes_E[e] rows) times their expert's matrix.

  impl (`cfg.moe.grouped_matmul`): None = the backend's best (Pallas TPU on TPU, Pallas Triton on
  GPU, the blocked XLA path on CPU), or one of `kernels.grouped_matmul.IMPLEMENTATIONS`
  ("xla" = "blocked": each group padded to whole blocks of `block` rows, one batched matmul).
  """
  impl = "xla" if impl == "blocked" else impl
  # The mesh's platform, not the host's: an AOT compile for TPU on a CPU host must not take the CPU
  # path (the blocked path gathers one [D, F] expert matrix per 128-row block: M2 on 512 v5p chips,
  # 2080 blocks x 9 MiB = 18 GiB per matmul, and more in the backward).
  impl = impl or gmm_lib.default_implementation(mesh_platform())
  bs = None if block is None else gmm_lib.BlockSizes(block_m=block)
  return gmm_lib.grouped_matmul(x_MD, w_EDF, group_sizes_E, implementation=impl, block_sizes=bs)


@jax.custom_vjp
def _gather_rows(x_ND, src_M, inv_M):
  """x_ND[src_M] (row m of the sorted buffer is token src_M[m]); inv_M is the inverse permutation of
  the token-major assignments, so the backward is a gather too (no scatter-add)."""
  return x_ND[src_M]


def _gather_rows_fwd(x_ND, src_M, inv_M):
  return x_ND[src_M], (inv_M, x_ND.shape[0])


def _gather_rows_bwd(res, dxs_MD):
  inv_M, n = res
  # Token n's K assignments sit at rows inv_M[n*K : (n+1)*K] of the sorted buffer.
  dx = dxs_MD[inv_M].reshape(n, -1, dxs_MD.shape[-1]).sum(axis=1, dtype=jnp.float32)
  return dx.astype(dxs_MD.dtype), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def dropless_experts(x_ND, idx_NK, w_NK, gate_EDF, up_EDF, down_EFD, act=gated_activation,
                     impl: str | None = None):
  """Sorted grouped matmul. Returns y_ND float32 = sum_k w_nk * expert_{idx_nk}(x_n)."""
  n, k = idx_NK.shape
  e = gate_EDF.shape[0]
  with jax.named_scope("permute"):
    flat_M = idx_NK.reshape(-1)                        # M = N*K assignments, token-major
    order_M = jnp.argsort(flat_M, stable=True)         # grouped by expert
    group_sizes_E = jnp.bincount(flat_M, length=e).astype(jnp.int32)
    # inv_M[m]: the sorted row of assignment m. An int scatter of M entries replaces the [M, D]
    # float scatter of the unsort; every row permutation below is then a gather, fwd and bwd.
    inv_M = jnp.zeros_like(order_M).at[order_M].set(
        jnp.arange(order_M.shape[0], dtype=order_M.dtype))
    xs_MD = _gather_rows(x_ND, order_M // k, inv_M)
  with jax.named_scope("experts"):
    gmm = functools.partial(grouped_matmul, group_sizes_E=group_sizes_E, impl=impl)
    g_MF = gmm(xs_MD, gate_EDF)
    u_MF = gmm(xs_MD, up_EDF)
    ys_MD = gmm(act(g_MF, u_MF), down_EFD)
  with jax.named_scope("combine"):
    y_MD = _gather_rows(ys_MD, inv_M, order_M)           # unsort: row m is assignment m again
    return jnp.einsum("NKD,NK->ND", y_MD.reshape(n, k, -1).astype(jnp.float32), w_NK)


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
  """C = ceil(factor * tokens * top_k / E) assignments per expert."""
  return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def capacity_slots(idx_NK, num_experts: int, cap: int):
  """int32[N, K]: the buffer row e * cap + slot of each kept assignment; dropped ones get the
  spare row num_experts * cap.

  Slots are filled in priority order k-major (all 1st choices by token, then 2nd choices, ...).
  """
  n, k = idx_NK.shape
  onehot_KNE = jax.nn.one_hot(idx_NK.T, num_experts, dtype=jnp.int32)
  # Position of each assignment in its expert's queue, counting in (k, token) order.
  pos_KNE = jnp.cumsum(onehot_KNE.reshape(k * n, num_experts), axis=0).reshape(k, n, -1) - 1
  pos_KN = jnp.sum(pos_KNE * onehot_KNE, axis=-1)
  slot_KN = jnp.where(pos_KN < cap, idx_NK.T * cap + pos_KN, num_experts * cap)
  return slot_KN.T


def capacity_experts(x_ND, idx_NK, w_NK, gate_EDF, up_EDF, down_EFD, cap: int,
                     act=gated_activation):
  """Token-dropping dispatch: scatter kept assignments into an [E, C] buffer, batched expert
  matmuls, gather back. Returns y_ND float32."""
  n, k = idx_NK.shape
  e, d = gate_EDF.shape[0], x_ND.shape[1]
  slot_NK = capacity_slots(idx_NK, e, cap)
  tokens_NK = jnp.broadcast_to(jnp.arange(n)[:, None], (n, k))
  # Every kept assignment has its own slot; the dropped ones all land on the spare row.
  x_RD = jnp.zeros((e * cap + 1, d), x_ND.dtype).at[slot_NK].set(x_ND[tokens_NK])
  x_ECD = x_RD[:-1].reshape(e, cap, d)
  g = jnp.einsum("ECD,EDF->ECF", x_ECD, gate_EDF)
  u = jnp.einsum("ECD,EDF->ECF", x_ECD, up_EDF)
  y_ECD = jnp.einsum("ECF,EFD->ECD", act(g, u), down_EFD)
  y_RD = jnp.concatenate([y_ECD.reshape(e * cap, d), jnp.zeros((1, d), y_ECD.dtype)])
  return jnp.einsum("NKD,NK->ND", y_RD[slot_NK].astype(jnp.float32), w_NK)


class MoE(nnx.Module):
  """Routed SwiGLU experts (+ optional shared experts) on [B, T, D].

  Parameters: `gate` (Router: kernel [D, E], optional e_score_correction_bias RouterBias [E]),
  `gate_proj` [E, D, F], `up_proj` [E, D, F], `down_proj` [E, F, D], and `shared_experts`
  (MLP of width num_shared_experts * shared_expert_dim) when num_shared_experts > 0.
  """
  ROUTED_EXPERTS = ("gate_proj", "up_proj", "down_proj")  # the stacks a token uses top_k of

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m = cfg.moe
    self.num_experts = m.num_experts
    self.top_k = m.top_k
    self.dispatch = m.dispatch
    self.expert_parallel = m.get("expert_parallel", True)
    self.all_to_all = m.get("all_to_all")
    self.grouped_matmul = m.get("grouped_matmul")
    self.capacity_factor = m.capacity_factor
    self.aux_loss_weight = m.aux_loss_weight
    self.balance_loss = m.get("balance_loss", "sequence")
    if self.balance_loss not in ("sequence", "switch"):
      raise ValueError(f"moe.balance_loss: unknown {self.balance_loss!r}; expected 'sequence' or 'switch'")
    self.z_loss_weight = m.z_loss_weight
    self.dtype = dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    e, d, f = m.num_experts, cfg.d_model, m.expert_dim
    self.gate = router_lib.Router(cfg, rngs=rngs)

    def param(shape, *names):
      return nnx.Param(partitioned(default_init, *names)(rngs.params(), shape, param_dtype))

    self.gate_proj = param((e, d, f), "expert", "embed", "expert_mlp")
    self.up_proj = param((e, d, f), "expert", "embed", "expert_mlp")
    self.down_proj = param((e, f, d), "expert", "expert_mlp", "embed")
    # act(gate, up): the gated nonlinearity of config.mlp_activation (clamped SwiGLU for M3).
    self.act = functools.partial(gated_activation, kind=cfg.mlp_activation, alpha=cfg.swiglu_alpha,
                                 limit=cfg.swiglu_limit)
    self.shared_experts = (
        MLP(d, m.num_shared_experts * m.shared_expert_dim, rngs=rngs, dtype=self.dtype,
            param_dtype=param_dtype, activation=cfg.mlp_activation, alpha=cfg.swiglu_alpha,
            limit=cfg.swiglu_limit) if m.num_shared_experts > 0 else None)

  def _use_expert_parallel(self, num_tokens: int) -> bool:
    """moe.expert_parallel on a mesh with expert > 1 whose batch split divides the tokens (a decode
    step of one token keeps the global-view path)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not self.expert_parallel or mesh.empty or mesh.shape.get("expert", 1) == 1:
      return False
    return num_tokens % batch_shards(mesh) == 0

  def __call__(self, x_BTD, mask_BT=None):
    """Returns (y_BTD in the compute dtype, aux): aux["load"] f32[E] assignments per expert over
    this call's whole batch (before capacity dropping); aux["losses"] {name: weighted scalar}.

    mask_BT (bool [B, T], optional): the tokens that count in the load and the balance losses
    (False at PAD). Every token is still computed; the mask changes only the router statistics.
    """
    b, t, d = x_BTD.shape
    mask_N = None if mask_BT is None else mask_BT.reshape(b * t)
    x_ND = x_BTD.reshape(b * t, d).astype(self.dtype)
    expert_parallel = self.dispatch == "dropless" and self._use_expert_parallel(b * t)
    if expert_parallel:
      from mixtral_jax.model import moe_ep  # late: moe_ep imports this module
      idx_NK, w_NK, logits_NE, scores_NE = moe_ep.route_local(self.gate, x_ND)
    else:
      with jax.named_scope("router"):
        idx_NK, w_NK, logits_NE, scores_NE = self.gate(x_ND)
    weights = [w[...].astype(self.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj)]
    if expert_parallel:
      y_ND = moe_ep.ep_experts(x_ND, idx_NK, w_NK, *weights, act=self.act,
                               all_to_all=self.all_to_all, gmm_impl=self.grouped_matmul)
    elif self.dispatch == "dropless":
      y_ND = dropless_experts(x_ND, idx_NK, w_NK, *weights, act=self.act,
                              impl=self.grouped_matmul)
    elif self.dispatch == "capacity":
      cap = capacity(b * t, self.top_k, self.num_experts, self.capacity_factor)
      y_ND = capacity_experts(x_ND, idx_NK, w_NK, *weights, cap, act=self.act)
    else:
      raise ValueError(f"moe.dispatch: unknown {self.dispatch!r}; expected 'dropless' or 'capacity'")
    y_BTD = y_ND.reshape(b, t, d).astype(self.dtype)
    if self.shared_experts is not None:
      # M3: routed (already scaled by routed_scaling_factor through the weights) + shared.
      y_BTD = y_BTD + self.shared_experts(x_BTD.astype(self.dtype))

    losses = {}
    if self.aux_loss_weight > 0 and self.balance_loss == "switch":
      losses["moe_balance"] = self.aux_loss_weight * router_lib.switch_balance_loss(
          idx_NK, scores_NE, mask_N)
    elif self.aux_loss_weight > 0:
      losses["moe_balance"] = self.aux_loss_weight * router_lib.sequence_balance_loss(
          idx_NK.reshape(b, t, -1), scores_NE.reshape(b, t, -1), mask_BT)
    if self.z_loss_weight > 0:
      losses["moe_z"] = self.z_loss_weight * router_lib.z_loss(logits_NE)
    aux = {"load": router_lib.expert_load(idx_NK, self.num_experts, mask_N), "losses": losses}
    return y_BTD, aux

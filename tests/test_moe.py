"""MoE block and routers: references, transformers parity (Mixtral, MiniMax-M2, MiniMax-M3), dispatch
equivalences, capacity dropping, loads (also under a data-sharded jit), bias update, gradients.

Tolerances: float32 throughout (conftest sets matmul precision 'highest'); parity and dispatch
equivalence at atol/rtol 1e-5, loads and selections exact.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mixtral_jax import config as config_lib
from mixtral_jax.model import moe as moe_lib
from mixtral_jax.model import router as router_lib

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_cfg(**moe):
  cfg = config_lib.model_defaults()
  cfg.d_model = 16
  cfg.moe.update(dict(num_experts=4, top_k=2, expert_dim=24, shared_expert_dim=8))
  cfg.moe.update(moe)
  return cfg


def rand(shape, seed=0, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def silu(x):
  return x / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- routers


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_router_matches_numpy(normalize):
  logits = rand((10, 6), seed=1)
  idx, w, _ = router_lib.route(jnp.asarray(logits), kind="softmax", top_k=2, normalize_topk=normalize)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref_idx = np.argsort(-p, axis=-1)[:, :2]
  ref_w = np.take_along_axis(p, ref_idx, -1)
  if normalize:
    ref_w /= ref_w.sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_allclose(np.asarray(w), ref_w, **TOL)


def test_sigmoid_bias_changes_choice_not_weights():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  idx, w, _ = router_lib.route(logits, kind="sigmoid", top_k=2, routed_scaling_factor=2.0)
  assert sorted(np.asarray(idx)[0].tolist()) == [0, 1]
  bias = jnp.array([0.0, 0.0, 10.0, 0.0])  # lifts expert 2 over expert 1 for the choice only
  idx_b, w_b, _ = router_lib.route(logits, kind="sigmoid", top_k=2, routed_scaling_factor=2.0,
                                   bias_E=bias)
  idx_b, w_b = np.asarray(idx_b)[0], np.asarray(w_b)[0]
  assert sorted(idx_b.tolist()) == [0, 2]
  s = 1.0 / (1.0 + np.exp(-np.array([2.0, 1.0, 0.0, -1.0])))
  expect = {0: s[0] / (s[0] + s[2]) * 2.0, 2: s[2] / (s[0] + s[2]) * 2.0}
  np.testing.assert_allclose(w_b, [expect[int(i)] for i in idx_b], **TOL)
  # Without normalization the weights are the raw un-biased sigmoid scores (times the factor).
  _, w_raw, _ = router_lib.route(logits, kind="sigmoid", top_k=2, normalize_topk=False,
                                 routed_scaling_factor=2.0, bias_E=bias)
  np.testing.assert_allclose(np.asarray(w_raw)[0], 2.0 * s[idx_b], **TOL)


def test_router_module_uses_bias_variable():
  cfg = tiny_cfg(router="sigmoid", use_bias=True, top_k=1)
  gate = router_lib.Router(cfg, rngs=nnx.Rngs(0))
  assert isinstance(gate.e_score_correction_bias, router_lib.RouterBias)
  assert not isinstance(gate.e_score_correction_bias, nnx.Param)
  x = jnp.asarray(rand((5, 16), seed=2))
  gate.e_score_correction_bias[...] = jnp.array([0.0, 0.0, 0.0, 5.0])
  idx, w, logits, _ = gate(x)
  assert logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(idx)[:, 0], 3)
  np.testing.assert_allclose(np.asarray(w), 1.0, **TOL)  # top-1 renormalized


# ---------------------------------------------------------------- transformers parity


def load_experts(moe, gate_up_EID, down_EDI):
  """HF stacked experts (gate_up [E, 2F, D], down [E, D, F]) -> ours ([E, D, F] x2, [E, F, D])."""
  f = down_EDI.shape[-1]
  moe.gate_proj[...] = jnp.asarray(gate_up_EID[:, :f, :].transpose(0, 2, 1))
  moe.up_proj[...] = jnp.asarray(gate_up_EID[:, f:, :].transpose(0, 2, 1))
  moe.down_proj[...] = jnp.asarray(down_EDI.transpose(0, 2, 1))


def randomize_torch(module, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def run_torch(block, x):
  with torch.no_grad():
    return block(torch.from_numpy(x.copy())).numpy()


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_mixtral_block_parity(dispatch):
  from transformers.models.mixtral import modeling_mixtral as hf
  hf_cfg = hf.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4,
                            num_experts_per_tok=2)
  block = hf.MixtralSparseMoeBlock(hf_cfg).eval()
  randomize_torch(block, 0)
  moe = moe_lib.MoE(tiny_cfg(router="softmax", dispatch=dispatch, capacity_factor=8.0),
                    rngs=nnx.Rngs(0))
  moe.gate.kernel[...] = jnp.asarray(block.gate.weight.detach().numpy().T)
  load_experts(moe, block.experts.gate_up_proj.detach().numpy(), block.experts.down_proj.detach().numpy())
  x = rand((2, 5, 16), seed=3)
  y, aux = moe(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), run_torch(block, x), **TOL)
  assert float(aux["load"].sum()) == 2 * 5 * 2


def test_minimax_m2_block_parity():
  from transformers.models.minimax_m2 import modeling_minimax_m2 as hf
  hf_cfg = hf.MiniMaxM2Config(hidden_size=16, intermediate_size=24, num_local_experts=4,
                              num_experts_per_tok=2)
  block = hf.MiniMaxM2SparseMoeBlock(hf_cfg).eval()
  randomize_torch(block, 1)
  bias = rand((4,), seed=4, scale=0.3)
  block.e_score_correction_bias.copy_(torch.from_numpy(bias))
  moe = moe_lib.MoE(tiny_cfg(router="sigmoid", use_bias=True), rngs=nnx.Rngs(0))
  moe.gate.kernel[...] = jnp.asarray(block.gate.weight.detach().numpy().T)
  moe.gate.e_score_correction_bias[...] = jnp.asarray(bias)
  load_experts(moe, block.experts.gate_up_proj.detach().numpy(), block.experts.down_proj.detach().numpy())
  x = rand((2, 6, 16), seed=5)
  y, _ = moe(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), run_torch(block, x), **TOL)
  # The bias matters here: without it the output differs.
  moe.gate.e_score_correction_bias[...] = jnp.zeros(4)
  assert not np.allclose(np.asarray(moe(jnp.asarray(x))[0]), run_torch(block, x), atol=1e-3)


def test_minimax_m3_block_parity_with_shared_expert():
  """M3: routed output * routed_scaling_factor + shared expert, with M3's clamped SwiGLU
  (GPT-OSS style: alpha 1.702, limit 7, up + 1) in the experts and the shared expert."""
  from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf
  hf_cfg = hf.MiniMaxM3VLTextConfig(hidden_size=16, intermediate_size=24, num_local_experts=4,
                                    num_experts_per_tok=2, shared_intermediate_size=8,
                                    routed_scaling_factor=2.0)
  block = hf.MiniMaxM3VLSparseMoeBlock(hf_cfg).eval()
  randomize_torch(block, 2)
  bias = rand((4,), seed=6, scale=0.3)
  block.gate.e_score_correction_bias.copy_(torch.from_numpy(bias))
  sh = block.shared_experts

  cfg = tiny_cfg(router="sigmoid", use_bias=True, routed_scaling_factor=2.0, num_shared_experts=1,
                 shared_expert_dim=8)
  cfg.mlp_activation = "swiglu_clamped"
  moe = moe_lib.MoE(cfg, rngs=nnx.Rngs(0))
  moe.gate.kernel[...] = jnp.asarray(block.gate.weight.detach().numpy().T)
  moe.gate.e_score_correction_bias[...] = jnp.asarray(bias)
  load_experts(moe, block.experts.gate_up_proj.detach().numpy(), block.experts.down_proj.detach().numpy())
  w_gu = sh.gate_up_proj.weight.detach().numpy()  # [2I, D]
  moe.shared_experts.gate.kernel[...] = jnp.asarray(w_gu[:8].T)
  moe.shared_experts.up.kernel[...] = jnp.asarray(w_gu[8:].T)
  moe.shared_experts.down.kernel[...] = jnp.asarray(sh.down_proj.weight.detach().numpy().T)
  x = rand((2, 6, 16), seed=7) * 8.0  # large enough that the clamps at +-7 are active
  y, _ = moe(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), run_torch(block, x), **TOL)


# ---------------------------------------------------------------- dispatch


def expert_weights(e=4, d=16, f=24, seed=10):
  return (jnp.asarray(rand((e, d, f), seed, 0.3)), jnp.asarray(rand((e, d, f), seed + 1, 0.3)),
          jnp.asarray(rand((e, f, d), seed + 2, 0.3)))


def skewed_routing(n=12, k=2, e=4, seed=20):
  """Distinct experts per token, skewed towards expert 0, one expert unused by nobody's choice."""
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.choice(e, size=k, replace=False, p=[0.55, 0.25, 0.2, 0.0]) for _ in range(n)])
  w = rng.uniform(0.1, 1.0, size=(n, k)).astype(np.float32)
  return jnp.asarray(idx, jnp.int32), jnp.asarray(w)


def test_dropless_matches_dense_reference_and_grads():
  x = jnp.asarray(rand((12, 16), seed=30))
  idx, w = skewed_routing()
  ws = expert_weights()
  np.testing.assert_allclose(moe_lib.dropless_experts(x, idx, w, *ws),
                             moe_lib.swiglu_experts_dense(x, idx, w, *ws), **TOL)

  def loss(fn):
    return lambda x, w, *ws: jnp.sum(jnp.sin(fn(x, idx, w, *ws)))

  g = jax.grad(loss(moe_lib.dropless_experts), argnums=(0, 1, 2, 3, 4))(x, w, *ws)
  g_ref = jax.grad(loss(moe_lib.swiglu_experts_dense), argnums=(0, 1, 2, 3, 4))(x, w, *ws)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, **TOL)


def capacity_reference(x, idx, w, ws, cap):
  """Python loop: slots filled k-major then token order; a full expert drops the assignment."""
  gate, up, down = (np.asarray(a) for a in ws)
  x, idx, w = np.asarray(x), np.asarray(idx), np.asarray(w)
  n, k = idx.shape
  used = np.zeros(gate.shape[0], int)
  y = np.zeros_like(x)
  kept = 0
  for j in range(k):
    for t in range(n):
      e = idx[t, j]
      if used[e] < cap:
        used[e] += 1
        kept += 1
        y[t] += w[t, j] * ((silu(x[t] @ gate[e]) * (x[t] @ up[e])) @ down[e])
  return y, kept


def test_capacity_large_factor_equals_dropless():
  x = jnp.asarray(rand((12, 16), seed=31))
  idx, w = skewed_routing()
  ws = expert_weights()
  cap = moe_lib.capacity(12, 2, 4, 4.0)  # 24 >= every expert's load
  np.testing.assert_allclose(moe_lib.capacity_experts(x, idx, w, *ws, cap),
                             moe_lib.dropless_experts(x, idx, w, *ws), **TOL)


def test_capacity_small_factor_drops_as_specified():
  x = jnp.asarray(rand((12, 16), seed=32))
  idx, w = skewed_routing()
  ws = expert_weights()
  cap = moe_lib.capacity(12, 2, 4, 0.5)
  assert cap == math.ceil(0.5 * 12 * 2 / 4) == 3
  y = moe_lib.capacity_experts(x, idx, w, *ws, cap)
  y_ref, kept = capacity_reference(x, idx, w, ws, cap)
  assert kept < 24  # some assignments really are dropped
  np.testing.assert_allclose(np.asarray(y), y_ref, **TOL)
  slots = np.asarray(moe_lib.capacity_slots(idx, 4, cap))
  used = slots[slots < 4 * cap]
  assert used.size == kept
  assert len(np.unique(used)) == used.size  # each slot holds at most one assignment
  # Gradients flow through the kept assignments.
  gx = jax.grad(lambda x: jnp.sum(moe_lib.capacity_experts(x, idx, w, *ws, cap) ** 2))(x)
  assert float(jnp.abs(gx).sum()) > 0


# ---------------------------------------------------------------- loads, losses, bias


def test_load_counts_and_losses_off_by_default():
  moe = moe_lib.MoE(tiny_cfg(), rngs=nnx.Rngs(1))
  x = jnp.asarray(rand((3, 5, 16), seed=40))
  _, aux = moe(x)
  assert aux["losses"] == {}
  idx, _, _, _ = moe.gate(x.reshape(15, 16))
  np.testing.assert_array_equal(np.asarray(aux["load"]), np.bincount(np.asarray(idx).ravel(), minlength=4))
  assert aux["load"].dtype == jnp.float32 and aux["load"].shape == (4,)


def test_losses_match_formulas():
  cfg = tiny_cfg(router="sigmoid", aux_loss_weight=0.1, z_loss_weight=0.01)
  moe = moe_lib.MoE(cfg, rngs=nnx.Rngs(2))
  x = jnp.asarray(rand((2, 5, 16), seed=41))
  _, aux = moe(x)
  logits = np.asarray(moe.gate.logits(x.reshape(10, 16))).reshape(2, 5, 4)
  s = 1.0 / (1.0 + np.exp(-logits))
  idx = np.argsort(-s, axis=-1)[..., :2]
  bal = 0.0
  for b in range(2):
    f = np.bincount(idx[b].ravel(), minlength=4) * 4 / (2 * 5)
    p = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
    bal += (f * p).sum() / 2
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(aux["losses"]["moe_balance"], 0.1 * bal, **TOL)
  np.testing.assert_allclose(aux["losses"]["moe_z"], 0.01 * np.mean(lse ** 2), **TOL)
  # Perfectly uniform routing gives a balance loss of exactly 1.
  idx_u = jnp.array([[[0, 1], [2, 3]]])
  np.testing.assert_allclose(router_lib.sequence_balance_loss(idx_u, jnp.ones((1, 2, 4))), 1.0, **TOL)


def test_bias_update_rule():
  bias = jnp.array([0.0, 0.5, -0.5, 1.0])
  load = jnp.array([1.0, 5.0, 3.0, 3.0])  # mean 3: under, over, equal, equal
  np.testing.assert_allclose(router_lib.bias_update(bias, load, 0.1), [0.1, 0.4, -0.5, 1.0], **TOL)


class _Stack(nnx.Module):
  """Two MoE layers and a dense one in a list, like the Transformer keeps its blocks."""

  def __init__(self, cfg):
    self.layers = nnx.List([moe_lib.MoE(cfg, rngs=nnx.Rngs(i)) for i in range(12)])
    self.dense = nnx.Linear(2, 2, rngs=nnx.Rngs(0))


def test_update_bias_in_layer_order():
  cfg = tiny_cfg(router="sigmoid", use_bias=True, expert_dim=4)
  model = _Stack(cfg)
  paths = [p for p, _ in router_lib.router_biases(model)]
  assert paths == [("layers", i, "gate", "e_score_correction_bias") for i in range(12)]  # 10 after 9
  loads = np.zeros((12, 4), np.float32)
  loads[np.arange(12), np.arange(12) % 4] = 8.0  # layer l overloads expert l % 4
  before = nnx.state(model, nnx.Param)
  router_lib.update_bias(model, jnp.asarray(loads), 0.01)
  for l, layer in enumerate(model.layers):
    expect = np.full(4, 0.01, np.float32)
    expect[l % 4] = -0.01
    np.testing.assert_allclose(layer.gate.e_score_correction_bias[...], expect, **TOL)
  jax.tree.map(np.testing.assert_array_equal, before, nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match="rows"):
    router_lib.update_bias(model, jnp.asarray(loads[:3]), 0.01)


def test_sharded_loads_equal_single_device():
  cfg = tiny_cfg(router="sigmoid", use_bias=True, num_shared_experts=1)
  moe = moe_lib.MoE(cfg, rngs=nnx.Rngs(3))
  moe.gate.e_score_correction_bias[...] = jnp.array([0.0, 0.2, -0.1, 0.05])
  x = jnp.asarray(rand((8, 4, 16), seed=50))
  y_ref, aux_ref = moe(x)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    assert xs.sharding.shard_shape(xs.shape)[0] == 2  # each device holds 2 of the 8 rows
    y, aux = nnx.jit(lambda m, x: m(x))(moe, xs)
  np.testing.assert_array_equal(np.asarray(aux["load"]), np.asarray(aux_ref["load"]))
  assert float(aux["load"].sum()) == 8 * 4 * 2  # the global batch, not one shard
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_grads_reach_params_not_bias(dispatch):
  cfg = tiny_cfg(router="sigmoid", use_bias=True, dispatch=dispatch, num_shared_experts=1,
                 aux_loss_weight=0.1, z_loss_weight=0.01)
  moe = moe_lib.MoE(cfg, rngs=nnx.Rngs(4))
  x = jnp.asarray(rand((2, 6, 16), seed=60))

  def loss(m):
    y, aux = m(x)
    return jnp.mean(y ** 2) + sum(aux["losses"].values())

  grads = nnx.jit(nnx.grad(loss))(moe)
  leaves = nnx.to_flat_state(grads)
  names = {path for path, _ in leaves}
  assert ("gate", "e_score_correction_bias") not in names
  for path in [("gate", "kernel"), ("gate_proj",), ("up_proj",), ("down_proj",),
               ("shared_experts", "down", "kernel")]:
    g = dict(leaves)[path]
    assert float(jnp.abs(g[...]).sum()) > 0, path


def test_bfloat16_compute_close_to_float32():
  cfg = tiny_cfg(num_shared_experts=1)
  moe = moe_lib.MoE(cfg, rngs=nnx.Rngs(5))
  cfg16 = tiny_cfg(num_shared_experts=1)
  cfg16.dtype = "bfloat16"
  moe16 = moe_lib.MoE(cfg16, rngs=nnx.Rngs(5))  # same seed: same float32 master weights
  x = jnp.asarray(rand((2, 4, 16), seed=70))
  y, aux = moe(x)
  y16, aux16 = moe16(x)
  assert y16.dtype == jnp.bfloat16 and aux16["load"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y), atol=2e-2, rtol=5e-2)


def test_full_size_shapes_eval_shape():
  cfg = config_lib.model_defaults()
  cfg.d_model = 4096
  cfg.moe.update(dict(num_experts=8, top_k=2, expert_dim=14336))  # Mixtral 8x7B
  moe = nnx.eval_shape(lambda: moe_lib.MoE(cfg, rngs=nnx.Rngs(0)))
  assert moe.gate.kernel.shape == (4096, 8)
  assert moe.gate_proj.shape == moe.up_proj.shape == (8, 4096, 14336)
  assert moe.down_proj.shape == (8, 14336, 4096)
  y, aux = nnx.eval_shape(lambda m, x: m(x), moe, jax.ShapeDtypeStruct((1, 8, 4096), jnp.float32))
  assert y.shape == (1, 8, 4096) and aux["load"].shape == (8,)


@pytest.mark.parametrize("sizes", [(5, 0, 9, 2), (0, 0, 16, 0), (1, 1, 1, 13)])
@pytest.mark.parametrize("block", [1, 4, 128])
def test_blocked_grouped_matmul_equals_ragged_dot(sizes, block):
  x = jnp.asarray(rand((16, 8), seed=40))
  w = jnp.asarray(rand((4, 8, 6), seed=41))
  gs = jnp.asarray(sizes, jnp.int32)
  want = jax.lax.ragged_dot(x, w, gs)
  got = moe_lib.grouped_matmul(x, w, gs, impl="blocked", block=block)
  np.testing.assert_allclose(got, want, **TOL)
  # and its gradients (the blocked path scatters and gathers rows)
  f = lambda impl: jax.grad(lambda x, w: jnp.sum(moe_lib.grouped_matmul(x, w, gs, impl=impl, block=block) ** 2),
                            argnums=(0, 1))(x, w)
  for a, b in zip(f("blocked"), f("ragged_dot")):
    np.testing.assert_allclose(a, b, **TOL)


def test_switch_balance_loss_matches_hf_mixtral():
  # HF transformers' Mixtral load_balancing_loss_func for one layer, no attention mask.
  from transformers.models.mixtral import modeling_mixtral
  logits = rand((12, 4), seed=50)
  hf = modeling_mixtral.load_balancing_loss_func((torch.tensor(logits),), num_experts=4, top_k=2)
  idx, _, scores = router_lib.route(jnp.asarray(logits), kind="softmax", top_k=2)
  np.testing.assert_allclose(router_lib.switch_balance_loss(idx, scores), float(hf), **TOL)
  # uniform routing gives top_k
  idx_u = jnp.asarray([[0, 1], [2, 3]])
  np.testing.assert_allclose(router_lib.switch_balance_loss(idx_u, jnp.full((2, 4), 0.25)), 2.0, **TOL)


def test_mixtral_experiment_carries_the_switch_balance_loss():
  from mixtral_jax.experiments import mixtral_8x7b
  m = mixtral_8x7b.get_config().model.moe
  assert (m.balance_loss, m.aux_loss_weight) == ("switch", 0.02)
  cfg = tiny_cfg(aux_loss_weight=0.02, balance_loss="switch")
  moe = moe_lib.MoE(cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(rand((2, 5, 16), seed=51))
  _, aux = moe(x)
  idx, _, _, scores = moe.gate(x.reshape(10, 16))
  np.testing.assert_allclose(aux["losses"]["moe_balance"],
                             0.02 * router_lib.switch_balance_loss(idx, scores), **TOL)


def test_mask_leaves_masked_tokens_out_of_load_and_losses():
  """mask_BT (the trainer's tokens != PAD): the load and both balance losses equal those of the
  unmasked tokens alone, and the outputs do not change."""
  x = jnp.asarray(rand((2, 6, 16), seed=44))
  mask = np.ones((2, 6), bool)
  mask[0, 4:] = False
  mask[1, 2:] = False
  for balance in ("sequence", "switch"):
    moe = moe_lib.MoE(tiny_cfg(router="sigmoid", aux_loss_weight=0.1, balance_loss=balance),
                      rngs=nnx.Rngs(5))
    y_all, _ = moe(x)
    y, aux = moe(x, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_all))
    idx, _, _, scores = moe.gate(x.reshape(12, 16))
    idx, scores = np.asarray(idx).reshape(2, 6, 2), np.asarray(scores).reshape(2, 6, 4)
    np.testing.assert_array_equal(np.asarray(aux["load"]),
                                  np.bincount(idx[mask].ravel(), minlength=4))
    if balance == "switch":
      ref = router_lib.switch_balance_loss(jnp.asarray(idx[mask]), jnp.asarray(scores[mask]))
    else:  # per sequence over its own unmasked tokens, then the mean over sequences
      ref = np.mean([router_lib.sequence_balance_loss(jnp.asarray(idx[b][mask[b]][None]),
                                                      jnp.asarray(scores[b][mask[b]][None]))
                     for b in range(2)])
    np.testing.assert_allclose(aux["losses"]["moe_balance"], 0.1 * np.asarray(ref), **TOL)

"""The layer plan: its value for the M2 / M3 / Lightning-hybrid layouts, and that the model, the
converter, the parameter counter and the HF config mapping all read the same plan."""
import pytest
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax.convert import hf_config
from mixtral_jax.convert.hf import _Layers
from mixtral_jax.experiments import minimax_m2, minimax_m2_lightning_hybrid, minimax_m3_msa
from mixtral_jax.model import plan as plan_lib
from mixtral_jax.model.transformer import Block, ScannedBlocks, Transformer, count_params


def _tiny(m, **kw):
  m.update(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=4,
           mlp_dim=48, window=8, lightning_block=8, **kw)
  m.msa.update(block_size=8, top_k=2, index_head_dim=8)
  m.moe.update(num_experts=4, top_k=2, expert_dim=16, shared_expert_dim=16)
  config_lib.validate_model(m)
  return m


def _summary(plan):
  return [(s.index, s.attention, s.moe, s.segment, s.position, s.segment_size) for s in plan]


def test_plan_of_m2_scanned_is_one_segment():
  m = minimax_m2.get_config().model
  m.update(num_layers=4, scan_layers=True)
  assert _summary(plan_lib.layer_plan(m)) == [(i, "full", True, 0, i, 4) for i in range(4)]
  m.scan_layers = False
  assert _summary(plan_lib.layer_plan(m)) == [(i, "full", True, i, 0, 1) for i in range(4)]


def test_plan_of_m3_splits_dense_full_and_msa_runs():
  m = minimax_m3_msa.get_config().model
  m.update(num_layers=6, num_dense_layers=1, scan_layers=True,
           attention_pattern=("full",) * 3 + ("msa",) * 3)
  assert _summary(plan_lib.layer_plan(m)) == [
      (0, "full", False, 0, 0, 1),
      (1, "full", True, 1, 0, 2), (2, "full", True, 1, 1, 2),
      (3, "msa", True, 2, 0, 3), (4, "msa", True, 2, 1, 3), (5, "msa", True, 2, 2, 3)]


def test_plan_of_lightning_hybrid_never_scans_lightning():
  m = minimax_m2_lightning_hybrid.get_config().model
  m.update(num_layers=10, scan_layers=True)  # 7 lightning, 1 full, then the period again
  plan = plan_lib.layer_plan(m)
  assert plan_lib.attention_types(plan) == ("lightning",) * 7 + ("full",) + ("lightning",) * 2
  assert all(s.segment_size == 1 for s in plan)
  assert [s.segment for s in plan] == list(range(10))
  assert plan[7].residual_kind == "full" and plan[0].residual_kind == "lightning"


def test_param_path_of_scanned_and_single_layers():
  m = _tiny(config_lib.model_defaults(), num_layers=3, num_dense_layers=1, scan_layers=True)
  plan = plan_lib.layer_plan(m)
  assert plan[0].param_path("attn", "q_proj", "kernel") == (("layers", 0, "attn", "q_proj", "kernel"), None)
  assert plan[2].param_path("mlp", "gate_proj") == (("layers", 1, "blocks", "mlp", "gate_proj"), 1)


CASES = {
    "m2": (minimax_m2, dict(num_layers=3)),
    "m3": (minimax_m3_msa, dict(num_layers=5, num_dense_layers=2, mlp_activation="swiglu_clamped",
                                attention_pattern=("full",) * 3 + ("msa",) * 2)),
    "lightning": (minimax_m2_lightning_hybrid, dict(num_layers=4,
                                                    attention_pattern=("lightning",) * 3 + ("full",))),
}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_model_converter_counter_and_hf_config_agree_with_the_plan(name, scan):
  module, kw = CASES[name]
  m = module.get_config().model
  if name == "m3":
    m.moe.num_shared_experts = 1
  m = _tiny(m, scan_layers=scan, **kw)
  plan = plan_lib.layer_plan(m)
  model = nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0)))

  # The model: one entry of model.layers per segment, of the plan's kind.
  segs = plan_lib.segments(plan)
  assert len(model.layers) == len(segs)
  for seg, block in zip(segs, model.layers):
    if seg[0].scanned:
      assert isinstance(block, ScannedBlocks) and block.n == len(seg)
      block = block.blocks
    else:
      assert isinstance(block, Block)
    assert block.attn_type == seg[0].attention and block.is_moe == seg[0].moe

  # The converter: every logical layer path maps through the plan onto a model parameter.
  flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  lay = _Layers(m)
  shapes = lay.logical_shapes({p: tuple(v.get_value().shape) for p, v in flat.items()})
  assert {p[1] for p in shapes if p[0] == "layers"} == set(range(m.num_layers))
  for p, shape in shapes.items():
    phys, j = lay.physical(p)
    full = tuple(flat[phys].get_value().shape)
    assert (full if j is None else full[1:]) == shape, p
  assert [a.slopes for _, a in lay.lightning(model)] == [
      tuple(model.layers[s.segment].attn.slopes) for s in plan if s.attention == "lightning"]

  # The counter: the routed experts of the plan's MoE layers, top_k of num_experts active.
  e = m.moe
  routed = sum(s.moe for s in plan) * 3 * e.num_experts * m.d_model * e.expert_dim
  counts = count_params(model, m)
  assert counts["total"] - counts["active"] == routed - routed * e.top_k // e.num_experts

  # The HF config mapping writes its per-layer lists from the plan.
  if name == "m3":
    hf = hf_config.from_model_config(m, "minimax_m3_vl_text")
    assert hf["mlp_layer_types"] == ["sparse" if s.moe else "dense" for s in plan]
    assert hf["layer_types"] == ["minimax_m3_sparse" if s.attention == "msa" else "full_attention"
                                 for s in plan]
    back = hf_config.to_model_config(hf, base=m)
    assert _summary(plan_lib.layer_plan(back)) == _summary(plan)

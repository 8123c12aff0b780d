"""MiniMax-M3-style sparse attention on the M2 backbone: 3 dense-attention layers, then MSA layers
(index branch picks the top-16 blocks of 128 keys per query and GQA group; exact softmax over them).

M3's own text model is larger (transformers' MiniMaxM3VLTextConfig: hidden 6144, 60 layers, 128
experts top-4 with a shared expert, clamped SwiGLU, routed_scaling_factor 2.0); the
`m3` argument builds those dimensions instead of M2's.

  python -m mixtral_jax.train --config=experiments/minimax_m3_msa.py --workdir=/tmp/m3
  python -m mixtral_jax.train --config=experiments/minimax_m3_msa.py:m3 --workdir=/tmp/m3_full
"""
from mixtral_jax.experiments import _common
from mixtral_jax.experiments.minimax_m2 import get_config as m2_config


def get_config(arg=None):
  c = m2_config()
  m = c.model
  args = _common.parse_arg(arg)
  if "m3" in args:
    m.update(d_model=6144, num_layers=60, num_heads=64, num_kv_heads=4, head_dim=128, rotary_dim=64,
             mlp_activation="swiglu_clamped", num_dense_layers=0, mlp_dim=12288)
    m.moe.update(num_experts=128, top_k=4, expert_dim=3072, num_shared_experts=1,
                 shared_expert_dim=3072, routed_scaling_factor=2.0)
  m.qk_norm = "per_head"
  m.norm_zero_centered = True
  m.attention_pattern = ("full",) * 3 + ("msa",) * (m.num_layers - 3)
  m.msa.update(block_size=128, top_k=16, index_head_dim=128, local_blocks=1,
               selection="per_group", kl_loss_weight=1.0)
  return _common.apply_arg(c, [a for a in args if a != "m3"])

"""Mixtral 8x7B (46.7B total / 12.9B active): softmax top-2 router over 8 experts, full GQA attention.

  python -m mixtral_jax.train --config=experiments/mixtral_8x7b.py --workdir=/tmp/mixtral
  python -m mixtral_jax.train --config=experiments/mixtral_8x7b.py:smoke --workdir=/tmp/smoke  # tiny, CPU
"""
from mixtral_jax.config import default_config
from mixtral_jax.experiments import _common


def get_config(arg=None):
  c = default_config()
  m = c.model
  m.vocab_size = 32000
  m.d_model = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.num_kv_heads = 8
  m.head_dim = 128
  m.rotary_dim = 128
  m.rope_theta = 1e6
  m.norm_eps = 1e-5
  m.attention_pattern = ("full",)
  # Mixtral's load-balancing loss (Switch form, HF router_aux_loss_coef 0.02): without it the softmax
  # router collapses (issue 9: one expert took 48% of assignments after 30 steps).
  m.moe.update(num_experts=8, top_k=2, expert_dim=14336, router="softmax", normalize_topk=True,
               aux_loss_weight=0.02, balance_loss="switch")
  m.dtype = "bfloat16"
  m.remat = True
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  c.train.update(batch_size=256, seq_len=4096, learning_rate=3e-4, warmup_steps=2000, steps=100_000)
  return _common.apply_arg(c, arg)

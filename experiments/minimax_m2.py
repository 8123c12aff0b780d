"""MiniMax-M2 (about 230B total / 9.8B active): 62 layers of full GQA attention, 256 fine-grained experts,
sigmoid routing with a learnable selection bias (aux-loss-free), QK-norm over the whole projection.

  python -m mixtral_jax.train --config=experiments/minimax_m2.py --workdir=/tmp/m2
  python -m mixtral_jax.train --config=experiments/minimax_m2.py:smoke --workdir=/tmp/smoke
"""
from mixtral_jax.config import default_config
from mixtral_jax.experiments import _common


def m2_model(m):
  m.vocab_size = 200064
  m.d_model = 3072
  m.num_layers = 62
  m.num_heads = 48
  m.num_kv_heads = 8
  m.head_dim = 128
  m.rotary_dim = 64
  m.rope_theta = 5e6
  m.qk_norm = "full"   # HF qk_norm_type="per_layer": one RMSNorm over all heads' q (and k)
  m.tie_embeddings = False
  m.attention_pattern = ("full",)
  m.moe.update(num_experts=256, top_k=8, expert_dim=1536, router="sigmoid", use_bias=True,
               normalize_topk=True, routed_scaling_factor=1.0, bias_update_rate=1e-3)
  m.dtype = "bfloat16"
  m.remat = True
  return m


def get_config(arg=None):
  c = default_config()
  m2_model(c.model)
  c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
  c.train.update(batch_size=512, seq_len=4096, learning_rate=2e-4, warmup_steps=2000, steps=100_000)
  return _common.apply_arg(c, arg)

"""Quickstart: a tiny hybrid-attention MoE that learns long-context recall on a laptop CPU.

Two layers — a sliding-window layer (window 16) then a full-attention layer — each with 8
sigmoid-routed experts (top-2, aux-loss-free bias balancing), trained for a few minutes on MQAR and
variable tracking at 64 tokens (loss on the answers), then evaluated at 64-512 tokens: beyond the
training length and far beyond the window.

  python -m mixtral_jax.train --config=experiments/quickstart.py --workdir=runs/quickstart
  python -m mixtral_jax.evaluate --config=experiments/quickstart.py --workdir=runs/quickstart
"""
from mixtral_jax.config import default_config
from mixtral_jax.experiments import _common


def get_config(arg=None):
  c = default_config()
  m = c.model
  m.update(vocab_size=256, d_model=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
           rotary_dim=24, rope_theta=10_000.0, qk_norm="per_head", num_dense_layers=0,
           attention_pattern=("swa", "full"), window=16)
  m.moe.update(num_experts=8, top_k=2, expert_dim=96, router="sigmoid", use_bias=True,
               routed_scaling_factor=1.0, dispatch="dropless")
  c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  c.train.update(steps=3000, batch_size=32, seq_len=64, learning_rate=3e-3, warmup_steps=100,
                 log_every=100, checkpoint_every=500, weight_decay=0.01, loss_on="answers")
  c.data.tasks = {"mqar": 1.0, "variable_tracking": 1.0}
  c.eval.update(tasks=("mqar", "variable_tracking"), lengths=(64, 128, 256, 512),
                num_examples=128, batch_size=32)
  return _common.apply_arg(c, arg)

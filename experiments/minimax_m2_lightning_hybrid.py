"""MiniMax-M2 with MiniMax-01's Lightning hybrid: seven Lightning (linear) layers per softmax layer.

The other variant M2's authors rejected for losing multi-hop long-context reasoning.

  python -m mixtral_jax.train --config=experiments/minimax_m2_lightning_hybrid.py --workdir=/tmp/m2_lin
"""
from mixtral_jax.experiments import _common
from mixtral_jax.experiments.minimax_m2 import get_config as m2_config


def get_config(arg=None):
  c = m2_config()
  c.model.attention_pattern = ("lightning",) * 7 + ("full",)
  c.model.lightning_block = 256
  return _common.apply_arg(c, arg)

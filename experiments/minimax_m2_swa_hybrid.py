"""MiniMax-M2 with a sliding-window hybrid: three SWA layers (window 4096) per full-attention layer.

One of the variants M2's authors tried and rejected (RULER-128K common-word extraction fell from
90.0 to 72.0). Everything else is M2.

  python -m mixtral_jax.train --config=experiments/minimax_m2_swa_hybrid.py --workdir=/tmp/m2_swa
"""
from mixtral_jax.experiments import _common
from mixtral_jax.experiments.minimax_m2 import get_config as m2_config


def get_config(arg=None):
  c = m2_config()
  c.model.attention_pattern = ("swa", "swa", "swa", "full")
  c.model.window = 4096
  return _common.apply_arg(c, arg)

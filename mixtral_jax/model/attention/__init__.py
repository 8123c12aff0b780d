"""Attention registry: `make_attention(cfg, layer_type, rngs=...)` builds one layer's attention.

Every module follows the contract in docs/DESIGN.md:
`__call__(x_BTD, positions_BT, cache=None) -> (y_BTD, cache, losses)` and
`init_cache(batch, max_len, dtype)`.
"""
from __future__ import annotations

from flax import nnx

from mixtral_jax.model.attention.full import FullAttention
from mixtral_jax.model.attention.moba import MoBAAttention
from mixtral_jax.model.attention.msa import MSAAttention
from mixtral_jax.model.attention.swa import SlidingWindowAttention

SOFTMAX_ATTENTION = {
    "full": FullAttention,
    "swa": SlidingWindowAttention,
    "moba": MoBAAttention,
    "msa": MSAAttention,
}


def make_attention(cfg, layer_type: str, *, rngs: nnx.Rngs, layer_idx: int | None = None):
  """The attention module for `layer_type` ('full' | 'swa' | 'moba' | 'msa' | 'lightning').

  layer_idx: the decoder layer's index among all layers; Lightning's decay slopes depend on it.
  """
  if layer_type == "lightning":
    # Imported lazily: lightning attention lives in its own module with its own dependencies.
    from mixtral_jax.model.attention.lightning import LightningAttention
    return LightningAttention(cfg, rngs=rngs, layer_idx=layer_idx or 0)
  if layer_type not in SOFTMAX_ATTENTION:
    raise ValueError(f"unknown attention type {layer_type!r}; expected one of "
                     f"{tuple(SOFTMAX_ATTENTION) + ('lightning',)}")
  return SOFTMAX_ATTENTION[layer_type](cfg, rngs=rngs)

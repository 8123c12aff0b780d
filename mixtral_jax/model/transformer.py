"""The decoder-only MoE transformer: embedding, a stack of blocks, final norm, LM head.

Each block is attention then a dense SwiGLU MLP or the MoE block, as the layer plan
(`plan.layer_plan(cfg)`) says; with cfg.scan_layers a segment of identical layers is one scanned
block. Families differ by config values only.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.model import layers
from mixtral_jax.model import plan as plan_lib
from mixtral_jax.model.attention import make_attention
from mixtral_jax.model.moe import MoE
from mixtral_jax.sharding import constrain


class Block(nnx.Module):
  """norm -> attention -> residual -> norm -> MLP or MoE -> residual."""

  def __init__(self, cfg, spec: plan_lib.LayerSpec, *, rngs: nnx.Rngs):
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    norm = dict(eps=cfg.norm_eps, zero_centered=cfg.norm_zero_centered, rngs=rngs,
                param_dtype=param_dtype)
    self.attn_type = spec.attention
    self.input_norm = layers.RMSNorm(cfg.d_model, **norm)
    self.attn = make_attention(cfg, spec.attention, layer_idx=spec.index, rngs=rngs)
    self.post_attn_norm = layers.RMSNorm(cfg.d_model, **norm)
    self.is_moe = spec.moe
    if self.is_moe:
      self.mlp = MoE(cfg, rngs=rngs)
    else:
      self.mlp = layers.MLP(cfg.d_model, cfg.mlp_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                            activation=cfg.mlp_activation, alpha=cfg.swiglu_alpha,
                            limit=cfg.swiglu_limit)
    s = cfg.residual_scales
    kind = spec.residual_kind
    self.attn_scales = (float(s[f"{kind}_alpha"]), float(s[f"{kind}_beta"]))
    self.mlp_scales = (float(s.mlp_alpha), float(s.mlp_beta))
    self.post_norm_residual = bool(cfg.post_norm_residual)

  def _residual(self, x, normed, out, scales):
    alpha, beta = scales
    base = normed if self.post_norm_residual else x
    if (alpha, beta) == (1.0, 1.0):
      return base + out
    return base * alpha + out * beta

  def __call__(self, x_BTD, positions_BT, cache=None, mask_BT=None):
    """Returns (x_BTD, cache, aux) with aux = {"load": f32[E] or None, "losses": {...}}; mask_BT
    (optional) marks the tokens counted in the router's load and balance losses."""
    # Named scopes tag the HLO ops (op_name metadata) so a profile splits time by part.
    with jax.named_scope("attention"):
      h = self.input_norm(x_BTD)
      a, cache, losses = self.attn(h, positions_BT, cache)
    x_BTD = self._residual(x_BTD, h, a, self.attn_scales)
    h = self.post_attn_norm(x_BTD)
    load = None
    if self.is_moe:
      with jax.named_scope("moe"):
        m, moe_aux = self.mlp(h, mask_BT)
      load = moe_aux["load"]
      losses = {**losses, **moe_aux["losses"]}
    else:
      with jax.named_scope("mlp"):
        m = self.mlp(h)
    x_BTD = self._residual(x_BTD, h, m, self.mlp_scales)
    return constrain(x_BTD, "batch", "length", "embed"), cache, {"load": load, "losses": losses}


def _apply(block, x_BTD, positions_BT, cache, remat: bool, mask_BT=None):
  """block(x, positions, cache, mask); with `remat`, a full forward (no cache) recomputes the
  block's activations in the backward pass instead of keeping them. The one remat path."""
  if remat and cache is None:
    return nnx.remat(lambda b, x, p, m: b(x, p, None, m))(block, x_BTD, positions_BT, mask_BT)
  return block(x_BTD, positions_BT, cache, mask_BT)


class ScannedBlocks(nnx.Module):
  """A segment of the layer plan: consecutive identical blocks with parameters stacked on a leading
  layer axis, applied with nnx.scan: one compiled block instead of n (compile time and memory of the
  big configs)."""

  def __init__(self, cfg, specs: tuple[plan_lib.LayerSpec, ...], *, rngs: nnx.Rngs):
    n = len(specs)

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n, transform_metadata={nnx.PARTITION_NAME: None})
    def create(rngs):
      return Block(cfg, specs[0], rngs=rngs)  # the segment's layers differ only in their index

    self.blocks = create(rngs)
    self.n = n
    self.remat = bool(cfg.remat)

  def __call__(self, x_BTD, positions_BT, cache=None, mask_BT=None):
    """Like Block.__call__; the cache and aux["load"] carry a leading [n] layer axis."""
    if cache is None:
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
      def body(block, x):
        x, _, aux = _apply(block, x, positions_BT, None, self.remat, mask_BT)
        return x, aux
      x_BTD, aux = body(self.blocks, x_BTD)
    else:
      @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0, 0))
      def body(block, x, c):
        return _apply(block, x, positions_BT, c, self.remat, mask_BT)
      x_BTD, cache, aux = body(self.blocks, x_BTD, cache)
    losses = {name: jnp.sum(v) for name, v in aux["losses"].items()}
    return x_BTD, cache, {"load": aux["load"], "losses": losses}

  def init_cache(self, batch: int, max_len: int, dtype):
    one = self.blocks.attn.init_cache(batch, max_len, dtype)  # shapes come from the config only
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.n,) + a.shape), one)


def layer_segments(cfg) -> list[tuple[int, int]]:
  """(first layer, count) of each entry of `Transformer.layers` (see `plan.layer_plan`)."""
  return [(seg[0].index, len(seg)) for seg in plan_lib.segments(plan_lib.layer_plan(cfg))]


class Transformer(nnx.Module):
  """model(tokens_BT) -> float32 logits [B, T, V]; model.forward(...) adds the cache and aux."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    self.embed = layers.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)
    # layers[s] is segment s of the layer plan: one Block, or a ScannedBlocks of identical layers.
    self.layers = nnx.List([
        Block(cfg, seg[0], rngs=rngs) if len(seg) == 1 else ScannedBlocks(cfg, seg, rngs=rngs)
        for seg in plan_lib.segments(plan_lib.layer_plan(cfg))])
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps,
                                     zero_centered=cfg.norm_zero_centered, rngs=rngs,
                                     param_dtype=param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = layers.Linear((cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                   "BTD,DV->BTV", rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, tokens_BT):
    return self.forward(tokens_BT)[0]

  def forward(self, tokens_BT, positions_BT=None, cache=None, mask_BT=None):
    """Full causal forward (cache None) or an incremental step over a cache.

    tokens_BT: int32 [B, T]. positions_BT: int32 [B, T], default 0..T-1 (with a cache: the
    absolute positions of these tokens). mask_BT: bool [B, T], optional: the tokens that count in
    the MoE routers' load and balance losses (the trainer passes tokens != PAD); the logits do not
    depend on it. Returns (logits f32 [B, T, V], cache, aux) with
    aux = {"load": f32 [L_moe, E], "losses": {name: scalar summed over layers}}.
    """
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x_BTD = constrain(self.embed(tokens_BT), "batch", "length", "embed")
    new_cache, loads, losses = [], [], {}
    for i, block in enumerate(self.layers):
      layer_cache = None if cache is None else cache[i]
      if isinstance(block, ScannedBlocks):  # remats inside its scan body
        x_BTD, layer_cache, aux = block(x_BTD, positions_BT, layer_cache, mask_BT)
      else:
        x_BTD, layer_cache, aux = _apply(block, x_BTD, positions_BT, layer_cache, self.cfg.remat,
                                         mask_BT)
      new_cache.append(layer_cache)
      if aux["load"] is not None:
        loads.append(aux["load"].reshape(-1, aux["load"].shape[-1]))
      for name, value in aux["losses"].items():
        losses[name] = losses.get(name, 0.0) + value
    with jax.named_scope("lm_head"):
      x_BTD = self.final_norm(x_BTD)
      if self.cfg.tie_embeddings:
        logits = self.embed.attend(x_BTD)
      else:
        logits = self.lm_head(x_BTD)
    logits = constrain(logits.astype(jnp.float32), "batch", "length", "vocab")
    load = (jnp.concatenate(loads) if loads
            else jnp.zeros((0, self.cfg.moe.num_experts), jnp.float32))
    return logits, (None if cache is None else new_cache), {"load": load, "losses": losses}

  def init_cache(self, batch: int, max_len: int, dtype=None) -> list[Any]:
    """One cache per layer, sized for `max_len` positions."""
    dtype = dtype or layers.dtype_of(self.cfg.dtype)
    return [block.init_cache(batch, max_len, dtype) if isinstance(block, ScannedBlocks)
            else block.attn.init_cache(batch, max_len, dtype) for block in self.layers]


def count_params(model_or_state, cfg) -> dict[str, int]:
  """Total parameters, and active per token (top_k of the routed experts), both with and
  without the embedding tables; `active_matmul`: the active ones a token multiplies through
  (the input embedding is a gather unless tied to the output), for FLOP estimates.

  model_or_state: the model, or its nnx.Param state (arrays or ShapeDtypeStructs of eval_shape).
  The routed experts are the `MoE.ROUTED_EXPERTS` stacks of the plan's MoE layers.
  """
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  routed_paths = {spec.param_path("mlp", name)[0] for spec in plan_lib.layer_plan(cfg) if spec.moe
                  for name in MoE.ROUTED_EXPERTS}
  total = embed = input_embed = routed = 0
  for path, v in nnx.to_flat_state(state):
    x = v.get_value() if hasattr(v, "get_value") else v  # arrays or ShapeDtypeStructs (eval_shape)
    n = math.prod(x.shape)
    total += n
    path = tuple(path)
    if path[0] in ("embed", "lm_head"):
      embed += n
    if path[0] == "embed":
      input_embed += n
    if path in routed_paths:  # stacked [n_layers, E, ...] in a scanned segment: counted once
      routed += n
  e = cfg.moe
  active = total - routed + (routed * e.top_k // e.num_experts if e.num_experts else 0)
  return dict(total=total, active=active, total_no_embed=total - embed,
              active_no_embed=active - embed,
              active_matmul=active - (0 if cfg.tie_embeddings else input_embed))

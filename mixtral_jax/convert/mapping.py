"""Our parameter paths <-> Hugging Face tensor names, with the transforms between their layouts.

Our kernels keep input dims first ([D, N, H] for q_proj); HF `nn.Linear` weights are [out, in]
with heads flattened, so a linear map is `ours = hf.T.reshape(our_shape)` and back
`hf = ours.reshape(in, out).T`. Expert stacks: ours gate_proj/up_proj [E, D, F], down_proj [E, F, D];
HF either fuses them in memory (`experts.gate_up_proj` [E, 2F, D] = gate rows then up rows,
`experts.down_proj` [E, D, F]) or stores them per expert on disk (`experts.{e}.w1/w3/w2.weight`,
the Mixtral checkpoint format that save_pretrained still writes for mixtral/minimax/minimax_m2).

A `Rule` moves a group of our params from/to a group of HF tensors. `rules()` lists them for one
model, choosing the on-disk format per group from the names present when reading. Canonical HF
names are those of the text model's CausalLM (`model.layers.{i}...`, `lm_head.weight`);
`canonical_name` maps other spellings (VL prefixes, `block_sparse_moe`, MiniMax-M3 originals) to them.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import numpy as np

Path = tuple  # ('layers', 0, 'attn', 'q_proj', 'kernel')


@dataclasses.dataclass(frozen=True)
class Rule:
  """ours[i] <- to_ours([hf tensors]) and [hf tensors] <- to_hf([ours])."""
  ours: tuple[Path, ...]
  hf: tuple[str, ...]
  hf_shapes: tuple[tuple[int, ...], ...]
  to_ours: Callable[[list[np.ndarray]], list[np.ndarray]]
  to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]


def _identity(our: Path, hf: str, shape) -> Rule:
  return Rule((our,), (hf,), (tuple(shape),), lambda a: [a[0]], lambda a: [a[0]])


def _linear(our: Path, hf: str, shape, n_in: int = 1) -> Rule:
  """nn.Linear weight [out, in] <-> our kernel `shape` (first n_in dims are the input)."""
  shape = tuple(shape)
  d_in, d_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
  return Rule((our,), (hf,), ((d_out, d_in),),
              lambda a: [a[0].T.reshape(shape)],
              lambda a: [a[0].reshape(d_in, d_out).T])


def _fused_pair(ours: tuple[Path, Path], hf: str, shape) -> Rule:
  """Dense gate/up [D, F] each <-> one `gate_up_proj.weight` [2F, D] (gate rows first)."""
  d, f = shape
  return Rule(ours, (hf,), ((2 * f, d),),
              lambda a: [a[0][:f].T, a[0][f:].T],
              lambda a: [np.concatenate([a[0].T, a[1].T], axis=0)])


def _experts_gate_up(ours: tuple[Path, Path], hf: str, shape) -> Rule:
  """gate_proj, up_proj [E, D, F] <-> experts.gate_up_proj [E, 2F, D]."""
  e, d, f = shape
  return Rule(ours, (hf,), ((e, 2 * f, d),),
              lambda a: [a[0][:, :f].transpose(0, 2, 1), a[0][:, f:].transpose(0, 2, 1)],
              lambda a: [np.concatenate([a[0].transpose(0, 2, 1), a[1].transpose(0, 2, 1)], axis=1)])


def _experts_down(our: Path, hf: str, shape) -> Rule:
  """down_proj [E, F, D] <-> experts.down_proj [E, D, F]."""
  e, f, d = shape
  return Rule((our,), (hf,), ((e, d, f),),
              lambda a: [a[0].transpose(0, 2, 1)], lambda a: [a[0].transpose(0, 2, 1)])


def _experts_per_expert(our: Path, names: Sequence[str], shape) -> Rule:
  """[E, A, B] stack <-> E nn.Linear weights [B, A] (w1/w3: A=D, B=F; w2: A=F, B=D)."""
  e, a_dim, b_dim = shape
  return Rule((our,), tuple(names), ((b_dim, a_dim),) * e,
              lambda a: [np.stack([x.T for x in a])],
              lambda a: [a[0][i].T for i in range(e)])


_VL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."))
_RENAMES = ((".block_sparse_moe.", ".mlp."), (".self_attn.index_q_proj.", ".self_attn.indexer.q_proj."),
            (".self_attn.index_k_proj.", ".self_attn.indexer.k_proj."),
            (".self_attn.index_q_norm.", ".self_attn.indexer.q_norm."),
            (".self_attn.index_k_norm.", ".self_attn.indexer.k_norm."))
# Tensors that are not part of the text causal LM: vision tower / projector of the VL model,
# multi-token-prediction heads, rotary caches of old checkpoints.
_IGNORED = re.compile(
    r"^(model\.)?(visual|vision_tower|vision_model|multi_modal_projector|patch_merge_mlp)\.|"
    r"(^|\.)mtp\.|\.rotary_emb\.inv_freq$")
# Lightning buffers transformers saves; derived from the slopes, which are checked separately.
LIGHTNING_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def canonical_name(name: str, family: str) -> str | None:
  """The CausalLM state-dict name of a checkpoint tensor, or None for a tensor we skip on purpose."""
  for old, new in _VL_PREFIXES:
    if name.startswith(old):
      name = new + name[len(old):]
  if _IGNORED.search(name):
    return None
  for old, new in _RENAMES:
    name = name.replace(old, new)
  if family == "minimax_m3_vl_text":
    name = name.replace(".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias")
  return name


def disk_name(name: str, family: str) -> str:
  """The name transformers' save_pretrained writes for a canonical name (Mixtral-format families
  keep the original `block_sparse_moe` module name on disk)."""
  if family in ("mixtral", "minimax", "minimax_m2"):
    return name.replace(".mlp.", ".block_sparse_moe.")
  return name


def rules(cfg, family: str, shapes: dict[Path, tuple[int, ...]], plan,
          available: set[str] | None = None) -> list[Rule]:
  """Every rule of one model. shapes: our logical param path ('layers', i, ...) -> shape (from the
  abstract model). plan: `plan.layer_plan(cfg)`, which says each layer's attention and MLP kind.

  available: canonical HF names present (reading); picks fused vs per-expert storage per layer.
  None (writing): the layout transformers' save_pretrained writes for `family`.
  """
  out: list[Rule] = []
  m3 = family == "minimax_m3_vl_text"
  out.append(_identity(("embed", "embedding"), "model.embed_tokens.weight", shapes[("embed", "embedding")]))
  out.append(_identity(("final_norm", "scale"), "model.norm.weight", shapes[("final_norm", "scale")]))
  if not cfg.tie_embeddings:
    out.append(_linear(("lm_head", "kernel"), "lm_head.weight", shapes[("lm_head", "kernel")]))
  for spec in plan:
    i = spec.index
    p, L = f"model.layers.{i}.", ("layers", i)
    sh = lambda *k: shapes[L + k]  # noqa: E731
    for ours, theirs in (("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm")):
      out.append(_identity(L + (ours, "scale"), p + theirs + ".weight", sh(ours, "scale")))
    a = L + ("attn",)
    lin = lambda name, n_in=1: _linear(  # noqa: E731
        a + (name, "kernel"), p + f"self_attn.{name}.weight", sh("attn", name, "kernel"), n_in)
    norm = lambda name: _identity(  # noqa: E731
        a + (name, "scale"), p + f"self_attn.{name}.weight", sh("attn", name, "scale"))
    if spec.attention == "lightning":
      out += [lin("qkv_proj"), lin("output_gate"), lin("out_proj", 2), norm("norm")]
    else:
      out += [lin("q_proj"), lin("k_proj"), lin("v_proj"), lin("o_proj", 2)]
      if cfg.qk_norm != "none":
        out += [norm("q_norm"), norm("k_norm")]
      if spec.attention == "msa":
        for name in ("q_proj", "k_proj"):
          out.append(_linear(a + ("indexer", name, "kernel"), p + f"self_attn.indexer.{name}.weight",
                             sh("attn", "indexer", name, "kernel")))
        for name in ("q_norm", "k_norm"):
          out.append(_identity(a + ("indexer", name, "scale"), p + f"self_attn.indexer.{name}.weight",
                               sh("attn", "indexer", name, "scale")))
    mlp = L + ("mlp",)
    if not spec.moe:
      out += _gate_up_down(mlp, ("gate", "up", "down"), p + "mlp.", sh("mlp", "gate", "kernel"),
                           sh("mlp", "down", "kernel"), available, fused_default=m3)
      continue
    out.append(_linear(mlp + ("gate", "kernel"), p + "mlp.gate.weight", sh("mlp", "gate", "kernel")))
    if cfg.moe.use_bias:
      bias = p + ("mlp.gate.e_score_correction_bias" if m3 else "mlp.e_score_correction_bias")
      out.append(_identity(mlp + ("gate", "e_score_correction_bias"), bias,
                           sh("mlp", "gate", "e_score_correction_bias")))
    e = cfg.moe.num_experts
    fused = p + "mlp.experts.gate_up_proj"
    use_fused = (fused in available) if available is not None else m3
    if use_fused:
      out.append(_experts_gate_up((mlp + ("gate_proj",), mlp + ("up_proj",)), fused, sh("mlp", "gate_proj")))
      out.append(_experts_down(mlp + ("down_proj",), p + "mlp.experts.down_proj", sh("mlp", "down_proj")))
    else:
      for ours, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        names = [p + f"mlp.experts.{j}.{w}.weight" for j in range(e)]
        out.append(_experts_per_expert(mlp + (ours,), names, sh("mlp", ours)))
    if cfg.moe.num_shared_experts:
      se = mlp + ("shared_experts",)
      out += _gate_up_down(se, ("gate", "up", "down"), p + "mlp.shared_experts.",
                           sh("mlp", "shared_experts", "gate", "kernel"),
                           sh("mlp", "shared_experts", "down", "kernel"), available, fused_default=True)
  return out


def _gate_up_down(prefix: Path, names, hf_prefix: str, gate_shape, down_shape, available,
                  fused_default: bool) -> list[Rule]:
  """A dense gated MLP: fused `gate_up_proj.weight` (M3's layout) or separate gate/up weights."""
  g, u, d = (prefix + (n, "kernel") for n in names)
  fused = hf_prefix + "gate_up_proj.weight"
  use_fused = (fused in available) if available is not None else fused_default
  out = [_fused_pair((g, u), fused, gate_shape)] if use_fused else [
      _linear(g, hf_prefix + "gate_proj.weight", gate_shape),
      _linear(u, hf_prefix + "up_proj.weight", gate_shape)]
  out.append(_linear(d, hf_prefix + "down_proj.weight", down_shape))
  return out

"""The layer plan: what each decoder layer is, derived once from the model config.

  plan = layer_plan(cfg)          # tuple[LayerSpec, ...], one per layer
  plan[i].attention               # 'full' | 'swa' | 'lightning' | 'msa' | 'moba'
  plan[i].moe                     # MoE block (True) or dense MLP (False, the first num_dense_layers)
  plan[i].segment, .position      # model.layers[segment]; its layer `position` when scanned

The model builds its blocks from it, the converter addresses parameters through `param_path`, the
parameter counter finds the routed experts through it, and the HF config mapping writes its per-layer
lists from it. Pure Python (no jax), so the HF config mapping imports it cheaply.
"""
from __future__ import annotations

import dataclasses

from mixtral_jax.config import pattern_for_layers

Path = tuple  # ('layers', 3, 'attn', 'q_proj', 'kernel')


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One decoder layer.

  index: the layer's index among all cfg.num_layers layers.
  attention: its attention type (cfg.attention_pattern repeated to num_layers).
  moe: MoE block, else the dense gated MLP.
  segment: which entry of `Transformer.layers` holds it; position: its index along that segment's
    stacked layer axis; segment_size: the segment's layer count (1 = a plain Block, no stacking).
  """
  index: int
  attention: str
  moe: bool
  segment: int
  position: int
  segment_size: int

  @property
  def scanned(self) -> bool:
    return self.segment_size > 1

  @property
  def residual_kind(self) -> str:
    """Which residual scales apply (config.residual_scales): 'lightning' or 'full' (softmax)."""
    return "lightning" if self.attention == "lightning" else "full"

  def param_path(self, *rest) -> tuple[Path, int | None]:
    """(the model's parameter path of this layer's `rest`, index along the stacked axis or None).

    A scanned layer's parameters live stacked in ('layers', segment, 'blocks', *rest) at index
    `position` of axis 0; an unscanned one in ('layers', segment, *rest).
    """
    if self.scanned:
      return ("layers", self.segment, "blocks") + tuple(rest), self.position
    return ("layers", self.segment) + tuple(rest), None


def _scannable(attention: str) -> bool:
  # Lightning layers stay single: their decay slopes depend on the layer index.
  return attention != "lightning"


def layer_plan(cfg) -> tuple[LayerSpec, ...]:
  """The plan of a model config. With cfg.scan_layers, runs of consecutive layers of the same
  attention type and MLP kind share one scanned segment (Mixtral and M2: all layers; M3: the
  dense-MLP layers, then the runs of full / MSA layers)."""
  types = pattern_for_layers(cfg.attention_pattern, cfg.num_layers)
  kinds = [(t, i >= cfg.num_dense_layers) for i, t in enumerate(types)]
  runs: list[list[int]] = []  # layer indices of each segment
  for i, kind in enumerate(kinds):
    if cfg.scan_layers and runs and kinds[runs[-1][-1]] == kind and _scannable(kind[0]):
      runs[-1].append(i)
    else:
      runs.append([i])
  return tuple(LayerSpec(index=i, attention=kinds[i][0], moe=kinds[i][1], segment=seg,
                         position=j, segment_size=len(run))
               for seg, run in enumerate(runs) for j, i in enumerate(run))


def segments(plan) -> list[tuple[LayerSpec, ...]]:
  """The plan grouped by segment: segments(plan)[s] are the layers model.layers[s] holds."""
  out: list[list[LayerSpec]] = []
  for spec in plan:
    if spec.position == 0:
      out.append([])
    out[-1].append(spec)
  return [tuple(s) for s in out]


def attention_types(plan) -> tuple[str, ...]:
  """The per-layer attention types."""
  return tuple(spec.attention for spec in plan)

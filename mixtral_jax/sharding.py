"""The device mesh and the one place where logical axis names map to mesh axes.

Model code names tensor dimensions by role ("embed", "mlp", "expert", ...) and never names mesh
axes. `RULES` below decides how each role is split over the mesh axes data/fsdp/expert/tensor.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from mixtral_jax.config import MESH_AXES, mesh_shape  # noqa: F401 - mesh_shape: sharding's API too

# logical name -> mesh axis (or tuple of axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # The expert axis also splits the batch: outside the MoE it is one more data axis (attention is
    # not replicated over it), and the expert-parallel MoE (model/moe_ep.py) sends tokens along it.
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "index_dim": None,
    "layers": None,
    None: None,
}


def logical_to_spec(names: Sequence[str | None]) -> P:
  """PartitionSpec for a tensor whose dimensions have these logical names."""
  axes = []
  used = set()
  for n in names:
    if n not in RULES:
      raise ValueError(f"unknown logical axis name {n!r}; add it to sharding.RULES")
    a = RULES[n]
    # A mesh axis can split only one dimension of a tensor.
    flat = (a,) if isinstance(a, str) else (a or ())
    if any(x in used for x in flat):
      a = None
    else:
      used.update(flat)
    axes.append(a)
  return P(*axes)


def batch_shards(mesh) -> int:
  """How many ways `mesh` (concrete or abstract) splits the batch dimension."""
  axes = RULES["batch"]
  return math.prod(mesh.shape.get(a, 1) for a in ((axes,) if isinstance(axes, str) else axes))


def mesh_platform() -> str:
  """The platform the current mesh's devices compile for ('tpu' for a TPU topology compiled ahead
  of time on a CPU host); jax.default_backend() outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  platform = None if mesh.empty else getattr(mesh.abstract_device, "platform", None)
  return platform or jax.default_backend()


def partitioned(init, *names: str | None):
  """Wraps an initializer so the parameter is created sharded by its logical `names`.

  Outside a mesh (unit tests on one device) the initializer is returned unchanged.
  """
  if jax.sharding.get_abstract_mesh().empty:
    return init
  return nnx.with_partitioning(init, tuple(logical_to_spec(names)))


def constrain(x, *names: str | None):
  """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, fit_spec(logical_to_spec(names), x.shape, mesh))


def fit_spec(spec: P, shape, mesh) -> P:
  """`spec` with trailing mesh axes dropped from any dimension they do not divide (a batch of 2
  on data=2 x expert=2 splits over data only)."""
  out = []
  for dim, a in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = list((a,) if isinstance(a, str) else (a or ()))
    while axes and dim % math.prod(mesh.shape[x] for x in axes):
      axes.pop()
    out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, expert, tensor) sized by the config."""
  devices = devices if devices is not None else jax.devices()
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
      tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
      axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)

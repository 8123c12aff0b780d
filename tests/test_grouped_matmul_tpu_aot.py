"""Ahead-of-time compiles of the Pallas TPU grouped matmuls for real TPU targets at M2 expert shapes.

libtpu compiles for a topology description without a TPU attached (see ANCHORS.md), so Mosaic lowering
errors (block shapes, SMEM/VMEM use) are caught on CPU CI. Per device: E=256 experts, D=3072, F=1536,
16K rows in bf16 (MiniMax-M2's experts at 2K tokens x top-8), inside jax.shard_map as Mosaic calls must
be. Forward, input gradient and weight gradient are compiled for each target, and on v5e the compiled
costs are compared with XLA:TPU's native jax.lax.ragged_dot.
"""
import importlib.util
import os

import pytest

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's start-up
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mixtral_jax.kernels import grouped_matmul as gmm_lib  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install 'jax[tpu]'): no TPU AOT compiler")

M, E, D, F = 16384, 256, 3072, 1536


def _mesh(name):
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
  return jax.sharding.Mesh(topo.devices, ("data",))


def _compile(mesh, implementation):
  """value_and_grad of sum(gmm(x, w)) wrt (x, w), x sharded over devices (M rows each)."""
  def per_device(x, w, gs):
    return gmm_lib.grouped_matmul(x, w, gs, implementation=implementation)
  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P(), P()),
                          out_specs=P("data"), check_vma=False)
  loss = lambda x, w, gs: jnp.sum(sharded(x, w, gs).astype(jnp.float32) ** 2)
  n = mesh.devices.size
  args = [jax.ShapeDtypeStruct((n * M, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("data"))),
          jax.ShapeDtypeStruct((E, D, F), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
          jax.ShapeDtypeStruct((E,), jnp.int32, sharding=NamedSharding(mesh, P()))]
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()


def _cost(compiled):
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, list) else ca
  return ca["flops"], compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_pallas_tpu_compiles_forward_and_both_gradients(topology):
  compiled = _compile(_mesh(topology), "pallas_tpu")
  text = compiled.as_text()
  assert text.count("tpu_custom_call") == 3  # gmm, gmm against transposed weights, tgmm
  flops, temp = _cost(compiled)
  # The kernels' cost estimates: 3 grouped matmuls of 2 M D F each (plus the loss's elementwise ops).
  assert 3 * 2 * M * D * F <= flops < 3.1 * 2 * M * D * F
  assert temp < 64 * 2**20


def test_xla_native_ragged_dot_expands_the_weight_gradient():
  # Measured with this libtpu: XLA:TPU runs ragged_dot's forward and input gradient as grouped
  # matmuls, but its weight gradient (a ragged contracting dimension) densely over all E groups:
  # ~86x the flops of the three grouped matmuls at these shapes. That is why the model uses pallas_tpu on TPU
  # (default_implementation('tpu')). If a libtpu update makes this fail, re-measure and revisit.
  mesh = _mesh("v5e:2x2")
  ours_flops, ours_temp = _cost(_compile(mesh, "pallas_tpu"))
  xla_flops, xla_temp = _cost(_compile(mesh, "ragged_dot"))
  print(f"v5e fwd+bwd per device: pallas_tpu {ours_flops:.3g} flops, {ours_temp / 2**20:.1f} MiB temp; "
        f"ragged_dot {xla_flops:.3g} flops, {xla_temp / 2**20:.1f} MiB temp")
  assert xla_flops > 10 * ours_flops
  assert gmm_lib.default_implementation("tpu") == "pallas_tpu"

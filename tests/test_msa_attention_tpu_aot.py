"""Ahead-of-time compiles of the Pallas TPU MSA kernels for real TPU targets (v5p at 32K tokens,
v5e and v6e at 8K: the same kernels, a shorter grid; the 32K compile is ~2x slower on CPU).

As in test_tpu_aot.py: libtpu compiles for a topology description without a chip, the Mosaic calls
sit inside jax.shard_map (one sequence per device). Compiled: the block-max index scores, top-k,
and the routed sparse attention forward and backward (fwd + fused dq/dk/dv kernels).
"""
import importlib.util
import os

import pytest

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mixtral_jax.kernels.msa_attention import msa_attention, msa_select  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install 'jax[tpu]'): no TPU AOT compiler")

TOPOLOGIES = {"v5e:2x2": 8192, "v5p:2x2x1": 32768, "v6e:2x2": 8192}  # topology -> tokens
N, KH, H, I, BLOCK, TOP_K = 6, 2, 128, 128, 128, 16


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_msa_kernels_compile(topology):
  T = TOPOLOGIES[topology]
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  mesh = jax.sharding.Mesh(topo.devices, ("data",))
  b = mesh.devices.size

  def layer(q, k, v, q_idx, k_idx):  # per-device shard: one sequence
    indices = msa_select(q_idx, k_idx, block_size=BLOCK, top_k=TOP_K, local_blocks=1,
                         implementation="pallas_tpu")
    return msa_attention(q, k, v, indices, block_size=BLOCK, implementation="pallas_tpu")

  sharded = jax.shard_map(layer, mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P("data"),
                          check_vma=False)
  loss = lambda *a: jnp.sum(sharded(*a).astype(jnp.float32))
  sh = NamedSharding(mesh, P("data"))
  bf16 = jnp.bfloat16
  args = [jax.ShapeDtypeStruct((b, T, N, H), bf16, sharding=sh),
          jax.ShapeDtypeStruct((b, T, KH, H), bf16, sharding=sh),
          jax.ShapeDtypeStruct((b, T, KH, H), bf16, sharding=sh),
          jax.ShapeDtypeStruct((b, T, KH, I), bf16, sharding=sh),
          jax.ShapeDtypeStruct((b, T, I), bf16, sharding=sh)]
  # One compile (the gradient holds the forward): compiles are minutes on a shared 2-core box.
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  assert bwd.as_text().count("tpu_custom_call") == 3  # index scores, attention fwd, fused bwd

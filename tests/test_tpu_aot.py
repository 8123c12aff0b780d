"""Ahead-of-time compiles of the Pallas TPU block-sparse attention kernels for real TPU targets.

libtpu compiles for a topology description without a TPU attached (see ANCHORS.md), so Mosaic lowering
errors (layouts, block shapes, SMEM use) are caught on CPU CI. The kernels sit inside jax.shard_map,
as Mosaic calls must. Forward and backward (fwd + dq + dk/dv kernels) are compiled for each target.
"""
import importlib.util
import os

import pytest

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's start-up
# Compiling needs no chip: let pytest-xdist workers (or any other local jax process) load libtpu too
# instead of failing on its single-process lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mixtral_jax.kernels import block_sparse_attention, broadcast_mask, causal_block_mask  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install 'jax[tpu]'): no TPU AOT compiler")

TOPOLOGIES = ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"]
# (dtype, causal, q heads, kv heads, head_dim, block_q, block_kv, T, S)
CONFIGS = [(jnp.bfloat16, True, 4, 2, 128, 128, 128, 512, 512),
           (jnp.float32, False, 2, 2, 64, 128, 256, 256, 512)]


@pytest.fixture(scope="module", params=TOPOLOGIES)
def tpu_mesh(request):
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name=request.param, platform="tpu")
  return jax.sharding.Mesh(topo.devices, ("data",))


@pytest.mark.parametrize("config", CONFIGS, ids=["bf16_causal_gqa", "f32_noncausal"])
def test_pallas_tpu_compiles_forward_and_backward(tpu_mesh, config):
  dtype, causal, n, kh, h, bq, bkv, t, s = config
  b = tpu_mesh.devices.size

  def attend(q, k, v):  # per-device shard
    mask = broadcast_mask(causal_block_mask(t, s, block_q=bq, block_kv=bkv), q.shape[0], kh)
    return block_sparse_attention(q, k, v, mask, block_q=bq, block_kv=bkv, causal=causal,
                                  implementation="pallas_tpu")

  sharded = jax.shard_map(attend, mesh=tpu_mesh, in_specs=(P("data"),) * 3, out_specs=P("data"),
                          check_vma=False)
  loss = lambda q, k, v: jnp.sum(sharded(q, k, v).astype(jnp.float32))
  sharding = NamedSharding(tpu_mesh, P("data"))
  args = [jax.ShapeDtypeStruct((b, t, n, h), dtype, sharding=sharding)] + [
      jax.ShapeDtypeStruct((b, s, kh, h), dtype, sharding=sharding)] * 2

  fwd = jax.jit(sharded).lower(*args).compile()
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  assert fwd.as_text().count("tpu_custom_call") == 1
  assert bwd.as_text().count("tpu_custom_call") == 3  # forward, dq, dk/dv


def test_pallas_tpu_long_context_splits_calls_to_fit_smem():
  # 32K tokens in 128-tiles: 256 x 256 tile lists per kv head overflow SMEM (1 MiB on v5e) if all
  # kv heads share one call, so the wrapper issues one call per kv head.
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  mesh = jax.sharding.Mesh(topo.devices, ("data",))
  t = s = 32768
  n, kh, h, blk = 4, 2, 128, 128

  def attend(q, k, v):
    mask = broadcast_mask(causal_block_mask(t, s, block_q=blk, block_kv=blk), q.shape[0], kh)
    return block_sparse_attention(q, k, v, mask, block_q=blk, block_kv=blk,
                                  implementation="pallas_tpu")

  sharded = jax.shard_map(attend, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data"),
                          check_vma=False)
  loss = lambda q, k, v: jnp.sum(sharded(q, k, v).astype(jnp.float32))
  sharding = NamedSharding(mesh, P("data"))
  args = [jax.ShapeDtypeStruct((4, t, n, h), jnp.bfloat16, sharding=sharding)] + [
      jax.ShapeDtypeStruct((4, s, kh, h), jnp.bfloat16, sharding=sharding)] * 2
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  assert bwd.as_text().count("tpu_custom_call") == 3 * kh

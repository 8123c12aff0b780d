"""Ahead-of-time compiles of the Pallas TPU decode kernels for v5e, v5p and v6e with a 128K-token
cache at M2-like dims (bf16, head dim 128, index dim 128, blocks of 128, top-16).

libtpu compiles for a topology description without a chip (see ANCHORS.md and test_tpu_aot.py),
so Mosaic layout / block-shape / SMEM errors surface on CPU. Kernels sit inside jax.shard_map
(one row per device). Per target: dense, MSA and both block-summary decodes in one jit each.
"""
import importlib.util
import os

import pytest

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mixtral_jax.kernels import decode_attention as da  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install 'jax[tpu]'): no TPU AOT compiler")

S, N, K, H, I, BLOCK = 131072, 16, 8, 128, 128, 128  # G = 2 query heads per kv head
BS = da.BlockSizes(block_kv=512, index_blocks=16, summary_blocks=512)


def _decodes():
  kw = dict(implementation="pallas_tpu", block_sizes=BS)
  return {
      "dense": lambda q, k, v, n, iq, ik, sm: da.dense_decode(q, k, v, n, **kw),
      "msa": lambda q, k, v, n, iq, ik, sm: da.msa_decode(
          q, k, v, n, iq, ik, block_size=BLOCK, top_k=16, **kw),
      "summary": lambda q, k, v, n, iq, ik, sm: (
          da.summary_decode(q, k, v, n, sm, kind="mean", block_size=BLOCK, **kw),
          da.summary_decode(q, k, v, n, sm, kind="minmax", block_size=BLOCK, **kw)),
  }


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_pallas_tpu_decode_compiles_at_128k(topology):
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  mesh = jax.sharding.Mesh(topo.devices, ("data",))
  b = mesh.devices.size
  c = S // BLOCK
  sh = NamedSharding(mesh, P("data"))
  sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  summaries = da.BlockSummaries(sds((b, c, K, H), jnp.float32), sds((b, c, K, H)),
                                sds((b, c, K, H)))
  args = (sds((b, N, H)), sds((b, S, K, H)), sds((b, S, K, H)), sds((b,), jnp.int32),
          sds((b, K, I)), sds((b, S, I)), summaries)
  for name, fn in _decodes().items():
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                            check_vma=False)
    text = jax.jit(sharded).lower(*args).compile().as_text()
    want = {"dense": 1, "msa": 2, "summary": 4}[name]  # scoring + attention kernels
    assert text.count("tpu_custom_call") == want, (topology, name)

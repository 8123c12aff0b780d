"""`python -m mixtral_jax.aot` on a tiny config: the full train step compiles for small TPU
topologies on CPU (libtpu), with its memory and collectives read back; the expert-parallel dispatch
sends local tokens x top_k x D per device, halving when the same batch spreads over twice the chips."""
import importlib.util

import pytest

from mixtral_jax import config as config_lib

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed: no TPU AOT compiler")


def tiny(**mesh):
  c = config_lib.default_config()
  c.model.update(vocab_size=256, d_model=128, num_layers=2, num_heads=2, num_kv_heads=1,
                 head_dim=64, rotary_dim=16, scan_layers=True, remat=True, dtype="bfloat16")
  c.model.moe.update(num_experts=4, top_k=2, expert_dim=128, router="sigmoid", use_bias=True)
  c.mesh.update({**dict(data=1, fsdp=1, expert=1, tensor=1), **mesh})
  c.train.update(batch_size=8, seq_len=128)
  return c


def test_aot_report_and_ep_traffic_scales_with_local_tokens():
  from mixtral_jax import aot
  sent = {}
  for topology, mesh in (("v5e:2x2", dict(fsdp=2, expert=2)), ("v5e:2x4", dict(fsdp=4, expert=2))):
    c = tiny(**mesh)
    _, r = aot.compile_train_step(c, topology)
    m = r["memory_per_chip"]
    assert r["chips"] == 4 * mesh["fsdp"] // 2 and m["hbm"] == 16 << 30
    assert 0 < m["arguments"] and 0 < m["temporaries"] and m["total"] < m["hbm"]
    assert r["collectives"]["ragged-all-to-all"]["count"] >= 4  # dispatch + return, fwd + bwd
    assert "all-gather" in r["collectives"] or "all-reduce" in r["collectives"]
    text = aot.format_report(r)
    assert "per-chip memory" in text and "ragged-all-to-all" in text
    local_tokens = c.train.batch_size * c.train.seq_len // r["chips"]
    # The dispatch's operand: every local assignment, local tokens x top_k rows of D (bf16, or
    # f32 where XLA keeps the exchange in float32); the larger ones are the worst-case buffer.
    elems = local_tokens * c.model.moe.top_k * c.model.d_model
    smallest = min(o["bytes"] for o in r["ep_dispatch"] if o["op"] == "ragged-all-to-all")
    assert smallest in (2 * elems, 4 * elems), (elems, r["ep_dispatch"])
    sent[r["chips"]] = smallest
  assert sent[4] == 2 * sent[8]


def test_collectives_parser():
  from mixtral_jax import aot
  hlo = """
  %ag = bf16[64,128]{1,0} all-gather(bf16[16,128]{1,0} %p), dimensions={0}
  %ar-start = (f32[4]{0}, f32[8,2]{1,0}) all-reduce-start(%a, %b), to_apply=%add
  %ar-done = (f32[4]{0}, f32[8,2]{1,0}) all-reduce-done(%ar-start)
  ROOT %r = bf16[100,64]{1,0} ragged-all-to-all(bf16[30,64]{1,0} %x, bf16[100,64]{1,0} %o, s32[4] %a)
  %m = f32[3,3]{1,0} multiply(%x, %y)
  """
  ops = aot.collectives(hlo)
  assert [(o["op"], o["bytes"]) for o in ops] == [
      ("all-gather", 64 * 128 * 2), ("all-reduce", 4 * 4 + 16 * 4), ("ragged-all-to-all", 30 * 64 * 2)]


def test_moe_kernels_follow_the_mesh_platform_not_the_host():
  """Compiled for TPU on a CPU host, the MoE's default grouped matmul is the Mosaic kernel, not the
  CPU's blocked XLA path (which gathers one expert matrix per row block: M2's 146 GiB)."""
  import jax
  from jax.experimental import topologies
  from mixtral_jax import aot, sharding
  topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  c = tiny(fsdp=2, expert=2)
  with jax.set_mesh(sharding.make_mesh(c.mesh, devices=list(topo.devices))):
    assert sharding.mesh_platform() == "tpu"
  assert sharding.mesh_platform() == jax.default_backend()
  compiled, _ = aot.compile_train_step(c, "v5e:2x2")
  # Per layer scan body: 3 gmm forward, 3 x (gmm against transposed weights + tgmm) backward.
  assert compiled.as_text().count("tpu_custom_call") >= 9

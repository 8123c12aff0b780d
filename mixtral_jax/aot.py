"""Compiles an experiment's full training step for a TPU topology on this machine (no TPU needed) and
prints the per-chip memory and the collectives.

  python -m mixtral_jax.aot --config=experiments/minimax_m2.py --topology=v5p:8x8x8 \
      --config.model.scan_layers=True --config.mesh.fsdp=64 --config.mesh.expert=8
  python -m mixtral_jax.aot --config=experiments/quickstart.py --topology=v5e:2x2

Shape-only: the train state comes from `nnx.eval_shape` and the batch from ShapeDtypeStructs, and
the step is `.lower().compile()`d against `jax.experimental.topologies.get_topology_desc`, so no
parameter is ever allocated. Memory comes from `compiled.memory_analysis()`; collectives are read from
the compiled HLO text (each op once as written: the ones inside the layer scan run once per layer).
"""
from __future__ import annotations

import json
import os
import re
import time

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's start-up
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")       # compiling needs no chip

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file: experiments/NAME.py[:arg]; override fields with "
    "--config.a.b=value (e.g. --config.mesh.expert=8 --config.model.scan_layers=True).",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:2x2", "A TPU topology libtpu knows: v5e:2x2, v5p:8x8x8, v6e:16x16, v4:4x4x4 ...")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
_HLO = flags.DEFINE_string("hlo", None, "Also write the compiled HLO text to this path.")
flags.mark_flags_as_required(["config"])

# HBM per chip in bytes (public spec sheets), by the device_kind libtpu reports.
HBM_BYTES = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5e": 16 << 30, "TPU v5": 95 << 30,
             "TPU v5p": 95 << 30, "TPU v6 lite": 32 << 30, "TPU v6e": 32 << 30, "TPU7x": 192 << 30}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) +
                 r")(?:-start)?\((.*)$")


def shape_bytes(text: str) -> int:
  """Bytes of every array shape (dtype[dims]) in `text`, e.g. '(bf16[8,128], f32[4])'."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    if dtype in _DTYPE_BYTES:
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      total += n * _DTYPE_BYTES[dtype]
  return total


def collectives(hlo_text: str) -> list[dict]:
  """One entry per collective op in the HLO text: op, result shape, bytes (for ragged-all-to-all:
  its operand, the rows sent; for the others: the result)."""
  out = []
  defs = dict(re.findall(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(\S+)", hlo_text, re.M))
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    result, op, rest = m.groups()
    if "-done" in line.split("=")[1][:60]:
      continue
    shape = result.strip()
    if op == "ragged-all-to-all":  # operand first: the rows this device can send
      typed = _SHAPE.match(rest.lstrip())      # typed operand, or look its name up
      shape = typed.group(0) if typed else defs.get(re.split(r"[,)\s]", rest.strip())[0], shape)
    out.append({"op": op, "shape": shape, "bytes": shape_bytes(shape)})
  return out


def abstract_train_state(config, mesh):
  """(graphdef, abstract state, shardings, schedule) as trainer.create_train_state, shapes only."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mixtral_jax.trainer import optim, trainer

  tx, schedule = optim.make_optimizer(config.train)

  def create():
    model = trainer.default_model_fn(config.model, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(nnx.eval_shape(create))
  replicated = NamedSharding(mesh, P())

  def on_mesh(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) else replicated
  shardings = jax.tree.map(on_mesh, state)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                       shardings)
  return graphdef, state, shardings, schedule


def compile_train_step(config, topology: str):
  """Compiles the training step of `config` for `topology`. Returns (compiled, report dict)."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import NamedSharding

  from mixtral_jax import config as config_lib
  from mixtral_jax import sharding
  from mixtral_jax.trainer import trainer

  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  devices = list(topo.devices)
  config_lib.validate(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  t0 = time.time()
  graphdef, state, shardings, schedule = abstract_train_state(config, mesh)
  step = trainer.make_train_step(config, graphdef, shardings, schedule,
                                 len(trainer.task_names(config)))
  b, s = config.train.batch_size, config.train.seq_len
  row = NamedSharding(mesh, sharding.logical_to_spec(("batch", None)))
  batch = {k: jax.ShapeDtypeStruct((b, s), dt, sharding=row) for k, dt in (
      ("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32),
      ("lm_mask", jnp.float32))}
  batch["task_id"] = jax.ShapeDtypeStruct(
      (b,), jnp.int32, sharding=NamedSharding(mesh, sharding.logical_to_spec(("batch",))))
  with jax.set_mesh(mesh):
    lowered = step.lower(state, batch)
    t1 = time.time()
    compiled = lowered.compile()
  t2 = time.time()
  mem = compiled.memory_analysis()
  kind = devices[0].device_kind
  hbm = HBM_BYTES.get(kind)
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  ops = collectives(compiled.as_text())
  summary = {}
  for o in ops:
    e = summary.setdefault(o["op"], {"count": 0, "bytes": 0, "largest": 0, "largest_shape": ""})
    e["count"] += 1
    e["bytes"] += o["bytes"]
    if o["bytes"] > e["largest"]:
      e["largest"], e["largest_shape"] = o["bytes"], o["shape"]
  from mixtral_jax.model.transformer import count_params
  from flax import nnx
  params = count_params(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param), config.model)
  report = {
      "topology": topology, "chips": len(devices), "device_kind": kind,
      "mesh": sharding.mesh_shape(config.mesh, len(devices)),
      "batch": b, "seq_len": s, "params_total": params["total"], "params_active": params["active"],
      "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
      "memory_per_chip": {"arguments": mem.argument_size_in_bytes,
                          "outputs": mem.output_size_in_bytes,
                          "aliased": mem.alias_size_in_bytes,
                          "temporaries": mem.temp_size_in_bytes, "total": total, "hbm": hbm},
      "collectives": summary, "ep_dispatch": [o for o in ops if "all-to-all" in o["op"]
                                              and o["bytes"] > 1 << 16],
  }
  return compiled, report


def format_report(r) -> str:
  gib = lambda x: f"{x / 2**30:.2f} GiB"
  m = r["memory_per_chip"]
  lines = [f"{r['topology']} ({r['chips']} x {r['device_kind']}), mesh {r['mesh']}, batch "
           f"{r['batch']} x {r['seq_len']}, params {r['params_total'] / 1e9:.2f}B total / "
           f"{r['params_active'] / 1e9:.2f}B active",
           f"lower {r['lower_s']} s, compile {r['compile_s']} s",
           "per-chip memory: " + ", ".join(f"{k} {gib(m[k])}" for k in (
               "arguments", "outputs", "aliased", "temporaries", "total")) +
           (f" of {gib(m['hbm'])} HBM ({100 * m['total'] / m['hbm']:.0f}%)" if m["hbm"] else "")]
  lines.append("collectives (ops in the HLO text; those in the layer scan run once per layer):")
  for op, e in sorted(r["collectives"].items()):
    lines.append(f"  {op:20s} x{e['count']:4d}  {gib(e['bytes'])} total, largest "
                 f"{gib(e['largest'])} {e['largest_shape'][:80]}")
  for o in r["ep_dispatch"]:
    lines.append(f"  EP exchange {o['op']}: {o['bytes'] / 2**20:.1f} MiB {o['shape'][:90]}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import logging
  logging.getLogger("mixtral_jax").setLevel(logging.INFO)
  try:
    compiled, report = compile_train_step(_CONFIG.value, _TOPOLOGY.value)
  except Exception as e:  # noqa: BLE001 - libtpu refuses steps whose temporaries exceed HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise SystemExit(f"{_TOPOLOGY.value}: does not fit: {str(e).splitlines()[0][:400]}")
  print(format_report(report))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=1)
  if _HLO.value:
    with open(_HLO.value, "w") as f:
      f.write(compiled.as_text())


if __name__ == "__main__":
  app.run(main)

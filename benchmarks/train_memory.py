"""Memory of one training step vs T: `experiments/msa_32k.py` compiled (not run) at several lengths.

  python3 benchmarks/train_memory.py --out $OUT                         # msa on the kernels vs XLA
  python3 benchmarks/train_memory.py --seqs 512,1024 --impls xla --cpu-smoke

For each (attention_impl, T) the trainer's own jitted step (`trainer.make_train_step`, state
donated) is lowered for a batch of one T-token sequence and compiled; XLA's memory analysis gives
the bytes of arguments (parameters + optimizer state + batch) and temporaries. 'peak' = arguments +
temporaries (donated outputs alias the arguments). The issue-10 target: peak grows at most ~2.1x
per doubling of T. xla = the model's dense path ([B, K, T, S] index scores and KL); pallas_triton =
kernels.msa_attention. A length that fails to compile reports its error.
"""
import argparse
import os
import time
import traceback

import jax
import jax.numpy as jnp

from mixtral_jax.experiments import msa_32k
from mixtral_jax import sharding
from mixtral_jax.trainer import trainer

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seqs", default="8192,16384,32768,65536,131072")
parser.add_argument("--impls", default="pallas_triton,xla")
parser.add_argument("--xla-max", type=int, default=16384, help="longest T compiled on 'xla'")
parser.add_argument("--cpu-smoke", action="store_true", help="small blocks for a CPU check")
parser.add_argument("--out", default=os.environ.get("OUT"))


def step_bytes(impl, t, smoke):
  config = msa_32k.get_config()
  config.model.attention_impl = impl
  config.train.seq_len = t
  if smoke:
    config.model.msa.update(block_size=16, top_k=2, index_head_dim=16)
    config.model.dtype = "float32"
  mesh = sharding.make_mesh(config.mesh)
  graphdef, state, shardings, schedule = trainer.create_train_state(config, mesh)
  step = trainer.make_train_step(config, graphdef, shardings, schedule, 1)
  b = config.train.batch_size
  ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
  floats = jax.ShapeDtypeStruct((b, t), jnp.float32)
  batch = {"inputs": ints, "targets": ints, "loss_mask": floats, "lm_mask": floats,
           "task_id": jax.ShapeDtypeStruct((b,), jnp.int32)}
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  return mem.argument_size_in_bytes, mem.temp_size_in_bytes


def main():
  args = parser.parse_args()
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  rows = []
  for impl in [x for x in args.impls.split(",") if x]:
    prev = None
    for t in [int(x) for x in args.seqs.split(",") if x]:
      if impl == "xla" and t > args.xla_max:
        continue
      t0 = time.perf_counter()
      try:
        arg, temp = step_bytes(impl, t, args.cpu_smoke)
        peak = arg + temp
        growth = f"{peak / prev:.2f}x" if prev else ""
        prev = peak
        rows.append(f"| {impl} | {t} | {arg / 2**30:.2f} | {temp / 2**30:.2f} | "
                    f"{peak / 2**30:.2f} | {growth} |")
      except Exception as err:  # noqa: BLE001  (compile OOM or a lowering error: report it)
        traceback.print_exc(limit=3)
        rows.append(f"| {impl} | {t} | - | - | {type(err).__name__}: {str(err)[:60]} | |")
        prev = None
      print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
  text = (f"{jax.devices()[0].device_kind}, jax {jax.__version__}: experiments/msa_32k.py train "
          "step, B=1\n\n| attention_impl | T | args GiB | temp GiB | peak GiB | x previous T |\n"
          "|---|---|---|---|---|---|\n" + "\n".join(rows))
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_memory.md"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()

"""Sliding-window attention on the block-sparse kernel: GPU correctness, SWA vs cuDNN time, and the
peak memory of one training step vs T (linear vs quadratic), in one process.

  python3 benchmarks/memory.py --out $OUT                     # GPU: check, timing, memory table
  python3 benchmarks/memory.py --smoke                        # CPU: interpret mode, tiny sizes

1. check: `block_sparse_attention` with a window (Mosaic GPU, Triton) vs the XLA reference on f32
   copies of bf16 inputs: forward, dq, dk, dv at 2e-2 of max |ref| (exit 1 on a failure).
2. swa: M2 attention dims (B=1, 48 query / 8 kv heads, head dim 128, bf16), SWA window 4K forward
   at T=128K vs cuDNN dense causal (jax.nn.dot_product_attention) in this process; target: ours
   <= 1.3 x (kept tile share x cuDNN time), the share = listed tiles / all T^2/tile^2 tiles.
3. memory: a small model (2 layers of one attention type, d 256, 4/2 heads of 64, dense MLP),
   loss + gradients of every parameter for one batch of T tokens under attention_impl; peak =
   the compiled step's temp + argument + output bytes (memory_analysis, nothing is allocated).
   The growth per doubling of T is printed; target <= ~2.1x for swa, moba, msa from 8K to 128K.
"""
import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax import kernels as bsa
from mixtral_jax.model.transformer import Transformer

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default=os.environ.get("JOB_OUT"))
parser.add_argument("--smoke", action="store_true", help="CPU: interpret mode, tiny sizes")
parser.add_argument("--parts", default="check,swa,memory")
parser.add_argument("--seqs", default="8192,16384,32768,65536,131072", help="memory: T values")
parser.add_argument("--layers", default="full,swa,moba,msa", help="memory: attention types")
parser.add_argument("--impl", default="None", help="attention_impl for the memory rows (None=best)")
parser.add_argument("--swa-seq", type=int, default=131072)
parser.add_argument("--window", type=int, default=4096)
parser.add_argument("--reps", type=int, default=5)
parser.add_argument("--budget", type=float, default=1e9, help="seconds; later parts are skipped")
TOL = 2e-2
START = time.time()


def rel(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def check(impls, t, window, heads, kh, h, block, interpret):
  rows, ok = [], True
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (1, t, heads, h), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, t, kh, h), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, t, kh, h), jnp.bfloat16)
  do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
  mask = jnp.ones((1, kh, t // block, t // block), bool)

  def run(impl, *xs):
    f = lambda q, k, v: bsa.block_sparse_attention(q, k, v, mask, block_q=block, block_kv=block,
                                                   window=window, implementation=impl,
                                                   interpret=interpret)
    out, vjp = jax.vjp(jax.jit(f), *xs[:3])
    return (out,) + vjp(xs[3])
  want = run("xla", *(x.astype(jnp.float32) for x in (q, k, v, do)))
  for impl in impls:
    try:
      got = run(impl, q, k, v, do)
      errs = [rel(g, w) for g, w in zip(got, want)]
      good = all(e <= TOL for e in errs) and all(np.all(np.isfinite(np.asarray(g, np.float32)))
                                                 for g in got)
      rows.append(f"| {impl} | {t} | {window} | " + " | ".join(f"{e:.1e}" for e in errs)
                  + f" | {'ok' if good else 'FAIL'} |")
    except Exception as e:  # noqa: BLE001 - report and go on: one run yields the whole table
      good = False
      rows.append(f"| {impl} | {t} | {window} | error: {type(e).__name__}: {str(e)[:150]} |||| FAIL |")
    ok &= good
  return rows, ok


def timed(fn, args, reps):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def swa_timing(t, window, impls, reps, interpret, heads=48, kh=8, h=128, block=128):
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (1, t, heads, h), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, t, kh, h), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, t, kh, h), jnp.bfloat16)
  n = t // block
  tiles = bsa.sliding_window_block_mask(t, t, block_q=block, block_kv=block, window=window)
  share = float(np.asarray(tiles).sum()) / (n * n)
  causal_share = (n * (n + 1) / 2) / (n * n)
  mask = jnp.ones((1, kh, n, n), bool)
  res = {"T": t, "window": window, "kept_tile_share": share, "causal_tile_share": causal_share}
  if not interpret:
    try:
      res["cudnn_s"] = timed(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn"), (q, k, v), reps)
    except Exception as e:  # noqa: BLE001
      res["cudnn_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  for impl in impls:
    for label, w in ((impl, window), (impl + " causal (no window)", None)):
      try:
        res[label + "_s"] = timed(lambda q, k, v: bsa.block_sparse_attention(
            q, k, v, mask, block_q=block, block_kv=block, window=w, implementation=impl,
            interpret=interpret), (q, k, v), reps)
      except Exception as e:  # noqa: BLE001
        res[label + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  return res


def small_model_cfg(layer, t, impl, smoke):
  m = config_lib.model_defaults()
  m.update(vocab_size=512, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
           rotary_dim=32, mlp_dim=512, num_dense_layers=2, attention_pattern=(layer,),
           attention_impl=impl, dtype="bfloat16", attention_block=128)
  m.window = 64 if smoke else 4096
  m.moba.update(block_size=64 if smoke else 512, top_k=4)
  m.msa.update(block_size=64 if smoke else 128, top_k=4 if smoke else 16, index_head_dim=64)
  config_lib.validate_model(m)
  return m


def step_memory(layer, t, impl, smoke):
  """Bytes (temp, peak) of the compiled loss + gradients step at T tokens. layer 'full@xla' = full
  layers on the XLA path (the quadratic reference row)."""
  layer, _, forced = layer.partition("@")
  cfg = small_model_cfg(layer, t, forced or impl, smoke)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)

  def step(state, tokens):
    def loss_fn(state):
      logits, _, aux = nnx.merge(graphdef, state).forward(tokens)
      ce = -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])
      return ce + sum(aux["losses"].values())
    return jax.value_and_grad(loss_fn)(state)

  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
  compiled = jax.jit(step).lower(state, tokens).compile()
  mem = compiled.memory_analysis()
  temp = mem.temp_size_in_bytes
  peak = temp + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  return temp, peak


def main():
  args = parser.parse_args()
  interpret = args.smoke
  parts = set(args.parts.split(","))
  gpu = jax.default_backend() == "gpu"
  impls = ["pallas_mosaic_gpu", "pallas_triton"] if gpu else ["pallas_triton", "pallas_tpu"]
  lines, ok, record = [f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}"], True, {}
  over = lambda: time.time() - START > args.budget

  if "check" in parts:
    lines += ["", "## window kernels vs XLA reference (bf16 inputs, max err / max |ref|)", "",
              "| impl | T | window | out | dq | dk | dv | |", "|---|---|---|---|---|---|---|---|"]
    cases = [(256, 40, 4, 2, 64, 64)] if args.smoke else [(2048, 300, 8, 2, 128, 128),
                                                          (2048, 1024, 8, 2, 128, 128)]
    for t, w, n, kh, h, blk in cases:
      if over():
        break
      rows, good = check(impls, t, w, n, kh, h, blk, interpret)
      lines += rows
      ok &= good
    print("\n".join(lines), flush=True)

  if "swa" in parts and not over():
    t = 2048 if args.smoke else args.swa_seq
    w = 256 if args.smoke else args.window
    res = swa_timing(t, w, impls[:1] if args.smoke else impls, 1 if args.smoke else args.reps,
                     interpret, heads=4 if args.smoke else 48, kh=2 if args.smoke else 8,
                     h=64 if args.smoke else 128)
    record["swa"] = res
    lines += ["", f"## SWA forward, T={t}, window {w}: kept tile share {res['kept_tile_share']:.4f}", ""]
    cud = res.get("cudnn_s")
    lines += ["| path | ms | target ms (1.3 x share x cuDNN) | met |", "|---|---|---|---|"]
    if cud:
      lines.append(f"| cuDNN dense causal | {cud * 1e3:.2f} | | |")
    for key, val in res.items():
      if key.endswith("_s") and key != "cudnn_s":
        name = key[:-2]
        if cud and "causal" not in name:
          target = 1.3 * res["kept_tile_share"] * cud
          lines.append(f"| {name} | {val * 1e3:.2f} | {target * 1e3:.2f} | "
                       f"{'met' if val <= target else 'missed'} |")
        else:
          lines.append(f"| {name} | {val * 1e3:.2f} | | |")
      elif key.endswith("_error"):
        lines.append(f"| {key[:-6]} | {val} | | |")
    print("\n".join(lines[-8:]), flush=True)

  if "memory" in parts and not over():
    seqs = [256, 512, 1024] if args.smoke else [int(x) for x in args.seqs.split(",")]
    impl = "pallas_triton" if args.smoke else (None if args.impl == "None" else args.impl)
    lines += ["", f"## peak memory of one training step (loss + grads), attention_impl={impl}", "",
              "| layers | " + " | ".join(f"T={t}" for t in seqs) + " | growth per doubling |",
              "|---|" + "---|" * (len(seqs) + 1)]
    mem = {}
    for layer in args.layers.split(","):
      if over():
        break
      cells, peaks = [], []
      for t in seqs:
        if over():
          cells.append("skipped")
          continue
        try:
          temp, peak = step_memory(layer, t, impl, args.smoke)
          peaks.append((t, peak))
          cells.append(f"{peak / 2**20:.0f} MiB")
        except Exception as e:  # noqa: BLE001
          cells.append(f"error {type(e).__name__}")
          print(f"{layer} T={t}: {type(e).__name__}: {str(e)[:300]}", flush=True)
      growth = [(p2 / p1) ** (1 / math.log2(t2 / t1))
                for (t1, p1), (t2, p2) in zip(peaks, peaks[1:])]
      mem[layer] = dict(peaks=peaks, growth=growth)
      lines.append(f"| {layer} | " + " | ".join(cells) + " | "
                   + ", ".join(f"{g:.2f}x" for g in growth) + " |")
      print(lines[-1], flush=True)
    record["memory"] = mem
  print("\n".join(lines))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "swa.md"), "w") as f:
      f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "swa.json"), "w") as f:
      json.dump(record, f, indent=1)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()

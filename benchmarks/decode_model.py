"""End-to-end decode speed of a small model with M2 attention dims: full vs MSA (vs MoBA) layers.

Issue 8's model-level row: a few layers of 48 query / 8 kv heads of 128 (MSA: index dim 128,
top-16 of 128-token blocks), dense SwiGLU MLPs, bf16, random weights, a cache of --context
positions (zeros: the kernels read every selected byte whatever it holds), the new token at the
last position. Per pattern, two timings of the same decode step:

  step    wall ms of `generate.decode_step` called from Python (the nnx.jit'd step: the model's
          graph is flattened on every call), median of --steps calls;
  generate  the same through the decoder `generate` loops over (the model split once, one
          jax.jit call per step);
  device  ms per step of --steps steps inside one jitted `lax.fori_loop` (greedy token fed
          back), the step without host dispatch.

tokens/s = batch / time. The same process times every pattern, on the backend's decode kernels
(`attention_impl=None`; XLA on CPU).

  python3 benchmarks/decode_model.py --context 131072 --out /tmp/decode_model     # GPU
  python3 benchmarks/decode_model.py --smoke                                      # CPU check
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax.model import generate
from mixtral_jax.model.transformer import Transformer

_P = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_P.add_argument("--context", type=int, default=131072, help="cache positions (the new token is the last)")
_P.add_argument("--batch", type=int, default=1)
_P.add_argument("--layers", type=int, default=4)
_P.add_argument("--patterns", default="full,msa,msa@mean,moba",
                help="attention types; msa@mean / msa@minmax: MSA with that decode_selection")
_P.add_argument("--steps", type=int, default=50)
_P.add_argument("--impl", default="None", help="model.attention_impl (None: the backend's best)")
_P.add_argument("--smoke", action="store_true", help="tiny dims and context, CPU")
_P.add_argument("--out", default=os.environ.get("JOB_OUT"))


def model_config(pattern: str, args):
  kind, _, selection = pattern.partition("@")
  c = config_lib.default_config()
  m = c.model
  m.update(vocab_size=32000, d_model=3072, num_heads=48, num_kv_heads=8, head_dim=128,
           rotary_dim=64, qk_norm="per_head", mlp_dim=1536, num_layers=args.layers,
           num_dense_layers=args.layers, attention_pattern=(kind,), dtype="bfloat16",
           param_dtype="bfloat16",
           attention_impl=None if args.impl == "None" else args.impl)
  m.msa.update(block_size=128, top_k=16, index_head_dim=128, local_blocks=1,
               decode_selection=selection or "exact")
  m.moba.update(block_size=128, top_k=16)
  if args.smoke:
    m.update(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, rotary_dim=8,
             mlp_dim=64, dtype="float32", param_dtype="float32")
    m.msa.update(block_size=16, top_k=2, index_head_dim=16)
    m.moba.update(block_size=16, top_k=2)
  config_lib.validate_model(m, seq_len=args.context)
  return c


def time_pattern(pattern: str, args) -> dict:
  c = model_config(pattern, args)
  model = Transformer(c.model, rngs=nnx.Rngs(0))
  b, ctx = args.batch, args.context
  cache = model.init_cache(b, ctx)
  tok = jnp.zeros((b, 1), jnp.int32)
  t0 = time.perf_counter()
  logits, cache = generate.decode_step(model, tok, ctx - 1, cache)
  logits.block_until_ready()
  compile_s = time.perf_counter() - t0
  walls = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    logits, cache = generate.decode_step(model, tok, ctx - 1, cache)
    logits.block_until_ready()
    walls.append(time.perf_counter() - t0)
  step_ms = float(np.median(walls) * 1e3)
  decoder = generate._Decoder(model)  # what generate() loops over: the model split once
  logits, cache = decoder(tok, ctx - 1, cache)
  walls = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    logits, cache = decoder(tok, ctx - 1, cache)
    logits.block_until_ready()
    walls.append(time.perf_counter() - t0)
  gen_ms = float(np.median(walls) * 1e3)

  graphdef, state = nnx.split(model)

  @jax.jit
  def loop(state, cache, tok):
    def body(_, carry):
      cache, tok = carry
      m = nnx.merge(graphdef, state)
      positions = jnp.full((b, 1), ctx - 1, jnp.int32)
      logits, cache, _ = m.forward(tok, positions, cache)
      return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
    cache, tok = jax.lax.fori_loop(0, args.steps, body, (cache, tok))
    return cache, tok

  cache2, tok2 = loop(state, cache, tok)  # compile
  jax.block_until_ready(tok2)
  t0 = time.perf_counter()
  cache2, tok2 = loop(state, cache2, tok2)
  jax.block_until_ready(tok2)
  device_ms = (time.perf_counter() - t0) / args.steps * 1e3
  finite = bool(jnp.all(jnp.isfinite(logits)))
  row = dict(pattern=pattern, layers=args.layers, batch=b, context=ctx, compile_s=compile_s,
             step_ms=step_ms, generate_ms=gen_ms, device_ms=device_ms, tokens_per_s_step=b / step_ms * 1e3,
             tokens_per_s_device=b / device_ms * 1e3, logits_finite=finite)
  print(json.dumps(row), flush=True)
  del cache, cache2
  return row


def markdown(rows, meta) -> str:
  lines = [f"{meta['device']}, jax {meta['jax']}, {meta['date']}: decode of a {rows[0]['layers']}-layer "
           f"model at M2 attention dims (48 q / 8 kv heads of 128, bf16; MSA top-16 of 128-token "
           f"blocks, index dim 128; MoBA top-16 of 128), B={rows[0]['batch']}, cache "
           f"{rows[0]['context']:,} positions, attention_impl={meta['impl']}", "",
           "| pattern | decode_step ms | generate's step ms | tokens/s | device ms/step (fori_loop) | tokens/s | vs full (device) |",
           "|---|---|---|---|---|---|---|"]
  full = next((r["device_ms"] for r in rows if r["pattern"] == "full"), None)
  for r in rows:
    rel = f"{full / r['device_ms']:.2f}x" if full else "-"
    lines.append(f"| {r['pattern']} | {r['step_ms']:.3f} | {r['generate_ms']:.3f} | "
                 f"{r['batch'] / r['generate_ms'] * 1e3:,.0f} | "
                 f"{r['device_ms']:.3f} | {r['tokens_per_s_device']:,.0f} | {rel} |")
  return "\n".join(lines) + "\n"


def main():
  args = _P.parse_args()
  if args.smoke:
    args.context, args.layers, args.steps = min(args.context, 512), min(args.layers, 2), min(args.steps, 5)
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, impl=args.impl,
              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  rows = []
  for pattern in [p for p in args.patterns.split(",") if p]:
    try:
      rows.append(time_pattern(pattern, args))
    except Exception as e:  # one pattern failing must not lose the others' rows
      print(f"{pattern}: {type(e).__name__}: {str(e)[:400]}", flush=True)
  md = markdown(rows, meta) if rows else "no pattern ran\n"
  print(md)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_model.json"), "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "decode_model.md"), "w") as f:
      f.write(md)


if __name__ == "__main__":
  main()

"""Block-sparse attention vs cuDNN dense causal on one GPU: forward and forward+backward TFLOP/s.

  python3 benchmarks/attention.py --long --band          # the RESULTS.md table (S = 8K, 32K, 128K)
  python3 benchmarks/attention.py --seqs 8192 --reps 5   # quicker
  python3 benchmarks/attention.py --kernel-only          # + mosaic_gpu kernels alone, both CTA orders

B=1, H=16 (q and kv heads), D=128, bf16, tiles 128x128, random data. Our kernels run at block
densities 1, 1/2, 1/4, 1/8 of the causal tiles (the diagonal tile of every q tile is always kept, the
rest drawn at random). TFLOP/s counts dense-equivalent FLOPs of the computed tiles (causal tiles count
half on the diagonal, so density 1 is 4*B*H*S*S*D/2; forward+backward counts 3.5x forward).
"ratio" is TFLOP/s over cuDNN's; "t/(d*cuDNN)" is forward time over density x cuDNN's dense causal
time (issue 4's target: <= 1.2), d being the share of causal tiles the mask keeps (printed).
jax's own Mosaic-GPU flash attention (attention_mgpu) runs in fp16 (its kernel stages in f16), on a
pre-scaled q (it has no softmax scale) and forward only (its backward has no causal mode).
Every implementation is first checked against the f32 reference at the first sequence length.
Imports the installed package (`pip install -e .` or a wheel): mixtral_jax.kernels.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.kernels.block_sparse_attention import api, mask_info, masks

B, H, D, BLOCK = 1, 16, 128, 128
DENSITIES = (1.0, 0.5, 0.25, 0.125)


def density_mask(s, density, band=False, seed=0):
  """[B, H, nq, nk] tile mask keeping `density` of the causal tiles, diagonal always kept.

  Random: the other tiles drawn uniformly from the causal ones (same pattern for every head).
  Band: the w tiles ending at the diagonal (a sliding window), w chosen to match the tile count.
  Returns the mask, its tile density (kept / causal tiles) and its FLOPs weight in tiles (kept
  off-diagonal tiles + half the diagonal ones).
  """
  n = s // BLOCK
  causal = np.tril(np.ones((n, n), bool))
  want = int(round(density * n * (n + 1) / 2))
  if band:
    w = next(w for w in range(1, n + 1) if np.minimum(np.arange(1, n + 1), w).sum() >= want)
    keep = causal & ~np.tril(np.ones((n, n), bool), -w)
  else:
    keep = np.eye(n, dtype=bool)
    off = np.argwhere(causal & ~keep)
    rng = np.random.default_rng(seed)
    pick = off[rng.choice(len(off), size=max(want - n, 0), replace=False)]
    keep[pick[:, 0], pick[:, 1]] = True
  tiles = keep.sum() - n / 2
  return (jnp.asarray(np.broadcast_to(keep, (B, H, n, n))), keep.sum() / causal.sum(),
          float(tiles))


def bench(fn, args, reps, batches=5):
  """Median seconds per call: `batches` runs of `reps` back-to-back async calls, after warm-up."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(batches):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def fwd_bwd(f):
  """jit of forward + backward (vjp with a given cotangent); returns the three gradients."""
  def g(q, k, v, mask, do):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, mask), q, k, v)
    return vjp(do)
  return jax.jit(g)


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def implementations(kernel_only):
  """name -> (forward fn(q, k, v, block_mask), its fwd+bwd fn or None (= vjp of forward), fp16?).

  Peers ignore the mask (dense causal); the mgpu_kernel_* entries take a MaskInfo instead.
  """
  impls = {"cudnn": (lambda q, k, v, mask: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"), None, False)}
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
    # Its kernel has no softmax scale: the caller pre-scales q (done outside the timed call).
    impls["jax_mgpu_fa3"] = (lambda q, k, v, mask: attention_mgpu.attention(q, k, v, cfg), None, True)
  except Exception as e:  # noqa: BLE001 - optional peer
    print(f"jax attention_mgpu unavailable: {e}")
  if kernel_only:  # our kernels alone, MaskInfo precomputed (api overhead excluded), both CTA orders
    from kernels.block_sparse_attention import mosaic_gpu
    kw = dict(block_q=BLOCK, block_kv=BLOCK, causal=True, sm_scale=D ** -0.5)
    for tile_major in (True, False):
      def f(q, k, v, info, tile_major=tile_major):
        return mosaic_gpu.mha_forward(q, k, v, info, tile_major=tile_major, **kw)[0]

      def f_fb(q, k, v, info, do, tile_major=tile_major):
        out, lse = mosaic_gpu.mha_forward(q, k, v, info, tile_major=tile_major, **kw)
        return mosaic_gpu.mha_backward(q, k, v, out, lse, do, info, tile_major=tile_major, **kw)
      impls["mgpu_kernel_" + ("tile_major" if tile_major else "head_major")] = (f, f_fb, False)
  for impl in ("pallas_mosaic_gpu", "pallas_triton"):
    try:
      api._backend_module(impl)
    except ImportError as e:
      print(f"{impl} unavailable: {e}")
      continue
    impls[impl] = ((lambda q, k, v, mask, impl=impl: api.block_sparse_attention(
        q, k, v, mask, block_q=BLOCK, block_kv=BLOCK, causal=True, implementation=impl)), None, False)
  return impls


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seqs", default="8192,32768")
  parser.add_argument("--long", action="store_true", help="also S=131072 (mosaic_gpu + cuDNN only)")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--no-bwd", action="store_true")
  parser.add_argument("--band", action="store_true",
                      help="also banded (sliding-window) masks of the same densities, mosaic_gpu only")
  parser.add_argument("--kernel-only", action="store_true",
                      help="also time the mosaic_gpu forward kernel alone (persistent and grid)")
  args = parser.parse_args()
  seqs = [int(x) for x in args.seqs.split(",")] + ([131072] if args.long else [])
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, {dev.device_kind}, B={B} H={H} D={D} bf16, tiles {BLOCK}x{BLOCK}")
  rows = []
  for si, s in enumerate(seqs):
    keys = jax.random.split(jax.random.key(s), 4)
    q, k, v, do = (jax.random.normal(kk, (B, s, H, D), jnp.bfloat16) for kk in keys)
    causal_flops = 4 * B * H * s * s * D / 2
    n = s // BLOCK
    cud_fwd = cud_fb = None
    impls = {name: (jax.jit(f), jax.jit(f_fb) if f_fb else fwd_bwd(f), fp16)
             for name, (f, f_fb, fp16) in implementations(args.kernel_only).items()}
    patterns = [(d, False) for d in DENSITIES]
    patterns += [(d, True) for d in DENSITIES[1:]] if args.band else []
    for density, band in patterns:
      mask, tile_density, tiles = density_mask(s, density, band)
      flops = causal_flops * tiles / (n * n / 2)
      ref = None
      if si == 0 and s <= 16384:  # correctness first: vs the f32 reference on this mask
        ref = api.block_sparse_attention(
            *(x.astype(jnp.float32) for x in (q, k, v)), mask, block_q=BLOCK, block_kv=BLOCK,
            causal=True, implementation="xla")
      for name, (f, f_fb, fp16) in impls.items():
        if density != 1.0 and name in ("cudnn", "jax_mgpu_fa3"):
          continue  # peers: dense causal only
        if band and name != "pallas_mosaic_gpu":
          continue
        if s > 32768 and name not in ("cudnn", "pallas_mosaic_gpu") and "kernel" not in name:
          continue  # 128K: cuDNN and our Mosaic kernel only
        dt = jnp.float16 if fp16 else jnp.bfloat16
        qq, kk_, vv, dd = (x.astype(dt) for x in (q, k, v, do))
        m = mask
        if name == "jax_mgpu_fa3":
          qq = (q.astype(jnp.float32) * D ** -0.5).astype(dt)
        if name.startswith("mgpu_kernel"):
          m = mask_info.make_mask_info(mask & masks.causal_block_mask(s, s, block_q=BLOCK,
                                                                      block_kv=BLOCK))
        err, t_f, t_fb = float("nan"), None, None
        try:
          if ref is not None:
            err = rel_err(f(qq, kk_, vv, m), ref)
            if not err <= 2e-2:
              raise ValueError(f"forward rel err {err:.2e}: not timed")
          reps = max(2, args.reps * 8192 // s)
          t_f = bench(f, (qq, kk_, vv, m), reps)
          if not args.no_bwd and name != "jax_mgpu_fa3":
            t_fb = bench(f_fb, (qq, kk_, vv, m, dd), max(2, reps // 2))
        except Exception as e:  # noqa: BLE001 - report, keep going with the others
          print(f"S={s} {name} d={density}: {type(e).__name__}: {str(e)[:400]}", flush=True)
        if name == "cudnn":
          cud_fwd, cud_fb = t_f, t_fb
        rows.append((s, name + (" (band)" if band else ""), tile_density, err, t_f, flops, t_fb,
                     None))
        if t_f:
          print(f"S={s} {name}{' band' if band else ''} d={density}: err {err:.1e} fwd {t_f * 1e3:.3f} ms"
                + (f", fwd+bwd {t_fb * 1e3:.3f} ms" if t_fb else ""), flush=True)
      del mask, ref
    rows = [r[:7] + ((cud_fwd, cud_fb),) if r[0] == s else r for r in rows]

  print("\n| S | kernel | density | rel err | fwd ms | fwd TFLOP/s | fwd ratio | t/(d*cuDNN) "
        "| fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for s, name, density, err, t_f, flops, t_fb, (c_f, c_fb) in rows:
    if t_f is None or c_f is None:
      print(f"| {s // 1024}K | {name} | {density:.3g} | {err:.1e} | failed |")
      continue
    tf = flops / t_f / 1e12
    ctf = 4 * B * H * s * s * D / 2 / c_f / 1e12
    line = (f"| {s // 1024}K | {name} | {density:.3g} | {err:.1e} | {t_f * 1e3:.3f} | {tf:.0f} | "
            f"{tf / ctf:.2f} | {t_f / (density * c_f):.2f} |")
    if t_fb and c_fb:
      tfb = 3.5 * flops / t_fb / 1e12
      ctfb = 3.5 * 4 * B * H * s * s * D / 2 / c_fb / 1e12
      line += f" {t_fb * 1e3:.3f} | {tfb:.0f} | {tfb / ctfb:.2f} |"
    else:
      line += " - | - | - |"
    print(line)


if __name__ == "__main__":
  main()

"""GPU correctness of the block-sparse attention kernels: forward and gradients vs the f32 reference.

  python3 benchmarks/check_gpu_kernels.py            # on the GPU (device tool); exits 1 on a failure

Checks `pallas_mosaic_gpu` and `pallas_triton` (whichever import) through `block_sparse_attention`
against the `xla` reference run on f32 copies of the same bf16 inputs. Prints ||x - ref|| / ||ref||
for out, dq, dk, dv per case (fresh random inputs and masks each case; NaN fails).
Imports the installed package (`pip install -e .` or a wheel): mixtral_jax.kernels.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.kernels.block_sparse_attention import api, masks

TOL = 2e-2  # bf16 operands: expect 1e-3..1e-2


def _random_mask(rng, b, kh, nq, nk, density, empty_row):
  mask = rng.random((b, kh, nq, nk)) < density
  if empty_row:
    mask[:, :, nq // 2] = False  # a q tile that sees nothing: its output and dq must be 0
  return jnp.asarray(mask)


def _case_inputs(seed, b, t, s, n, kh, h):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, t, n, h), jnp.bfloat16)
  k = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
  v = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
  do = jax.random.normal(kd, (b, t, n, h), jnp.bfloat16)
  return q, k, v, do


def _run(impl, q, k, v, do, mask, causal, block_q, block_kv):
  def f(q, k, v):
    return api.block_sparse_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv,
                                      causal=causal, implementation=impl)
  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(do.astype(out.dtype)))


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def main():
  print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}")
  impls = []
  for impl in ("pallas_mosaic_gpu", "pallas_triton"):
    try:
      api._backend_module(impl)
      impls.append(impl)
    except ImportError as e:
      print(f"skip {impl}: {e}")
  bq = bkv = 128
  # (name, B, T, S, N, K, H, causal, mask density, empty q tile)
  cases = [
      ("causal dense", 1, 2048, 2048, 2, 2, 128, True, 1.0, False),
      ("causal sparse gqa", 1, 2048, 2048, 4, 2, 128, True, 0.5, False),
      ("non-causal sparse, empty row", 2, 1024, 1024, 2, 1, 128, False, 0.4, True),
      ("causal T<S (offset)", 1, 1024, 2048, 2, 2, 128, True, 0.6, False),
      ("causal H=64", 1, 1024, 1024, 2, 2, 64, True, 0.7, True),
  ]
  rng = np.random.default_rng(0)
  rows, failed = [], False
  for ci, (name, b, t, s, n, kh, h, causal, dens, empty) in enumerate(cases):
    q, k, v, do = _case_inputs(ci, b, t, s, n, kh, h)
    mask = _random_mask(rng, b, kh, t // bq, s // bkv, dens, empty)
    if dens == 1.0:
      mask = masks.broadcast_mask(masks.causal_block_mask(t, s, block_q=bq, block_kv=bkv), b, kh)
    f32 = lambda x: x.astype(jnp.float32)
    ref = _run("xla", f32(q), f32(k), f32(v), f32(do), mask, causal, bq, bkv)
    for impl in impls:
      try:
        got = _run(impl, q, k, v, do, mask, causal, bq, bkv)
        errs = [_rel(x, r) for x, r in zip(got, ref)]
      except Exception as e:  # report and keep checking the other kernels
        print(f"{impl} {name}: {type(e).__name__}: {str(e)[:800]}")
        errs = [float("nan")] * 4
      bad = not all(e <= TOL for e in errs)  # NaN compares False
      failed |= bad
      rows.append((impl, name, *errs, "FAIL" if bad else "ok"))
  print("\n| kernel | case | out | dq | dk | dv | |\n|---|---|---|---|---|---|---|")
  for impl, name, *errs, status in rows:
    print(f"| {impl} | {name} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {status} |")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

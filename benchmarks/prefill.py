"""MSA prefill (indexer block scores + top-k + sparse attention) vs cuDNN dense causal, one GPU.

  python3 benchmarks/prefill.py --out $OUT                 # T = 32K, 128K fwd and fwd+bwd; 1M fwd
  python3 benchmarks/prefill.py --seqs 32768 --long-seqs '' --reps 3   # quicker

M2 attention dims: B=1, 48 query / 8 kv heads, head dim 128, index head dim 128 (one index query per
kv head, one shared index key), bf16, top-16 of 128-token blocks, local_blocks 1, random data.
Rows per T: cuDNN dense causal GQA (jax.nn.dot_product_attention); MSA end to end; its two parts
(selection: on Triton one fused kernel, block max + running top-k, also timed unfused = block
scores [B, K, T, C] then lax.top_k; attention on given index lists). fwd+bwd differentiates the
attention in q, k, v with a random cotangent (the selection is discrete; the indexer trains through
the KL loss, timed separately with --kl). "x cuDNN" = cuDNN time / our time. temp GiB = XLA's
temporary buffers of the compiled forward (memory_analysis). Each MSA implementation is first checked
against the XLA reference at --check-seq (bf16: 2e-2 of max |ref|, dk/dv 3e-2); a row that fails to compile or
run reports its error instead of a time, so one run always yields the whole table.
"""
import argparse
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.kernels import msa_attention as msa

B, N, KH, H, I, BLOCK, TOP_K = 1, 48, 8, 128, 128, 128, 16
TOL = 2e-2       # bf16 forward and block scores vs the f32-internal XLA reference
TOL_KV = 3e-2    # dk/dv: bf16 p and ds summed over every query of a block (2.4e-2 seen on CPU at T=256)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seqs", default="32768,131072", help="T for fwd and fwd+bwd")
parser.add_argument("--long-seqs", default="1048576", help="T for forward only (where it fits)")
parser.add_argument("--impls", default="pallas_triton", help="MSA implementations to time")
parser.add_argument("--xla-seqs", default="32768", help="T at which the 'xla' MSA path is also timed")
parser.add_argument("--check-seq", type=int, default=2048)
parser.add_argument("--reps", type=int, default=5)
parser.add_argument("--kl", action="store_true", help="also time the indexer KL loss fwd+bwd")
parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for prefill.md")
parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke run)")
INTERPRET = False
OUT = None


def inputs(t, seed=0):
  @jax.jit
  def make(key):
    ks = jax.random.split(key, 6)
    bf = jnp.bfloat16
    return (jax.random.normal(ks[0], (B, t, N, H), bf), jax.random.normal(ks[1], (B, t, KH, H), bf),
            jax.random.normal(ks[2], (B, t, KH, H), bf), jax.random.normal(ks[3], (B, t, KH, I), bf),
            jax.random.normal(ks[4], (B, t, I), bf), jax.random.normal(ks[5], (B, t, N, H), bf))
  return make(jax.random.key(seed))


def select(impl, fused=True):
  sizes = msa.BlockSizes(fused_select=fused)
  return lambda q_idx, k_idx: msa.msa_select(q_idx, k_idx, block_size=BLOCK, top_k=TOP_K,
                                             local_blocks=1, implementation=impl,
                                             interpret=INTERPRET, block_sizes=sizes)


def block_scores(impl):
  return lambda q_idx, k_idx: msa.msa_block_scores(q_idx, k_idx, block_size=BLOCK,
                                                   implementation=impl, interpret=INTERPRET)


def same_sets(a, b):
  """Share of (row) index lists equal as sets (the fused selection's slot order differs)."""
  a, b = np.sort(np.asarray(a), axis=-1), np.sort(np.asarray(b), axis=-1)
  return float(np.mean(np.all(a == b, axis=-1)))


def attend(impl):
  return lambda q, k, v, idx: msa.msa_attention(q, k, v, idx, block_size=BLOCK, implementation=impl,
                                                       interpret=INTERPRET)


def prefill(impl):
  return lambda q, k, v, q_idx, k_idx: attend(impl)(q, k, v, select(impl)(q_idx, k_idx))


def with_grad(fwd, nargs=3):
  """(args..., do) -> grads of the first nargs args of <fwd(args), do>."""
  def f(*a):
    *args, do = a
    out, vjp = jax.vjp(lambda *d: fwd(*d, *args[nargs:]), *args[:nargs])
    return vjp(do.astype(out.dtype))
  return f


def cudnn(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def bench(fn, args, reps):
  """Median seconds of the jitted fn (compiled first) and its forward temp bytes."""
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), temp


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def check(impl, t):
  """impl vs the 'xla' reference at T=t: block scores, selection, attention fwd and dq/dk/dv."""
  q, k, v, qi, ki, do = inputs(t, seed=1)
  s_ref = jax.jit(lambda a, b: msa.msa_block_scores(a, b, block_size=BLOCK, implementation="xla"))(qi, ki)
  s_got = jax.jit(lambda a, b: msa.msa_block_scores(a, b, block_size=BLOCK, implementation=impl, interpret=INTERPRET))(qi, ki)
  finite = np.isfinite(np.asarray(s_ref))
  assert (finite == np.isfinite(np.asarray(s_got))).all(), "scores: -inf pattern differs"
  errs = {"scores": rel_err(np.where(finite, s_got, 0), np.where(finite, s_ref, 0))}
  idx = jax.jit(select("xla"))(qi, ki)
  same = same_sets(jax.jit(select(impl))(qi, ki), idx)
  same_unfused = same_sets(jax.jit(select(impl, fused=False))(qi, ki), idx)
  ref = jax.jit(with_grad(attend("xla")))(q, k, v, idx, do)
  got = jax.jit(with_grad(attend(impl)))(q, k, v, idx, do)
  y_ref = jax.jit(attend("xla"))(q, k, v, idx)
  y_got = jax.jit(attend(impl))(q, k, v, idx)
  errs.update(y=rel_err(y_got, y_ref), dq=rel_err(got[0], ref[0]), dk=rel_err(got[1], ref[1]),
              dv=rel_err(got[2], ref[2]))
  ok = (all(e <= (TOL_KV if n in ("dk", "dv") else TOL) for n, e in errs.items()) and
        min(same, same_unfused) > 0.99)
  print(f"check {impl} T={t}: " + " ".join(f"{n} {e:.2e}" for n, e in errs.items()) +
        f" same-selection fused {same:.4f} unfused {same_unfused:.4f} -> "
        f"{'OK' if ok else 'FAIL'}", flush=True)
  return ok


def write_table(rows, out):
  """The table so far, also written to out/prefill.md (after every row: a run cut short by its
  time limit keeps the rows it finished)."""
  table = ["| T | path | ms | x cuDNN | temp GiB |", "|---|---|---|---|---|"]
  table += [f"| {t} | {n} | {ms} | {sp} | {mem} |" for t, n, ms, sp, mem in rows]
  text = (f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}: "
          f"B={B}, {N}/{KH} heads, d {H}, index d {I}, bf16, top-{TOP_K} of {BLOCK}-blocks\n\n"
          + "\n".join(table))
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "prefill.md"), "w") as f:
      f.write(text + "\n")
  return text


def run_row(rows, t, name, fn, args, reps, base=None):
  try:
    sec, temp = bench(fn, args, reps)
    speed = f"{base / sec:.2f}x" if base else ""
    rows.append((t, name, f"{sec * 1e3:.1f}", speed, f"{temp / 2**30:.1f}"))
    write_table(rows, OUT)
    print(f"T={t} {name}: {sec * 1e3:.1f} ms {speed}", flush=True)
    return sec
  except Exception as err:  # noqa: BLE001  (OOM or a lowering error: report it, keep going)
    msg = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    rows.append((t, name, "-", msg, "-"))
    write_table(rows, OUT)
    print(f"T={t} {name}: FAILED {msg}", flush=True)
    traceback.print_exc(limit=3)
    return None


def main():
  global INTERPRET, OUT
  args = parser.parse_args()
  INTERPRET, OUT = args.interpret, args.out
  ints = lambda s: [int(x) for x in s.split(",") if x]
  impls = [x for x in args.impls.split(",") if x]
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for impl in impls:
    try:
      check(impl, args.check_seq)
    except Exception:  # noqa: BLE001
      traceback.print_exc(limit=5)
      print(f"check {impl}: FAILED to run", flush=True)
  rows = []
  for t, grads in [(t, True) for t in ints(args.seqs)] + [(t, False) for t in ints(args.long_seqs)]:
    reps = args.reps if t <= 131072 else 1
    try:
      q, k, v, qi, ki, do = inputs(t)
    except Exception as err:  # noqa: BLE001
      rows.append((t, "inputs", "-", f"{type(err).__name__}", "-"))
      continue
    base = run_row(rows, t, "cuDNN dense causal fwd", cudnn, (q, k, v), reps)
    base_bwd = run_row(rows, t, "cuDNN dense causal fwd+bwd", with_grad(cudnn),
                       (q, k, v, do), reps) if grads else None
    for impl in impls + (["xla"] if t in ints(args.xla_seqs) else []):
      # Most wanted first (the GPU run has a hard time limit): end to end fwd, fwd+bwd, parts.
      run_row(rows, t, f"MSA {impl} prefill fwd", prefill(impl), (q, k, v, qi, ki), reps, base)
      if grads:
        run_row(rows, t, f"MSA {impl} prefill fwd+bwd", with_grad(prefill(impl)),
                (q, k, v, qi, ki, do), reps, base_bwd)
      run_row(rows, t, f"MSA {impl} selection only (fused scores + top-k)", select(impl),
              (qi, ki), reps, base)
      idx = jax.jit(select(impl))(qi, ki)
      run_row(rows, t, f"MSA {impl} attention only fwd", attend(impl), (q, k, v, idx), reps, base)
      if impl != "xla":
        run_row(rows, t, f"MSA {impl} selection, unfused (block scores, then lax.top_k)",
                select(impl, fused=False), (qi, ki), reps, base)
        run_row(rows, t, f"MSA {impl} block scores only [B, K, T, C]", block_scores(impl),
                (qi, ki), reps, base)
      if args.kl and grads:
        kl = lambda q_idx, k_idx, q, k, idx: msa.msa_indexer_kl(
            q, k, q_idx, k_idx, idx, block_size=BLOCK, scale=H ** -0.5, index_scale=I ** -0.5)
        run_row(rows, t, "MSA indexer KL fwd+bwd (xla)", jax.grad(kl, argnums=(0, 1)),
                (qi, ki, q, k, idx), reps)
      del idx
    del q, k, v, qi, ki, do
  print(write_table(rows, args.out))

if __name__ == "__main__":
  main()

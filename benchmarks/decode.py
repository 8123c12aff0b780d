"""Per-layer decode attention at MiniMax-M2 dims on one GPU: cuDNN dense vs this project's dense,
MSA and block-summary decode kernels (`mixtral_jax.kernels.decode_attention`).

  python3 benchmarks/decode.py --out /tmp/decode          # the RESULTS.md table
  python3 benchmarks/decode.py --seqs 131072 --batches 1 --tune   # + tile sweeps at one size

Dims: 48 q heads, 8 kv heads, head dim 128, index dim 128, bf16, block 128, top-16 blocks (MSA
and block-summary), cache full (lengths = T for every row). One new token per row (q_len 1).
Each figure is the median over 5 timings of a jit'd lax.fori_loop of R decode calls (R sized to
~50 ms), each call's output fed back as the next query (so nothing is hoisted out of the loop;
MSA's index queries are the first 8 output heads). "bytes" counts what an implementation must
read: K+V of every cached token (dense); index keys + the selected blocks' K+V (MSA); block
summaries + selected K+V (block summary: f32 means, or bf16 min+max). "floor" = bytes / the
device-to-device copy bandwidth measured here ((read + write) bytes / time of x -> x + 1 over
4 GiB). First, every kernel is checked against its XLA reference at B=2, T=8K with per-row
lengths (one not a multiple of 128).
"""
import argparse
import dataclasses
import datetime
import os
import statistics
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.kernels import decode_attention as da

N, K, H, I, BLOCK, TOP_K = 48, 8, 128, 128, 128, 16
IMPL = ["pallas_triton"]  # --smoke: "xla", to check this script on a CPU
DT = jnp.bfloat16
# Calls per loop iteration: an XLA:GPU while loop costs ~14 us per iteration on the H200 (the
# empty step of --parts), charged to every call at --unroll 1 (the 2026-12-01 tables).
UNROLL = [8]


def timeit(step, carry, *args, target_s=0.05, batches=5, reps=None):
  """Median seconds per call of step(carry, *args) -> carry, looped inside one jit (reps calls
  per loop: given, or sized to ~target_s from a 2-call loop)."""
  def loop(reps):
    return jax.jit(lambda c, *a: lax.fori_loop(0, reps, lambda _, c: step(c, *a), c,
                                               unroll=UNROLL[0]))

  if reps is None:
    one = loop(2)
    jax.block_until_ready(one(carry, *args))
    t0 = time.perf_counter()
    jax.block_until_ready(one(carry, *args))
    reps = int(min(2000, max(4, target_s / max((time.perf_counter() - t0) / 2, 1e-6))))
  f = loop(reps)
  jax.block_until_ready(f(carry, *args))
  times = []
  for _ in range(batches):
    t0 = time.perf_counter()
    jax.block_until_ready(f(carry, *args))
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def copy_bandwidth(n=1 << 31):
  x = jax.random.normal(jax.random.key(0), (n,), DT)  # 4 GiB
  t = timeit(lambda x: x + 1, x, reps=2 if IMPL[0] == "xla" else 40)
  del x
  return 2 * n * 2 / t


def make_inputs(b, t, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (b, N, H), DT)
  k = jax.random.normal(ks[1], (b, t, K, H), DT)
  v = jax.random.normal(ks[2], (b, t, K, H), DT)
  ik = jax.random.normal(ks[3], (b, t, I), DT)
  lengths = jnp.full((b,), t, jnp.int32)
  return q, k, v, ik, lengths


def summaries_of(k, lengths):
  # Row by row: the whole-batch [B, C, L, K, H] float32 view would not fit at 1M x 8.
  parts = [da.block_summaries(k[i:i + 1], lengths[i:i + 1], block_size=BLOCK)
           for i in range(k.shape[0])]
  return da.BlockSummaries(*(jnp.concatenate(xs) for xs in zip(*parts)))


def iq_of(y_BNH):
  return y_BNH.reshape(y_BNH.shape[0], K, N // K, H)[:, :, 0, :I]


def cudnn_step(with_lengths):
  def step(q, k, v, lengths):
    y = jax.nn.dot_product_attention(
        q[:, None], k, v, implementation="cudnn",
        key_value_seq_lengths=lengths if with_lengths else None)
    return y[:, 0]
  return step


def steps(dense_bs=None, bs=None):
  kw = dict(implementation=IMPL[0], block_sizes=bs)
  return {
      "dense (ours)": lambda q, k, v, ik, L, sm: da.dense_decode(
          q, k, v, L, implementation=IMPL[0], block_sizes=dense_bs),
      "MSA top-16": lambda q, k, v, ik, L, sm: da.msa_decode(
          q, k, v, L, iq_of(q), ik, block_size=BLOCK, top_k=TOP_K, **kw),
      "summary mean (MoBA)": lambda q, k, v, ik, L, sm: da.summary_decode(
          q, k, v, L, sm, kind="mean", block_size=BLOCK, top_k=TOP_K, **kw),
      "summary min/max (Quest)": lambda q, k, v, ik, L, sm: da.summary_decode(
          q, k, v, L, sm, kind="minmax", block_size=BLOCK, top_k=TOP_K, **kw),
  }


def bytes_read(name, b, t):
  kv_token = 2 * K * H * 2
  c = t // BLOCK
  selected = b * K * min(TOP_K, c) * BLOCK * 2 * H * 2
  if name.startswith(("cuDNN", "dense")):
    return b * t * kv_token
  if name.startswith("MSA"):
    return b * t * I * 2 + selected
  if "mean" in name:
    return b * c * K * H * 4 + selected
  return 2 * b * c * K * H * 2 + selected


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def check_correctness(lines):
  b, t = 2, 8192
  q, k, v, ik, _ = make_inputs(b, t, seed=1)
  lengths = jnp.array([5000, 8192], jnp.int32)
  sm = da.block_summaries(k, lengths, block_size=BLOCK)
  lines.append(f"Correctness at B={b}, T={t}, lengths {list(map(int, lengths))} "
               "(max |kernel - XLA reference| / max(1, max |reference|); selection agreement):")
  ref_steps = steps()
  for name, fn in ref_steps.items():
    try:
      got = jax.jit(fn)(q, k, v, ik, lengths, sm)
    except Exception as e:  # noqa: BLE001 - report and check the others
      lines.append(f"- {name}: fails: {str(e)[:300]}")
      continue
    want = {"dense (ours)": lambda: da.dense_decode(q, k, v, lengths, implementation="xla"),
            "MSA top-16": lambda: da.msa_decode(q, k, v, lengths, iq_of(q), ik, block_size=BLOCK,
                                                top_k=TOP_K, implementation="xla"),
            "summary mean (MoBA)": lambda: da.summary_decode(
                q, k, v, lengths, sm, kind="mean", block_size=BLOCK, top_k=TOP_K,
                implementation="xla"),
            "summary min/max (Quest)": lambda: da.summary_decode(
                q, k, v, lengths, sm, kind="minmax", block_size=BLOCK, top_k=TOP_K,
                implementation="xla")}[name]()
    extra = ""
    if name == "MSA top-16":
      _, ki = da.msa_decode(q, k, v, lengths, iq_of(q), ik, block_size=BLOCK, top_k=TOP_K,
                            implementation=IMPL[0], return_indices=True)
      _, ri = da.msa_decode(q, k, v, lengths, iq_of(q), ik, block_size=BLOCK, top_k=TOP_K,
                            implementation="xla", return_indices=True)
      extra = f", same blocks: {bool(np.all(np.sort(ki) == np.sort(ri)))}"
    lines.append(f"- {name}: {rel_err(got, want):.2e}{extra}")
  for with_len in (True, False):
    try:
      got = jax.jit(cudnn_step(with_len))(q, k, v, lengths if with_len else jnp.full((b,), t))
      want = da.dense_decode(q, k, v, lengths if with_len else jnp.full((b,), t, jnp.int32),
                             implementation="xla")
      lines.append(f"- cuDNN (key_value_seq_lengths={'lengths' if with_len else 'None'}): "
                   f"{rel_err(got, want):.2e}")
    except Exception as e:  # noqa: BLE001 - report what cuDNN rejects
      lines.append(f"- cuDNN (key_value_seq_lengths={with_len}): fails: {str(e)[:200]}")
  return lines


def table(seqs, batches, bw, lines, dense_bs=None, bs=None, xla_rows=False, out=None):
  lines += ["", "| T | B | implementation | time (us) | bytes read (MB) | floor (us) | "
            "time / floor | speed-up vs cuDNN |", "|---|---|---|---|---|---|---|---|"]
  for t in seqs:
    for b in batches:
      need = b * t * (2 * K * H + I) * 2
      if need > 100e9:
        lines.append(f"| {t} | {b} | skipped: {need / 1e9:.0f} GB of cache | | | | | |")
        continue
      q, k, v, ik, lengths = make_inputs(b, t)
      sm = summaries_of(k, lengths)
      results = {}
      try:
        results["cuDNN dense"] = timeit(cudnn_step(True), q, k, v, lengths, reps=reps_for(t))
      except Exception as e:  # noqa: BLE001
        lines.append(f"| {t} | {b} | cuDNN failed: {str(e)[:120]} | | | | | |")
      for name, fn in steps(dense_bs, bs).items():
        try:
          results[name] = timeit(lambda q, k, v, ik, L, sm, fn=fn: fn(q, k, v, ik, L, sm),
                                 q, k, v, ik, lengths, sm, reps=reps_for(t))
        except Exception as e:  # noqa: BLE001 - report and go on to the next implementation
          lines.append(f"| {t} | {b} | {name} failed: {str(e)[:200]} | | | | | |")
      if b == 1 and xla_rows:  # the XLA reference, for scale
        for name, fn in (("dense (XLA reference)", lambda q, k, v, L: da.dense_decode(
            q, k, v, L, implementation="xla")), ("MSA (XLA reference)", lambda q, k, v, L, ik: da.msa_decode(
                q, k, v, L, iq_of(q), ik, block_size=BLOCK, top_k=TOP_K, implementation="xla"))):
          try:
            args_ = (k, v, lengths) + ((ik,) if name.startswith("MSA") else ())
            results[name] = timeit(fn, q, *args_, reps=reps_for(t))
          except Exception as e:  # noqa: BLE001
            lines.append(f"| {t} | {b} | {name} failed: {str(e)[:200]} | | | | | |")
      base = results.get("cuDNN dense")
      for name, sec in results.items():
        nbytes = bytes_read(name, b, t)
        floor = nbytes / bw
        ratio = f"{base / sec:.2f}x" if base else "-"
        lines.append(f"| {t} | {b} | {name} | {sec * 1e6:.1f} | {nbytes / 1e6:.1f} | "
                     f"{floor * 1e6:.1f} | {sec / floor:.2f} | {ratio} |")
      print("\n".join(lines[-len(results):]), flush=True)
      write(lines, out)
      del q, k, v, ik, sm
  return lines


def parts(t, lines, bs=None):
  """Where MSA / summary decode time goes at B=1, T=t: each launch of the call timed alone (its
  own jit loop, fed back into the query), beside the whole call and an empty step (the loop's
  own cost per iteration, included in every figure)."""
  from mixtral_jax.kernels.decode_attention import api
  q, k, v, ik, lengths = make_inputs(1, t)
  sm = summaries_of(k, lengths)
  bs = bs or da.BlockSizes()
  kw = dict(implementation=IMPL[0], block_sizes=bs)
  scores = da.msa_block_scores(iq_of(q), ik, lengths, block_size=BLOCK, local_blocks=1, **kw)
  blocks, _ = api.select_forced(scores, top_k=TOP_K)
  feed = lambda x, q: q + (x.reshape(-1)[0] * 0).astype(q.dtype)  # a data dependence on x
  bump = lambda sc, q: sc + q[0, 0, 0].astype(jnp.float32) * 0    # scores that depend on q
  partials = lambda q, kv, L: api._attend(
      q, kv[0], kv[1], L, kv[2], block=BLOCK, sm_scale=H ** -0.5, bs=bs, impl=IMPL[0],
      interpret=False, parts_only=True)
  parts0 = partials(q, (k, v, blocks), lengths) if IMPL[0] == "pallas_triton" else None
  from mixtral_jax.kernels.decode_attention import pallas_triton
  # Arrays go in as arguments (a closure would embed GBs of cache as constants in the jit).
  pieces = [
      ("empty step (q + 0)", lambda q, _, L: feed(q, q), lengths),
      ("MSA: index block scores", lambda q, ik, L: feed(da.msa_block_scores(
          iq_of(q), ik, L, block_size=BLOCK, local_blocks=1, **kw), q), ik),
      ("MSA: top-16 (lax.top_k)", lambda q, sc, L: feed(api.select_forced(
          bump(sc, q), top_k=TOP_K)[0], q), scores),
      ("MSA: top-16, chunks of 512", lambda q, sc, L: feed(api.select_forced(
          bump(sc, q), top_k=TOP_K, chunk=512, lengths_B=L, block_size=BLOCK)[0], q), scores),
      ("cuDNN dense", lambda q, kv, L: cudnn_step(True)(q, kv[0], kv[1], L), (k, v)),
      ("sparse attention partials (16 blocks)", lambda q, kv, L: feed(partials(q, kv, L)[0], q),
       (k, v, blocks) if parts0 is not None else None),
      ("split combine", lambda q, pr, L: feed(pallas_triton.combine(
          pr[0] + q[0, 0, 0].astype(jnp.float32) * 0, pr[1], pr[2]), q), parts0),
      ("sparse attention (partials + combine)", lambda q, kv, L: da.sparse_decode(
          q, kv[0], kv[1], L, kv[2], block_size=BLOCK, **kw), (k, v, blocks)),
      ("MSA decode, whole call", lambda q, ik_kv, L: da.msa_decode(
          q, ik_kv[1], ik_kv[2], L, iq_of(q), ik_kv[0], block_size=BLOCK, top_k=TOP_K, **kw),
       (ik, k, v)),
      ("summary mean: scores", lambda q, sm, L: feed(da.summary_block_scores(
          q, sm, L, kind="mean", block_size=BLOCK, force_own=True, **kw), q), sm),
      ("summary mean decode, whole call", lambda q, a, L: da.summary_decode(
          q, a[0], a[1], L, a[2], kind="mean", block_size=BLOCK, top_k=TOP_K, **kw), (k, v, sm)),
      ("summary min/max: scores", lambda q, sm, L: feed(da.summary_block_scores(
          q, sm, L, kind="minmax", block_size=BLOCK, force_own=True, **kw), q), sm),
  ]
  lines += ["", f"Parts at T={t}, B=1 ({short(bs)}; us per call, each in its own loop):"]
  for name, fn, operand in pieces:
    if operand is None:
      continue
    try:
      sec = timeit(fn, q, operand, lengths, reps=reps_for(t))
      lines.append(f"- {name}: {sec * 1e6:.1f}")
    except Exception as e:  # noqa: BLE001 - report and time the rest
      lines.append(f"- {name}: fails {str(e)[:200]}")
    print(lines[-1], flush=True)
  del q, k, v, ik, sm
  return lines


def reps_for(t):
  """Calls per timing loop: ~20-60 ms of work at M2 dims, without a probe compile."""
  if IMPL[0] == "xla":  # --smoke on a CPU: check the logic, not the speed
    return 2
  return int(min(400, max(24, 5e7 / t))) // UNROLL[0] * UNROLL[0]


def short(bs):
  """The BlockSizes fields that differ from the defaults."""
  base = da.BlockSizes()
  diff = [f"{f.name}={getattr(bs, f.name)}" for f in dataclasses.fields(bs)
          if getattr(bs, f.name) != getattr(base, f.name)]
  return ", ".join(diff) or "defaults"


def sweep(label, make, candidates, lines, args, reps=20):
  """Times make(candidate) -> step(q, *args) -> q for each candidate; returns the fastest."""
  best, best_t = None, float("inf")
  for cand in candidates:
    try:
      sec = timeit(make(cand), *args, reps=reps)
    except Exception as e:  # noqa: BLE001 - a tile that does not compile is just skipped
      lines.append(f"- {label} ({short(cand)}): fails {str(e)[:100]}")
      continue
    lines.append(f"- {label} ({short(cand)}): {sec * 1e6:.1f} us")
    if sec < best_t:
      best, best_t = cand, sec
  print("\n".join(lines[-len(candidates):]), flush=True)
  return best


def tune(t, lines, dense=False, out=None):
  """Tile sweeps at T=t, B=1 (end to end per decode call); returns (dense, sparse) BlockSizes.
  The scoring kernels' tiles first (they read most of MSA's / summary decode's bytes), then the
  sparse attention's; the dense sweep only with dense=True."""
  q, k, v, ik, lengths = make_inputs(1, t)
  sm = summaries_of(k, lengths)
  args = (q, k, v, ik, lengths, sm)  # as arguments: a closure would embed them as constants
  lines += ["", f"Tile sweep at T={t}, B=1 ({reps_for(t)} calls per timing, median of 5):"]
  rep = dataclasses.replace
  base = da.BlockSizes()
  best_dense = None
  if dense:
    dense_fn = lambda bs: lambda q, k, v, ik, L, sm: da.dense_decode(
        q, k, v, L, implementation=IMPL[0], block_sizes=bs)
    cands = [rep(base, block_kv=b_, num_warps=w, num_stages=st_) for b_, w, st_ in
             ((64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3), (256, 8, 2))]
    best = sweep("dense", dense_fn, cands, lines, args, reps_for(t))
    best_dense = sweep("dense", dense_fn, [rep(best, target_programs=n) for n in (264, 1056, 2112)]
                       + [best], lines, args, reps_for(t))
  msa = lambda bs: lambda q, k, v, ik, L, sm: da.msa_decode(
      q, k, v, L, iq_of(q), ik, block_size=BLOCK, top_k=TOP_K, implementation=IMPL[0],
      block_sizes=bs)
  best = sweep("msa", msa, [rep(base, index_blocks=nb) for nb in (1, 2, 4, 8)], lines, args,
               reps_for(t))
  best = sweep("msa", msa, [best, rep(best, score_num_warps=8), rep(best, score_num_stages=3)],
               lines, args, reps_for(t))
  best = sweep("msa", msa, [best, rep(best, blocks_per_program=2)], lines, args, reps_for(t))
  best = sweep("msa", msa, [best] + [rep(best, select_chunk=n) for n in (256, 1024, None)
                                     if n != best.select_chunk], lines, args, reps_for(t))
  write(lines, out)
  summ = lambda bs: lambda q, k, v, ik, L, sm: da.summary_decode(
      q, k, v, L, sm, kind="mean", block_size=BLOCK, top_k=TOP_K, implementation=IMPL[0],
      block_sizes=bs)
  best_sparse = sweep("summary mean", summ, [rep(best, summary_blocks=n) for n in (16, 32, 64, 128)],
                      lines, args, reps_for(t))
  lines += [f"Chosen: dense ({short(best_dense) if best_dense else 'not swept'}); "
            f"MSA / summary ({short(best_sparse)})"]
  write(lines, out)
  del q, k, v, ik, sm
  return best_dense, best_sparse


def write(lines, out):
  """decode.md as it stands (a run cut short by its time limit keeps what it measured)."""
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "decode.md"), "w") as f:
      f.write("\n".join(lines) + "\n")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  p.add_argument("--seqs", default="32768,131072,1048576")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--tune", action="store_true",
                 help="sweep the sparse kernels' tiles at the largest T, B=1, and run the table "
                 "with the fastest")
  p.add_argument("--tune-dense", action="store_true", help="with --tune: sweep dense tiles too")
  p.add_argument("--parts", action="store_true",
                 help="first time each launch of MSA / summary decode at the largest T, B=1")
  p.add_argument("--xla", action="store_true", help="add the XLA reference rows at B=1")
  p.add_argument("--smoke", action="store_true", help="XLA in place of the kernels (CPU check)")
  p.add_argument("--unroll", type=int, default=8,
                 help="decode calls per loop iteration (amortizes the loop's own cost)")
  args = p.parse_args()
  UNROLL[0] = 1 if args.smoke else args.unroll
  if args.smoke:
    IMPL[0] = "xla"
  seqs = [int(s) for s in args.seqs.split(",")]
  batches = [int(s) for s in args.batches.split(",")]
  dev = jax.devices()[0]
  lines = [f"## Decode attention (`benchmarks/decode.py`): {dev.device_kind}, jax {jax.__version__}, "
           f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
           f"{UNROLL[0]} calls per loop iteration", ""]
  lines = check_correctness(lines)
  print("\n".join(lines), flush=True)
  write(lines, args.out)
  bw = copy_bandwidth(1 << 24 if args.smoke else 1 << 31)
  lines += ["", f"Copy bandwidth (read + write): {bw / 1e12:.2f} TB/s."]
  if args.parts:
    lines = parts(max(seqs), lines)
    write(lines, args.out)
  dense_bs = bs = None
  if args.tune:
    dense_bs, bs = tune(max(seqs), lines, dense=args.tune_dense, out=args.out)
  lines = table(seqs, batches, bw, lines, dense_bs, bs, xla_rows=args.xla, out=args.out)
  text = "\n".join(lines) + "\n"
  print(text, flush=True)
  write(lines, args.out)


if __name__ == "__main__":
  main()

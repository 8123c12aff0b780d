"""Expert and data parallelism on the N GPUs of one host: collectives, a training step, correctness.

  NCCL_NVLS_ENABLE=0 python benchmarks/multi_gpu.py --out /tmp/mg            # all local GPUs
  NCCL_NVLS_ENABLE=0 python benchmarks/multi_gpu.py --out /tmp/mg --n 4      # the first 4
  python benchmarks/multi_gpu.py --out /tmp/mg --smoke                        # 8 fake CPU devices

(NCCL_NVLS_ENABLE=0: NVLink multicast (NVLS) stays off; the script sets it too when unset.)
Parts, in this order (`--parts`), each written to $OUT as soon as it is done:
  check        the expert-parallel step's loss and parameter gradients (mesh expert=N) against the
               same model and batch on one device: bf16 on GPU, f32 on CPU (--smoke). At N=1 the
               expert-parallel path is forced on a 1-device mesh (ragged_all_to_all with one peer).
  collectives  all_to_all, ragged_all_to_all and all-reduce (psum) of one MoE dispatch buffer per GPU:
               tokens x top_k 8 x d_model 3072 bf16, tokens per GPU in --tokens. The ragged one sends
               a random split (each peer +-25% of the mean) like a router would. Bus bandwidth as in
               nccl-tests: algbw = bytes per GPU / time; busbw = algbw (n-1)/n for the all-to-alls,
               algbw 2(n-1)/n for all-reduce. Each exchange is checked against a numpy reference first.
  step         the trainer's train step (forward, backward, AdamW, router bias update) of an
               M2-shaped model (d_model 3072, 48 q / 8 kv heads of 128, QK-norm, sigmoid top-8 of
               --experts experts of width 1536, --layers layers, vocab 32768: about 1B active
               parameters at 6 layers) with the same per-GPU batch on: 1 GPU (the weak-scaling
               baseline), mesh expert=N and mesh data=N (N > 1). Step time, tokens/s (per GPU),
               MFU = tokens/s x 6 x active matmul params / peak (the trainer's count; attention's
               T^2 term in the mfu_attn column), and the share of the step in the MoE exchange:
               1 - t(exchange replaced by a local copy of the same rows) / t (timing, not a
               profile; the gradient all-reduce is not removed, so this is the exchange's share only).
Targets: ragged dispatch busbw >= 50% of all-reduce busbw at 8K tokens per GPU; tokens/s per GPU with
expert=N >= 80% of one GPU's. Prints markdown tables and writes $OUT/multi_gpu.{md,json}.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

if "--smoke" in sys.argv:  # before jax is imported: 8 fake CPU devices
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mixtral_jax import config as config_lib  # noqa: E402
from mixtral_jax import sharding  # noqa: E402
from mixtral_jax.model import moe as moe_lib  # noqa: E402
from mixtral_jax.model import moe_ep  # noqa: E402
from mixtral_jax.model.transformer import count_params  # noqa: E402
from mixtral_jax.trainer import metrics as metrics_lib  # noqa: E402
from mixtral_jax.trainer import trainer as trainer_lib  # noqa: E402

TOP_K = 8


def bench(f, *args, reps=5, rounds=3):
  """Median seconds per call of jitted f(*args) (calls queued back to back, then synced)."""
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / reps)
  return statistics.median(times)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---- model and batch -----------------------------------------------------------------------------

def model_config(args, dtype):
  """The M2-shaped model (or its --smoke miniature), validated."""
  m = config_lib.model_defaults()
  if args.smoke:
    m.update(vocab_size=128, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=8)
    m.moe.update(expert_dim=16)
  else:
    m.update(vocab_size=32768, d_model=3072, num_heads=48, num_kv_heads=8, head_dim=128,
             rotary_dim=64, rope_theta=5e6)
    m.moe.update(expert_dim=1536)
  m.update(num_layers=args.layers, qk_norm="full", attention_pattern=("full",), dtype=dtype,
           param_dtype="float32", remat=not args.smoke, scan_layers=not args.smoke,
           attention_impl="xla" if args.smoke else args.attention_impl)
  m.moe.update(num_experts=args.experts, top_k=min(TOP_K, args.experts), router="sigmoid",
               use_bias=True, normalize_topk=True, all_to_all=args.all_to_all)
  config_lib.validate_model(m)
  return m


def train_config(args, model, mesh_axes, batch):
  c = config_lib.default_config()
  c.model = model
  c.mesh.update({**dict(data=1, fsdp=1, expert=1, tensor=1), **mesh_axes})
  c.train.update(batch_size=batch, seq_len=args.seq, warmup_steps=1, learning_rate=1e-4)
  return c


def make_batch(batch, seq, vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              loss_mask=np.ones((batch, seq), np.int32), task_id=np.zeros((batch,), np.int32))


def mesh_of(axes, devices):
  return sharding.make_mesh(dict(dict(data=1, fsdp=1, expert=1, tensor=1), **axes), devices=devices)


@contextlib.contextmanager
def expert_parallel_on_one_device():
  """MoE blocks take the expert-parallel path on an expert=1 mesh too (one peer), so a single GPU
  runs the shard_map + ragged_all_to_all code the N-GPU step runs."""
  old = moe_lib.MoE._use_expert_parallel

  def use(self, num_tokens):
    mesh = jax.sharding.get_abstract_mesh()
    return (self.expert_parallel and not mesh.empty
            and num_tokens % sharding.batch_shards(mesh) == 0)
  moe_lib.MoE._use_expert_parallel = use
  try:
    yield
  finally:
    moe_lib.MoE._use_expert_parallel = old


@contextlib.contextmanager
def exchange_removed():
  """moe_ep's two ragged exchanges replaced by a local copy of the same rows (wrong numbers, the
  same matmul work): the step time without the dispatch/return all-to-alls."""
  old = moe_ep._exchange

  def local(impl, chunk, axis_name):
    def copy(operand, output, *offsets_and_sizes):
      r = min(operand.shape[0], output.shape[0])
      return jax.lax.dynamic_update_slice(output, operand[:r].astype(output.dtype), (0, 0))
    return copy
  moe_ep._exchange = local
  try:
    yield
  finally:
    moe_ep._exchange = old


# ---- part 3: correctness -------------------------------------------------------------------------

def loss_and_grads(model_cfg, mesh, params_from, batch):
  """(loss, {param path: grad}, pure params, all_to_all count in the step's jaxpr) of the trainer's loss on `mesh`; the parameters are
  copied from `params_from` (a pure dict of another run) when given."""
  from mixtral_jax.model.transformer import Transformer  # late: as the trainer's default_model_fn

  with jax.set_mesh(mesh):
    model = nnx.jit(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))()
    if params_from is not None:
      params = nnx.state(model, nnx.Param)
      pure = jax.tree.map(lambda src, dst: jax.device_put(src, dst.sharding), params_from,
                          nnx.to_pure_dict(params))
      nnx.replace_by_pure_dict(params, pure)
      nnx.update(model, params)
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, b):
      def loss_fn(m):
        logits_BTV, _, aux = m.forward(b["inputs"])
        return trainer_lib.loss_and_metrics(logits_BTV, aux, b, 1)[0]
      return nnx.value_and_grad(loss_fn)(nnx.merge(graphdef, state))
    sb = trainer_lib.shard_batch(batch, mesh)
    traced = f.trace(state, sb)
    loss, grads = traced.lower().compile()(state, sb)
  exchanges = str(traced.jaxpr).count("all_to_all")  # the expert-parallel path's exchanges
  flat_g = {p: np.asarray(v.get_value() if hasattr(v, "get_value") else v, np.float32)
            for p, v in nnx.to_flat_state(nnx.state(grads, nnx.Param))}
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return float(loss), flat_g, pure, exchanges


def part_check(args, devices, log):
  n = len(devices)
  on_cpu = devices[0].platform == "cpu"
  dtype = "float32" if on_cpu else "bfloat16"
  tol_loss, tol_grad = (1e-5, 1e-4) if on_cpu else (1e-2, 5e-2)
  margs = argparse.Namespace(**{**vars(args), "layers": args.check_layers})
  mcfg = model_config(margs, dtype)
  batch = make_batch(n * args.check_batch, args.check_seq, mcfg.vocab_size, seed=1)
  t0 = time.perf_counter()
  loss1, g1, p1, _ = loss_and_grads(mcfg, mesh_of({}, devices[:1]), None, batch)
  ctx = expert_parallel_on_one_device() if n == 1 else contextlib.nullcontext()
  with ctx:
    loss_n, g_n, _, exchanges = loss_and_grads(mcfg, mesh_of(dict(expert=n), devices), p1, batch)
  errs = {"/".join(map(str, p)): rel(g_n[p], g1[p]) for p in g1}
  worst = max(errs, key=errs.get)
  loss_err = abs(loss_n - loss1) / abs(loss1)
  ok = loss_err <= tol_loss and errs[worst] <= tol_grad and exchanges > 0
  row = dict(part="check", n=n, dtype=dtype, loss_1=loss1, loss_ep=loss_n, loss_rel_err=loss_err,
             worst_grad=worst, worst_grad_rel_err=errs[worst],
             median_grad_rel_err=float(np.median(list(errs.values()))), tol_loss=tol_loss,
             tol_grad=tol_grad, ok=ok, seconds=time.perf_counter() - t0,
             forced_ep_on_one_device=n == 1, all_to_alls_in_ep_step=exchanges)
  log(f"check {dtype} expert={n} vs 1 device: loss {loss_n:.6f} vs {loss1:.6f} (rel {loss_err:.1e}, "
      f"tol {tol_loss}); worst grad rel L2 {errs[worst]:.2e} at {worst} (tol {tol_grad}) -> "
      f"{exchanges} all_to_alls in the EP step -> {'OK' if ok else 'CHECK FAILED'}")
  return [row]


# ---- part 1: collectives -------------------------------------------------------------------------

def ragged_plan(n, rows, seed):
  """Send sizes [src, dst] (each row sums to `rows`, +-25% around rows/n) and the offsets of
  jax.lax.ragged_all_to_all: receivers pack their slices in sender order."""
  rng = np.random.default_rng(seed)
  p = rng.uniform(0.75, 1.25, (n, n))
  send = np.floor(p / p.sum(1, keepdims=True) * rows).astype(np.int32)
  send[:, 0] += rows - send.sum(1)
  in_off = (np.cumsum(send, 1) - send).astype(np.int32)
  recv = send.T.copy()                                   # recv[dst, src]
  out_off = (np.cumsum(send, 0) - send).astype(np.int32)  # [src, dst]: where src's rows land in dst
  return send, in_off, recv, out_off, int(recv.sum(1).max())


def check_collectives(x, out, meta, plan, fns, n, rows, out_rows, d):
  """Names of the exchanges whose result differs from numpy's (empty: all exact; psum at 1e-2)."""
  send, in_off, out_off = plan
  all_to_all, ragged, all_reduce = fns
  xh = np.asarray(x, np.float32).reshape(n, rows, d)
  errors = []
  got = np.asarray(all_to_all(x), np.float32).reshape(n, n, rows // n, d)
  if not np.array_equal(got, xh.reshape(n, n, rows // n, d).transpose(1, 0, 2, 3)):
    errors.append("all_to_all")
  got = np.asarray(ragged(x, out, *meta), np.float32).reshape(n, out_rows, d)
  for dst in range(n):
    for src in range(n):
      s, o, c = in_off[src, dst], out_off[src, dst], send[src, dst]
      if not np.array_equal(got[dst, o:o + c], xh[src, s:s + c]):
        errors.append(f"ragged {src}->{dst}")
  got = np.asarray(all_reduce(x), np.float32).reshape(n, rows, d)
  want = np.asarray(jnp.asarray(xh.sum(0), jnp.bfloat16), np.float32)
  if rel(got[0], want) > (1e-2 if n > 1 else 0.0):
    errors.append("all_reduce")
  return errors


def part_collectives(args, devices, log):
  n = len(devices)
  on_cpu = devices[0].platform == "cpu"
  d = 64 if args.smoke else 3072
  mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  spec = NamedSharding(mesh, P("x"))
  smap = lambda f, k: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("x"),) * k, out_specs=P("x"),
                                            check_vma=False))
  all_to_all = smap(lambda x: jax.lax.all_to_all(x, "x", 0, 0, tiled=True), 1)
  all_reduce = smap(lambda x: jax.lax.psum(x, "x"), 1)
  ragged_name = "ragged_all_to_all" if not on_cpu else "ragged (dense emulation: XLA:CPU has none)"

  def ragged_exchange(chunk):
    def body(x, out, in_off, send, out_off, recv):
      if on_cpu:
        return moe_ep.dense_ragged_all_to_all(x, out, in_off[0], send[0], out_off[0], recv[0],
                                              axis_name="x", chunk=chunk)
      return jax.lax.ragged_all_to_all(x, out, in_off[0], send[0], out_off[0], recv[0],
                                       axis_name="x")
    return smap(body, 6)

  rows_out = []
  for i, tokens in enumerate(args.tokens):
    rows = tokens * TOP_K
    rows -= rows % n
    nbytes = rows * d * 2
    x = jax.device_put(jax.random.normal(jax.random.key(tokens), (n * rows, d), jnp.bfloat16), spec)
    send, in_off, recv, out_off, out_rows = ragged_plan(n, rows, tokens)
    out = jax.device_put(jnp.zeros((n * out_rows, d), jnp.bfloat16), spec)
    meta = [jax.device_put(jnp.asarray(a), spec) for a in (in_off, send, out_off, recv)]
    ragged = ragged_exchange(int(send.max()))
    errors = check_collectives(x, out, meta, (send, in_off, out_off), (all_to_all, ragged, all_reduce),
                               n, rows, out_rows, d) if i == 0 else []
    if i == 0:
      log(f"check collectives at {tokens} tokens/GPU against numpy: "
          + (f"CHECK FAILED: {errors[:5]}" if errors else "OK"))
    for name, f, fargs, factor in (("all_to_all", all_to_all, (x,), (n - 1) / n),
                                   (ragged_name, ragged, (x, out, *meta), (n - 1) / n),
                                   ("all_reduce", all_reduce, (x,), 2 * (n - 1) / n)):
      t = bench(f, *fargs, reps=args.reps, rounds=3)
      algbw = nbytes / t / 1e9
      row = dict(part="collectives", n=n, op=name, tokens_per_gpu=tokens, bytes_per_gpu=nbytes,
                 ms=t * 1e3, algbw_GBs=algbw, busbw_GBs=algbw * factor, ok=not errors)
      log(f"{name:>24} tokens/GPU {tokens:>6} {nbytes / 2**20:8.1f} MiB: {t * 1e3:8.3f} ms, "
          f"algbw {algbw:8.1f} GB/s, busbw {algbw * factor:8.1f} GB/s")
      rows_out.append(row)
    del x, out, meta
  return rows_out


# ---- part 2: training step -----------------------------------------------------------------------

def time_step(args, devices, mesh_axes, log, label, no_exchange=False):
  n = len(devices)
  on_cpu = devices[0].platform == "cpu"
  mcfg = model_config(args, "float32" if on_cpu else "bfloat16")
  batch_per_gpu = args.tokens_per_gpu // args.seq
  cfg = train_config(args, mcfg, mesh_axes, batch_per_gpu * n)
  config_lib.validate(cfg, n)
  mesh = mesh_of(mesh_axes, devices)
  t0 = time.perf_counter()
  graphdef, state, shardings, schedule = trainer_lib.create_train_state(cfg, mesh)
  ctx = exchange_removed() if no_exchange else contextlib.nullcontext()
  with ctx:
    step = trainer_lib.make_train_step(cfg, graphdef, shardings, schedule, 1)
    batch = trainer_lib.shard_batch(make_batch(batch_per_gpu * n, args.seq, mcfg.vocab_size), mesh)
    with jax.set_mesh(mesh):
      state, metrics = step(state, batch)            # compile + first step
      jax.block_until_ready(metrics["loss"])
      compile_s = time.perf_counter() - t0
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics["loss"])
      t = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, batch)
      loss = float(metrics["loss"])
      sec = (time.perf_counter() - t) / args.steps
  params = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
  counts = count_params(params, mcfg)
  tokens = batch_per_gpu * n * args.seq
  fpt = 6.0 * counts["active_matmul"]
  # causal attention, forward + backward: 3 x (QK^T + PV) x half the keys
  fpt_attn = fpt + 6.0 * mcfg.num_layers * args.seq * mcfg.num_heads * mcfg.head_dim
  peak = metrics_lib.peak_flops_per_second() * n / jax.device_count()
  tps = tokens / sec
  row = dict(part="step", n=n, seconds=time.perf_counter() - t0, mesh=label, no_exchange=no_exchange, layers=mcfg.num_layers,
             experts=mcfg.moe.num_experts, tokens_per_step=tokens, seq=args.seq, step_ms=sec * 1e3,
             tokens_per_s=tps, tokens_per_s_per_gpu=tps / n, mfu=tps * fpt / peak if peak else None,
             mfu_attn=tps * fpt_attn / peak if peak else None, loss=loss, compile_s=compile_s,
             active_matmul_params=counts["active_matmul"], total_params=counts["total"],
             finite=bool(np.isfinite(loss)))
  mfu = f"{row['mfu']:.1%}" if peak else "n/a"
  log(f"step {label:>10}{' (no exchange)' if no_exchange else ''}: {sec * 1e3:8.1f} ms, "
      f"{tps:9.0f} tok/s, {tps / n:9.0f} tok/s/GPU, MFU {mfu}, loss {loss:.3f}, "
      f"compile+first {compile_s:.1f} s")
  del state
  return row


def part_step(args, devices, log):
  n = len(devices)
  rows = [time_step(args, devices[:1], {}, log, "1 GPU")]
  if n > 1:
    rows.append(time_step(args, devices, dict(expert=n), log, f"expert={n}"))
    rows.append(time_step(args, devices, dict(expert=n), log, f"expert={n}", no_exchange=True))
    if not args.smoke:  # the trainer's plain GSPMD path (tests/test_trainer.py covers it on CPU)
      rows.append(time_step(args, devices, dict(data=n), log, f"data={n}"))
  return rows


# ---- report --------------------------------------------------------------------------------------

def targets(rows, n, dispatch_tokens):
  """[(target, 'met'|'missed'|'n/a', why)] from the measured rows."""
  out = []
  coll = {(r["op"], r["tokens_per_gpu"]): r for r in rows if r["part"] == "collectives"}
  ragged = [r for (op, t), r in coll.items() if op.startswith("ragged") and t == dispatch_tokens]
  ar = coll.get(("all_reduce", dispatch_tokens))
  name = f"ragged dispatch busbw >= 50% of all-reduce busbw at {dispatch_tokens} tokens/GPU"
  if n == 1 or not ragged or not ar:
    out.append((name, "n/a", "N=1: collectives degenerate" if n == 1 else "not measured"))
  else:
    ratio = ragged[0]["busbw_GBs"] / ar["busbw_GBs"]
    out.append((name, "met" if ratio >= 0.5 else "missed",
                f"{ragged[0]['busbw_GBs']:.0f} vs {ar['busbw_GBs']:.0f} GB/s = {ratio:.0%}"))
  steps = {(r["mesh"], r["no_exchange"]): r for r in rows if r["part"] == "step"}
  base, ep = steps.get(("1 GPU", False)), steps.get((f"expert={n}", False))
  name = f"tokens/s per GPU with expert={n} >= 80% of one GPU's"
  if n == 1 or not base or not ep:
    out.append((name, "n/a", f"N=1: baseline {base['tokens_per_s_per_gpu']:.0f} tok/s/GPU"
                if base else "not measured"))
  else:
    ratio = ep["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
    out.append((name, "met" if ratio >= 0.8 else "missed",
                f"{ep['tokens_per_s_per_gpu']:.0f} vs {base['tokens_per_s_per_gpu']:.0f} = {ratio:.0%}"))
  checks = [r for r in rows if r["part"] == "check"]
  if checks:
    c = checks[0]
    out.append((f"expert={n} loss/grads == 1 device ({c['dtype']})", "met" if c["ok"] else "missed",
                f"loss rel {c['loss_rel_err']:.1e}, worst grad rel {c['worst_grad_rel_err']:.1e}"))
  return out


def markdown(rows, header, n, dispatch_tokens):
  lines = [header, ""]
  checks = [r for r in rows if r["part"] == "check"]
  if checks:
    lines += ["| check | dtype | loss 1 device | loss expert=N | loss rel err | worst grad rel L2 "
              "(param) | median grad rel L2 | ok |", "|---|---|---|---|---|---|---|---|"]
    for r in checks:
      lines.append(f"| expert={r['n']}{' (forced EP)' if r['forced_ep_on_one_device'] else ''} vs 1 "
                   f"| {r['dtype']} | {r['loss_1']:.6f} | {r['loss_ep']:.6f} | {r['loss_rel_err']:.1e} "
                   f"| {r['worst_grad_rel_err']:.1e} ({r['worst_grad']}) "
                   f"| {r['median_grad_rel_err']:.1e} | {r['ok']} |")
    lines.append("")
  coll = [r for r in rows if r["part"] == "collectives"]
  if coll:
    lines += ["| op | tokens/GPU | MiB/GPU | ms | algbw GB/s | busbw GB/s |",
              "|---|---|---|---|---|---|"]
    for r in coll:
      lines.append(f"| {r['op']} | {r['tokens_per_gpu']} | {r['bytes_per_gpu'] / 2**20:.1f} | "
                   f"{r['ms']:.3f} | {r['algbw_GBs']:.1f} | {r['busbw_GBs']:.1f} |")
    lines.append("")
  steps = [r for r in rows if r["part"] == "step"]
  if steps:
    share = {r["mesh"]: r["step_ms"] for r in steps if r["no_exchange"]}
    lines += ["| mesh | layers x experts | tokens/step | step ms | tokens/s | tokens/s/GPU | MFU (6N) "
              "| MFU (+attn) | exchange share | loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
      if r["no_exchange"]:
        continue
      ex = (f"{1 - share[r['mesh']] / r['step_ms']:.0%}" if r["mesh"] in share else "-")
      mfu = lambda v: f"{v:.1%}" if v is not None else "n/a"
      lines.append(f"| {r['mesh']} | {r['layers']} x {r['experts']} | {r['tokens_per_step']} | "
                   f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | "
                   f"{mfu(r['mfu'])} | {mfu(r['mfu_attn'])} | {ex} | {r['loss']:.3f} |")
    lines.append("")
  lines += ["| target | result | measured |", "|---|---|---|"]
  lines += [f"| {t} | {s} | {why} |" for t, s, why in targets(rows, n, dispatch_tokens)]
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--n", type=int, default=0, help="GPUs to use (0: all)")
  p.add_argument("--smoke", action="store_true", help="8 fake CPU devices, tiny sizes")
  p.add_argument("--parts", default="check,collectives,step")
  p.add_argument("--tokens", default="2048,8192,32768", help="tokens per GPU of the collectives")
  p.add_argument("--tokens_per_gpu", type=int, default=8192, help="per-GPU batch of the step")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--experts", type=int, default=32, help="routed experts (a multiple of N)")
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--reps", type=int, default=5, help="timed calls per round of a collective")
  p.add_argument("--attention_impl", default=None)
  p.add_argument("--all_to_all", default=None, help="moe.all_to_all: ragged | dense | None")
  p.add_argument("--check_layers", type=int, default=2)
  p.add_argument("--check_batch", type=int, default=1, help="sequences per GPU of the check")
  p.add_argument("--check_seq", type=int, default=1024)
  args = p.parse_args()
  if args.smoke:
    args.tokens = "16,64"
    args.tokens_per_gpu, args.seq, args.layers, args.experts = 64, 64, 1, 8
    args.steps, args.reps, args.check_seq, args.check_layers = 1, 2, 16, 1
  args.tokens = [int(t) for t in args.tokens.split(",")]
  devices = jax.devices()[:args.n or None]
  n = len(devices)
  os.makedirs(args.out, exist_ok=True)
  header = (f"## multi_gpu.py: {n} x {devices[0].device_kind}, jax {jax.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, NCCL_NVLS_ENABLE="
            f"{os.environ.get('NCCL_NVLS_ENABLE')}")
  print(header, flush=True)
  log = lambda s: print(s, flush=True)
  dispatch_tokens = 8192 if 8192 in args.tokens else args.tokens[len(args.tokens) // 2]
  parts = dict(check=part_check, collectives=part_collectives, step=part_step)
  rows = []
  for name in args.parts.split(","):
    if name not in parts:
      raise ValueError(f"--parts: unknown {name!r}; expected some of {list(parts)}")
    try:
      rows += parts[name](args, devices, log)
    except Exception as err:  # noqa: BLE001 -- report, go on with the other parts
      log(f"PART FAILED: {name}: {type(err).__name__}: {str(err)[:400]}")
      rows.append(dict(part="error", name=name, error=f"{type(err).__name__}: {str(err)[:400]}"))
    md = markdown(rows, header, n, dispatch_tokens)  # written after every part: a timeout keeps them
    with open(os.path.join(args.out, "multi_gpu.md"), "w") as f:
      f.write(md)
    with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
      json.dump(dict(header=header, n=n, rows=rows), f, indent=1)
  print("\n" + md, flush=True)
  return 1 if any(r["part"] == "error" or not r.get("ok", True) for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())

"""Training-step MFU of a Mixtral-shaped and an M2-shaped model on one accelerator (issue 9).

  python3 benchmarks/train_step.py --models mixtral,m2 --out /tmp/mfu          # GPU
  python3 benchmarks/train_step.py --smoke --out /tmp/mfu                     # tiny, CPU

Each model is built from its experiment file (experiments/mixtral_8x7b.py, minimax_m2.py) with fewer
layers and smaller widths, and trained through the trainer's own pieces (create_train_state,
make_train_step: optax AdamW + clipping, bf16 compute on f32 master weights, remat as the config
says, the data pipeline, shard_batch), in the trainer's loop order (step N dispatched, then step
N-1's metrics read). Timed steps exclude compilation and `--warmup` steps.

MFU = model FLOPs per step / (step time x peak), model FLOPs per token =
  6 x active matmul params (count_params: routed experts counted top_k / E, no input embedding)
  + 6 x L x T x N x H  (causal attention, fwd+bwd: QK^T and PV are 2 x 2 T^2 N H per sequence
    forward, half of it under the causal mask, x3 for fwd+bwd; per token 6 T N H per layer).
Remat's recomputed forward is not counted (model FLOPs, not hardware FLOPs); HFU = MFU x (8/6) for
the matmul part when every layer is rematerialized. Peak: 989 TFLOP/s (H200 dense bf16 spec) and
the dense bf16 matmul rate measured in the same process.

The profile: `jax.profiler` traces `--profile-steps` steps; device events are mapped to the HLO
instructions of the compiled step and split by the model's named scopes (attention, moe/router,
moe/permute, moe/experts, moe/combine, lm_head, optimizer) into a per-step time table.

`--balance-steps S` continues the first model's run to S steps and reports max/min expert load
per MoE layer (aux["load"] of the last step, and summed over the last 10 steps).
Writes $OUT/train_step.json and $OUT/train_step.md (incrementally: a timeout keeps what was done).
"""
import argparse
import ast
import collections
import glob
import gzip
import json
import math
import os
import re
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax import sharding
from mixtral_jax.experiments import minimax_m2, mixtral_8x7b
from mixtral_jax.model.transformer import count_params
from mixtral_jax.trainer import trainer as trainer_lib

SPEC_PEAK = 989e12  # H100/H200 SXM dense bf16 tensor-core peak


def apply_sets(c, sets):
  """`--set a.b.c=value` overrides (value read as a Python literal, else kept as a string)."""
  for item in sets or ():
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"--set: expected key=value, got {item!r}")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    *path, leaf = key.split(".")
    node = c
    for part in path:
      node = node[part]
    if leaf not in node:
      raise ValueError(f"--set: {key!r} is not a config field")
    node[leaf] = value
  return c


def model_config(name: str, *, smoke: bool, layers: int | None = None, remat: bool | None = None,
                 attention_impl: str | None = "pallas_mosaic_gpu", gmm: str | None = None,
                 batch: int | None = None, lr: float = 1e-3, steps: int = 200, sets=()):
  """The experiment config of `name` (mixtral | m2) at benchmark size (smoke: tiny, CPU), with
  `sets` (`key=value` overrides) applied last."""
  if name == "mixtral":
    c = mixtral_8x7b.get_config()
    # Issue 9's Mixtral-shaped model: 4 layers, d_model 2048, 8 experts top-2 of width 5632.
    c.model.update(num_layers=4, d_model=2048, num_heads=16, num_kv_heads=4, head_dim=128,
                   rotary_dim=128)
    c.model.moe.update(expert_dim=5632)
  elif name == "m2":
    c = minimax_m2.get_config()
    # M2 attention and expert dims (48 q / 8 kv heads of 128, width 1536, top-8, sigmoid + bias,
    # QK-norm) with 64 experts and 4 layers: 256 experts x 4 layers do not fit one H200 with
    # f32 AdamW state (3.6B params per layer).
    c.model.update(num_layers=4, vocab_size=32000)
    c.model.moe.update(num_experts=64)
  else:
    raise ValueError(f"--models: unknown model {name!r}; expected mixtral or m2")
  c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  c.train.update(batch_size=8, seq_len=4096, learning_rate=lr, warmup_steps=min(20, steps),
                 steps=steps, log_every=10)
  c.model.attention_impl = attention_impl
  c.model.moe.grouped_matmul = gmm
  if smoke:
    c.model.update(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   rotary_dim=16 if name == "mixtral" else 8, num_layers=2)
    c.model.moe.update(num_experts=8, top_k=2, expert_dim=32)
    c.model.attention_impl = "xla"
    c.train.update(batch_size=2, seq_len=128)
  if layers is not None:
    c.model.num_layers = layers
  if remat is not None:
    c.model.remat = remat
  if batch is not None:
    c.train.batch_size = batch
  apply_sets(c, sets)
  config_lib.validate(c, jax.device_count())
  return c


def model_flops_per_token(config, params) -> dict:
  m = config.model
  active = count_params(params, m)["active_matmul"]
  attn = 6.0 * m.num_layers * config.train.seq_len * m.num_heads * m.head_dim
  return dict(active_matmul_params=int(active), matmul=6.0 * active, attention=attn,
              total=6.0 * active + attn)


def measured_matmul_peak(n=8192, reps=20) -> float:
  """FLOP/s of one dense bf16 [n, n] x [n, n] matmul, back-to-back calls."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a, a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


# --- profile ------------------------------------------------------------------------------------

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"')
_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm\d\d_", re.I)
SCOPES = ("optimizer", "router", "permute", "experts", "combine", "attention", "lm_head", "loss",
          "moe", "mlp")


def hlo_op_names(hlo_text: str) -> dict:
  """HLO instruction name -> op_name metadata, from the compiled module's text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def category(op_name: str, kernel: str) -> str:
  """Profile bucket of one device event from its op_name scopes (innermost listed scope wins)."""
  parts = set(re.findall(r"\w+", op_name))  # scopes appear wrapped: jvp(attention), transpose(...)
  for scope in SCOPES:
    if scope in parts:
      if scope == "attention":
        return "attention (projections)" if _GEMM.search(kernel) else "attention (core, norms, rope)"
      return {"moe": "moe (balance loss, other)", "experts": "moe experts (gmm, swiglu)",
              "permute": "moe permute (sort, gather)", "combine": "moe combine (unsort, weight)",
              "router": "moe router", "lm_head": "lm_head + loss",
              "loss": "lm_head + loss"}.get(scope, scope)
  return "other"


def device_events(trace_dir: str):
  """(name, dur_us, args) of the device's complete events in the trace's perfetto json."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not paths:
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    return [], False
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pnames = {e["pid"]: e["args"].get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {p for p, n in pnames.items() if "GPU" in n or "TPU" in n}
  keep = gpu if gpu else set(pnames)
  return [(e.get("name", ""), float(e.get("dur", 0.0)), e.get("args", {}) or {})
          for e in events if e.get("ph") == "X" and e.get("pid") in keep], bool(gpu)


def profile_breakdown(compiled_step, state, batches, mesh, steps: int, hlo_text: str):
  """Runs `steps` steps under jax.profiler; returns (state, breakdown dict: ms per step by bucket,
  top kernels)."""
  names = hlo_op_names(hlo_text)
  d = tempfile.mkdtemp(prefix="mfu_trace_")
  with jax.set_mesh(mesh):
    jax.block_until_ready(state)
    t = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for i in range(steps):
        state, metrics = compiled_step(state, batches[i % len(batches)])
      jax.block_until_ready((state, metrics))
    wall = time.perf_counter() - t
  events, on_device = device_events(d)
  shutil.rmtree(d, ignore_errors=True)
  if not events:
    return state, {"error": "no trace events found"}
  buckets, kernels = collections.Counter(), collections.Counter()
  matched = 0
  for name, dur, args in events:
    hlo = args.get("hlo_op") or args.get("hlo_op_name") or name
    op = names.get(hlo) or names.get(name) or str(args.get("tf_op", "")) or str(args.get("long_name", ""))
    if not on_device and hlo not in names:
      continue  # host-side events of a CPU trace that are not XLA ops
    matched += hlo in names
    buckets[category(op, name)] += dur
    kernels[(name[:80], category(op, name), op[-90:])] += dur
  busy = sum(buckets.values())
  per = lambda us: us / 1e3 / steps
  return state, {
      "steps": steps, "wall_ms_per_step": wall * 1e3 / steps, "busy_ms_per_step": per(busy),
      "events": len(events), "events_matched_to_hlo": matched, "on_device": on_device,
      "buckets_ms_per_step": {k: per(v) for k, v in buckets.most_common()},
      "top_kernels": [dict(kernel=k, bucket=b, op_name=o, ms_per_step=per(v))
                      for (k, b, o), v in kernels.most_common(30)],
  }


# --- one model ----------------------------------------------------------------------------------

def run_model(name, config, args, out, record):
  m = config.model
  mesh = sharding.make_mesh(config.mesh)
  t0 = time.perf_counter()
  graphdef, state, shardings, schedule = trainer_lib.create_train_state(config, mesh)
  names = trainer_lib.task_names(config)
  step_fn = trainer_lib.make_train_step(config, graphdef, shardings, schedule, len(names))
  params = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
  counts = count_params(params, m)
  flops = model_flops_per_token(config, params)
  tokens = config.train.batch_size * config.train.seq_len
  del params
  data_it = trainer_lib.default_data_fn(config, seed=config.seed, shard_index=0, shard_count=1)
  # The data pipeline alone (device idle): host ms per batch, to compare with the step time.
  t = time.perf_counter()
  host = [next(data_it) for _ in range(3)]
  data_ms = (time.perf_counter() - t) * 1e3 / 3
  batch0 = trainer_lib.shard_batch(host[0], mesh)
  with jax.set_mesh(mesh):
    t = time.perf_counter()
    compiled = step_fn.lower(state, batch0).compile()
    compile_s = time.perf_counter() - t
  res = dict(model=name, layers=m.num_layers, d_model=m.d_model, heads=f"{m.num_heads}q/{m.num_kv_heads}kv x {m.head_dim}",
             experts=f"{m.moe.num_experts} top-{m.moe.top_k} width {m.moe.expert_dim} ({m.moe.router}"
                     f"{' + bias' if m.moe.use_bias else ''})",
             vocab=m.vocab_size, batch=config.train.batch_size, seq=config.train.seq_len,
             remat=bool(m.remat), attention_impl=m.attention_impl,
             learning_rate=config.train.learning_rate, overrides=list(args.set),
             grouped_matmul=m.moe.grouped_matmul, params_total=counts["total"],
             params_active=counts["active"], flops_per_token=flops, tokens_per_step=tokens,
             setup_s=time.perf_counter() - t0, compile_s=compile_s, data_ms_per_batch=data_ms)
  record(res)
  print(f"[{name}] compiled in {compile_s:.1f}s; active matmul params {flops['active_matmul_params']/1e6:.0f}M,"
        f" total {counts['total']/1e9:.2f}B", flush=True)

  losses, loads, step_times, data_times = [], [], [], []
  pending = None

  def one_step(state, pending, host_batch=None):
    t = time.perf_counter()
    batch = trainer_lib.shard_batch(host_batch if host_batch is not None else next(data_it), mesh)
    data_times.append(time.perf_counter() - t)
    with jax.set_mesh(mesh):
      state, metrics = compiled(state, batch)
    if pending is not None:  # step N-1's metrics while step N runs, as the trainer does
      mh = jax.device_get(pending)
      losses.append(float(mh["loss"]))
      loads.append(np.asarray(mh["load"]))
    return state, metrics

  for b in host:
    state, pending = one_step(state, pending, b)
  for _ in range(args.warmup - len(host)):
    state, pending = one_step(state, pending)
  jax.block_until_ready(state)
  data_times.clear()
  t = time.perf_counter()
  for _ in range(args.steps):
    state, pending = one_step(state, pending)
  jax.block_until_ready((state, pending))
  dt = (time.perf_counter() - t) / args.steps
  step_times.append(dt)
  mstats = jax.local_devices()[0].memory_stats() or {}
  peak = mstats.get("peak_bytes_in_use")
  spec_peak = SPEC_PEAK if jax.default_backend() == "gpu" else trainer_lib.metrics_lib.peak_flops_per_second()
  res.update(step_ms=dt * 1e3, tokens_per_s=tokens / dt,
             mfu_spec=flops["total"] * tokens / dt / spec_peak,
             mfu_measured_peak=flops["total"] * tokens / dt / args.matmul_peak,
             mfu_matmul_only_spec=flops["matmul"] * tokens / dt / spec_peak,
             host_data_ms_per_step=1e3 * float(np.mean(data_times)),
             peak_memory_gib=None if peak is None else peak / 2 ** 30,
             losses=list(losses))
  finite = all(math.isfinite(x) for x in losses)
  res["loss_finite"] = finite
  res["loss_decreasing"] = bool(finite and len(losses) >= 4 and np.mean(losses[-2:]) < np.mean(losses[:2]))
  record(res)
  print(f"[{name}] {dt*1e3:.1f} ms/step, {tokens/dt:,.0f} tok/s, MFU {res['mfu_spec']:.1%} of spec, "
        f"{res['mfu_measured_peak']:.1%} of measured matmul peak; loss {losses[0]:.3f} -> {losses[-1]:.3f}",
        flush=True)

  if args.profile_steps:
    mh = jax.device_get(pending)
    losses.append(float(mh["loss"]))
    loads.append(np.asarray(mh["load"]))
    pending = None
    prof_batches = [trainer_lib.shard_batch(next(data_it), mesh) for _ in range(args.profile_steps)]
    try:
      state, prof = profile_breakdown(compiled, state, prof_batches, mesh, args.profile_steps,
                                      compiled.as_text())
    except Exception as e:  # a profiler failure must not lose the timings (CUPTI missing, ...)
      prof = {"error": f"{type(e).__name__}: {e}"[:500]}
    res["profile"] = prof
    record(res)
    print(f"[{name}] profile: " + json.dumps(prof.get("buckets_ms_per_step", prof)), flush=True)

  if args.balance_steps and name == args.models.split(",")[0]:
    done = args.warmup + args.steps + args.profile_steps
    t = time.perf_counter()
    for s in range(done, args.balance_steps):
      if time.time() + 2 * dt + 3 > args.deadline:
        print(f"[{name}] balance run stopped at step {s} by --deadline", flush=True)
        break
      state, pending = one_step(state, pending)
      done = s + 1
      if done % 50 == 0:
        print(f"[{name}] balance step {done}: loss {losses[-1]:.3f}", flush=True)
        res["balance"] = balance_summary(loads, losses, done)
        record(res)
    if pending is not None:
      mh = jax.device_get(pending)
      losses.append(float(mh["loss"]))
      loads.append(np.asarray(mh["load"]))
    res["balance"] = balance_summary(loads, losses, done)
    res["balance"]["wall_s"] = time.perf_counter() - t
    record(res)
    print(f"[{name}] balance: " + json.dumps({k: v for k, v in res["balance"].items()
                                              if k != 'loss_every_10'}), flush=True)
  del state
  return res


def balance_summary(loads, losses, steps):
  """max/min expert load per MoE layer at the last step and over the last 10 steps."""
  last = loads[-1]
  tail = np.sum(loads[-10:], axis=0)
  spread = lambda l: [float(r.max() / max(r.min(), 1.0)) for r in l]
  return dict(steps=int(steps), last_step_max_over_min=spread(last), last10_max_over_min=spread(tail),
              last_step_max_fraction=[float(r.max() / r.sum()) for r in last],
              step30_max_over_min=spread(loads[29]) if len(loads) > 29 else None,
              loss_every_10=[float(x) for x in losses[::10]], final_loss=float(losses[-1]))


def markdown(results) -> str:
  rows = ["| model | layers | active / total params | batch x seq | remat | step ms | tokens/s | MFU (989) | "
          "MFU (measured matmul peak) | peak GiB | compile s | data ms/batch |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    if "step_ms" not in r:
      rows.append(f"| {r['model']} | {r['layers']} | not timed | | | | | | | | {r.get('compile_s', 0):.0f} | |")
      continue
    rows.append(
        f"| {r['model']} | {r['layers']} | {r['flops_per_token']['active_matmul_params']/1e6:.1f}M / "
        f"{r['params_total']/1e9:.2f}B | {r['batch']}x{r['seq']} | {r['remat']} | {r['step_ms']:.1f} | "
        f"{r['tokens_per_s']:,.0f} | {r['mfu_spec']:.1%} | {r['mfu_measured_peak']:.1%} | "
        f"{(r['peak_memory_gib'] or 0):.1f} | {r['compile_s']:.0f} | {r['data_ms_per_batch']:.0f} |")
  for r in results:
    p = r.get("profile")
    if p and "buckets_ms_per_step" in p:
      rows += ["", f"Profile of {r['model']} ({p['steps']} steps traced; wall {p['wall_ms_per_step']:.1f} ms/step, "
               f"device busy {p['busy_ms_per_step']:.1f} ms/step; {p['events_matched_to_hlo']}/{p['events']} "
               f"events matched to HLO):", "", "| part | ms/step | share of busy |", "|---|---|---|"]
      for k, v in p["buckets_ms_per_step"].items():
        rows.append(f"| {k} | {v:.2f} | {v / max(p['busy_ms_per_step'], 1e-9):.1%} |")
      rows += ["", "| top kernels | part | ms/step |", "|---|---|---|"]
      rows += [f"| `{k['kernel']}` | {k['bucket']} | {k['ms_per_step']:.2f} |" for k in p["top_kernels"][:20]]
    b = r.get("balance")
    if b:
      rows += ["", f"Balance of {r['model']} (lr {r['learning_rate']:g}{', ' + ', '.join(r['overrides']) if r['overrides'] else ''}) after {b['steps']} steps: max/min load per layer (last step) "
               f"{[round(x, 2) for x in b['last_step_max_over_min']]}, over the last 10 steps "
               f"{[round(x, 2) for x in b['last10_max_over_min']]}; final loss {b['final_loss']:.3f}"]
  return "\n".join(rows) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="mixtral,m2")
  p.add_argument("--out", default=os.environ.get("JOB_OUT", "/tmp/train_step"))
  p.add_argument("--smoke", action="store_true", help="tiny models on CPU (checks the script)")
  p.add_argument("--warmup", type=int, default=4)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--profile-steps", type=int, default=2)
  p.add_argument("--balance-steps", type=int, default=0, help="continue the first model to this step")
  p.add_argument("--layers", type=int, default=None)
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--remat", choices=("config", "on", "off"), default="config")
  p.add_argument("--gmm", default=None, help="model.moe.grouped_matmul (default: the backend's best)")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override applied last, e.g. model.moe.z_loss_weight=1e-3 (repeatable)")
  p.add_argument("--deadline", type=float, default=float("inf"),
                 help="epoch seconds: the balance run stops in time to report before this")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, backend {jax.default_backend()}", flush=True)
  args.matmul_peak = measured_matmul_peak(512 if args.smoke else 8192, 3 if args.smoke else 20)
  print(f"measured dense bf16 matmul: {args.matmul_peak / 1e12:.1f} TFLOP/s", flush=True)
  results = []

  def record(res):
    if res not in results:
      results.append(res)
    meta = dict(jax=jax.__version__, device=jax.devices()[0].device_kind,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                matmul_peak_tflops=args.matmul_peak / 1e12, spec_peak_tflops=SPEC_PEAK / 1e12)
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
      json.dump(dict(meta=meta, results=results), f, indent=1, default=str)
    with open(os.path.join(args.out, "train_step.md"), "w") as f:
      f.write(f"{meta['device']}, jax {meta['jax']}, {meta['date']}; dense bf16 matmul measured "
              f"{meta['matmul_peak_tflops']:.0f} TFLOP/s\n\n" + markdown(results))

  remat = {"config": None, "on": True, "off": False}[args.remat]
  steps_total = max(args.balance_steps, args.warmup + args.steps + args.profile_steps)
  for name in args.models.split(","):
    config = model_config(name, smoke=args.smoke, layers=args.layers, remat=remat, gmm=args.gmm,
                          batch=args.batch, lr=args.lr, steps=steps_total, sets=args.set)
    run_model(name, config, args, args.out, record)
  print(markdown(results), flush=True)
  bad = [r["model"] for r in results if not (r.get("loss_finite") and r.get("loss_decreasing"))]
  if bad:
    raise SystemExit(f"sanity failed (loss not finite or not decreasing): {bad}")


if __name__ == "__main__":
  main()

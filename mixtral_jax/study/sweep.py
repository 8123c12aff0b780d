"""Runs the multi-hop study: every (variant, seed) trained, evaluated and timed, then summarized.

One run = `trainer.train(config, run_dir)`, then `evaluation.evaluate_model` at the lengths of
config.eval (the training length and 2x), then the decode step time at a long context (on the decode kernels under
attention_impl, XLA on CPU). Each
run writes <workdir>/<variant>/seed<seed>/run.json; a run whose run.json exists is not redone,
so an interrupted sweep continues where it stopped. With jobs > 1 the runs go to that many
`python -m mixtral_jax.study` subprocesses at once: at this model size a train step is mostly
launch overhead, so concurrent processes fill the accelerator that one process leaves idle.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


def run_config(variant: str, seed: int, modifiers=(), steps: int | None = None):
  """experiments/multihop.py's config for `variant` with this seed; `steps` rescales the run
  (warmup and the length curriculum keep their share of it)."""
  from mixtral_jax.experiments import multihop
  config = multihop.get_config(",".join([variant, *modifiers]))
  config.seed = int(seed)
  if steps:
    t, scale = config.train, steps / config.train.steps
    t.warmup_steps = min(steps, max(1, round(t.warmup_steps * scale)))
    t.checkpoint_every, t.log_every = steps, max(1, min(t.log_every, steps))
    t.steps = int(steps)
    config.data.curriculum = tuple((max(1, round(u * scale)), n)
                                   for u, n in config.data.get("curriculum", ()))
  return config


def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f"seed{seed}")


def decode_implementation(config) -> str:
  """The decode path the timing runs on: config.study.decode_impl (else the model's
  attention_impl), None resolved to the backend's best decode kernels (XLA on CPU). Layer kinds
  without a decode kernel (lightning, and any the model logs as falling back) decode on XLA
  inside the same step."""
  impl = config.study.get("decode_impl", config.model.attention_impl)
  if impl is None:
    from mixtral_jax.kernels.decode_attention import api as decode_api
    impl = decode_api.default_implementation()
  return impl


def decode_config(config):
  """`config` with model.attention_impl set to the decode timing's implementation."""
  c = config.copy_and_resolve_references()
  c.model.attention_impl = config.study.get("decode_impl", config.model.attention_impl)
  return c


def decode_step_ms(model, config, mesh) -> float:
  """Median wall time (ms) of one decode step with a cache of config.study.decode_context
  positions, the new token at the last position (every key of the cache in range).

  The cache holds zeros: the XLA decode paths do the same work whatever the cache holds. The
  batch is config.study.decode_batch rounded up to the data-parallel devices.
  """
  from mixtral_jax.model import generate
  s = config.study
  ctx = int(s.decode_context)
  data_par = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
  batch = -(-int(s.decode_batch) // data_par) * data_par
  with jax.set_mesh(mesh):
    cache = model.init_cache(batch, ctx)
    tokens = jnp.zeros((batch, 1), jnp.int32)
    logits, cache = generate.decode_step(model, tokens, ctx - 1, cache)  # compile
    logits.block_until_ready()
    times = []
    for _ in range(int(s.decode_steps)):
      t0 = time.perf_counter()
      logits, cache = generate.decode_step(model, tokens, ctx - 1, cache)
      logits.block_until_ready()
      times.append(time.perf_counter() - t0)
  return float(np.median(times) * 1e3)


def param_checksum(model) -> float:
  """Sum of |w| over every parameter, in float64: equal across reruns only if training was."""
  from flax import nnx
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return float(sum(np.abs(np.asarray(jax.device_get(x), np.float64)).sum() for x in leaves))


def run_one(variant: str, seed: int, workdir: str, modifiers=(), steps: int | None = None) -> dict:
  """Trains, evaluates and times one (variant, seed); returns (and writes) its run.json."""
  from mixtral_jax import evaluation, sharding
  from mixtral_jax.trainer import trainer

  out_dir = run_dir(workdir, variant, seed)
  path = os.path.join(out_dir, "run.json")
  config = run_config(variant, seed, modifiers, steps)
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if done["step"] != config.train.steps or done["modifiers"] != list(modifiers):
      raise ValueError(f"workdir: {out_dir} holds a run of {done['step']} steps with modifiers "
                       f"{done['modifiers']}, not {config.train.steps} with {list(modifiers)}; "
                       "use a fresh workdir")
    return done
  t0 = time.time()
  metrics = trainer.train(config, out_dir, progress=False)
  t1 = time.time()
  mesh = sharding.make_mesh(config.mesh)
  model, step = trainer.restore_model(config, out_dir, mesh)
  with jax.set_mesh(mesh):
    report = evaluation.evaluate_model(model, config)
  t2 = time.time()
  dconfig = decode_config(config)
  decode_error = None
  try:  # a decode path that fails costs its column, not the trained run
    if dconfig.model.attention_impl != config.model.attention_impl:  # same weights, other paths
      model, _ = trainer.restore_model(dconfig, out_dir, mesh)
    decode_ms = decode_step_ms(model, dconfig, mesh)
  except Exception as e:  # noqa: BLE001 - recorded in run.json and logged
    log.error("run %s seed %d: decode timing on %s failed: %r", variant, seed,
              decode_implementation(config), e)
    decode_ms, decode_error = None, f"{type(e).__name__}: {e}"[:500]
  tps = metrics.get("tokens_per_second")
  dev = jax.devices()[0]
  result = {
      "device": f"{jax.device_count()} x {dev.device_kind}", "platform": dev.platform,
      "jax": jax.__version__,
      "variant": variant, "seed": int(seed), "modifiers": list(modifiers), "step": int(step),
      "attention_pattern": list(config.model.attention_pattern),
      "train_seq_len": config.train.seq_len, "window": config.model.window,
      "accuracy": report["accuracy"], "token_accuracy": report["token_accuracy"],
      "answers": report["answers"],
      "final_loss": metrics.get("loss"), "final_metrics": metrics,
      "param_checksum": param_checksum(model),
      "step_ms": (1e3 * config.train.batch_size * config.train.seq_len / tps) if tps else None,
      "train_seconds": round(t1 - t0, 2), "eval_seconds": round(t2 - t1, 2),
      "decode_ms": decode_ms, "decode_context": int(config.study.decode_context),
      "decode_implementation": decode_implementation(config), "decode_error": decode_error,
  }
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return result


def _subprocess_runs(pending, workdir, modifiers, jobs, steps):
  """Runs `pending` [(variant, seed)] in `jobs` concurrent study processes (each one run)."""
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / jobs:.3f}")
  queue, running = list(pending), []
  while queue or running:
    while queue and len(running) < jobs:
      variant, seed = queue.pop(0)
      logf = open(os.path.join(workdir, f"{variant}_seed{seed}.log"), "w")
      cmd = [sys.executable, "-m", "mixtral_jax.study", f"--workdir={workdir}",
             f"--variants={variant}", f"--seeds={seed}", f"--modifiers={','.join(modifiers)}",
             f"--steps={steps or 0}", "--jobs=1", "--nosummarize"]
      running.append(((variant, seed), subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env),
                      logf))
    time.sleep(1.0)
    for item in list(running):
      (variant, seed), proc, logf = item
      if proc.poll() is not None:
        logf.close()
        running.remove(item)
        if proc.returncode:
          raise RuntimeError(f"run {variant} seed {seed} failed (rc {proc.returncode}); see "
                             f"{logf.name}")


def run_sweep(workdir: str, variants, seeds, *, modifiers=(), jobs: int = 1,
              steps: int | None = None, summarize: bool = True) -> dict | None:
  """Every variant x seed (skipping finished runs), then report.json, report.md and the plots.

  Returns the report (None with summarize=False).
  """
  from mixtral_jax.experiments import multihop
  from mixtral_jax.study import report as report_lib

  for v in variants:
    if v not in multihop.VARIANTS:
      raise ValueError(f"variants: unknown {v!r}; expected some of {multihop.VARIANTS}")
  for m in modifiers:
    if m not in multihop.MODIFIERS:
      raise ValueError(f"modifiers: unknown {m!r}; expected some of {multihop.MODIFIERS}")
  if jobs < 1:
    raise ValueError(f"jobs: must be >= 1, got {jobs}")
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  pairs = [(v, int(s)) for v in variants for s in seeds]
  if jobs > 1:
    pending = [p for p in pairs if not os.path.exists(os.path.join(run_dir(workdir, *p),
                                                                   "run.json"))]
    _subprocess_runs(pending, workdir, modifiers, jobs, steps)
  runs = []
  for v, s in pairs:
    log.info("run %s seed %d", v, s)
    runs.append(run_one(v, s, workdir, modifiers, steps))
  if not summarize:
    return None
  meta = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      # Where the runs ran (a subprocess's devices, with jobs > 1), not this process's.
      "device": runs[0]["device"], "platform": runs[0]["platform"], "jax": runs[0]["jax"],
      "modifiers": list(modifiers), "seeds": [int(s) for s in seeds],
      "jobs": jobs, "sweep_seconds": round(time.time() - start, 1),
      "total_run_seconds": round(sum(r["train_seconds"] + r["eval_seconds"] for r in runs), 1),
  }
  report = report_lib.build(runs, meta)
  report_lib.write(report, workdir)
  return report

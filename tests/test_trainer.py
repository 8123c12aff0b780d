"""Trainer: schedule, sharded step == single-device step, checkpoint resume/fallback, end to end."""
import json
import logging
import os
import pickle
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax import sharding
from mixtral_jax.data import pipeline
from mixtral_jax.trainer import checkpoint as ckpt_lib
from mixtral_jax.trainer import optim
from mixtral_jax.trainer import trainer


def tiny_config(**train):
  c = config_lib.default_config()
  c.model.update(vocab_size=256, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                 rotary_dim=8, mlp_dim=64, num_dense_layers=0, attention_pattern=("full",))
  c.model.moe.update(num_experts=4, top_k=2, expert_dim=32, router="sigmoid", use_bias=True,
                     bias_update_rate=1e-2)
  c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  c.train.update(steps=6, batch_size=8, seq_len=64, learning_rate=3e-2, warmup_steps=2,
                 log_every=1, checkpoint_every=3, max_to_keep=5)
  c.train.update(**train)
  c.data.tasks = {"mqar": 1.0, "variable_tracking": 1.0}
  return c


def data_iter(config, shard_index=0):
  return pipeline.make_train_iterator(config, seed=config.seed, shard_index=shard_index)


def read_losses(workdir):
  """step -> loss from metrics.jsonl (a later line for the same step wins: the resumed run)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      d = json.loads(line)
      out[d["step"]] = d["loss"]
  return out


def test_schedule_values():
  c = tiny_config(steps=110, warmup_steps=10, learning_rate=1.0, end_lr_fraction=0.1)
  s = optim.make_schedule(c.train)
  np.testing.assert_allclose(float(s(0)), 0.1, rtol=1e-6)     # warmup: (s + 1) / warmup
  np.testing.assert_allclose(float(s(4)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(9)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)    # cosine starts at the peak
  np.testing.assert_allclose(float(s(60)), 0.55, rtol=1e-6)   # halfway: (peak + end) / 2
  np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-6)   # ends at end_lr_fraction * peak
  np.testing.assert_allclose(float(s(500)), 0.1, rtol=1e-6)
  s0 = optim.make_schedule(tiny_config(steps=10, warmup_steps=0, learning_rate=2.0).train)
  np.testing.assert_allclose(float(s0(0)), 2.0, rtol=1e-6)


def test_optimizer_clips_global_norm():
  c = tiny_config(grad_clip=1.0, weight_decay=0.0, warmup_steps=0)
  tx, _ = optim.make_optimizer(c.train)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  big = jax.tree.map(lambda p: 100.0 * p, params)
  small = jax.tree.map(lambda p: p / optax_norm(params), params)  # the clipped direction
  u_big, _ = tx.update(big, tx.init(params), params)
  u_small, _ = tx.update(small, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(u_big), jax.tree.leaves(u_small)):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def run_steps(config, mesh, batches):
  graphdef, state, shardings, schedule = trainer.create_train_state(config, mesh)
  step = trainer.make_train_step(config, graphdef, shardings, schedule, len(trainer.task_names(config)))
  losses, loads = [], []
  for b in batches:
    with jax.set_mesh(mesh):
      state, m = step(state, trainer.shard_batch(b, mesh))
    losses.append(float(m["loss"]))
    loads.append(np.asarray(m["load"]))
  return losses, loads, jax.device_get(nnx.to_pure_dict(state))


def sharded_config(**mesh):
  c = tiny_config()
  c.model.num_layers = 1  # compile time; the 8-device mesh and every parallel axis are what count
  c.mesh.update(**mesh)
  return c


@pytest.fixture(scope="module")
def single_device_run():
  c = sharded_config(data=1)
  data = data_iter(c)
  batches = [next(data) for _ in range(3)]  # odd: +-rate bias updates cannot cancel to zero
  single = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  return c, batches, run_steps(c, single, batches)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, expert=2, tensor=1),   # expert-parallel MoE
                                  dict(data=2, fsdp=1, expert=2, tensor=2),   # EP, experts' F split
                                  dict(data=2, fsdp=2, expert=1, tensor=2)])
def test_sharded_step_matches_single_device(single_device_run, mesh):
  c, batches, (losses1, loads1, state1) = single_device_run
  c8 = sharded_config(**mesh)
  losses8, loads8, state8 = run_steps(c8, sharding.make_mesh(c8.mesh), batches)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loads8, loads1)  # global loads: every data shard's tokens
  assert losses1[1] != losses1[0]
  flat1 = jax.tree_util.tree_leaves_with_path(state1)
  flat8 = dict(jax.tree_util.tree_leaves_with_path(state8))
  for path, x in flat1:
    np.testing.assert_allclose(flat8[path], x, rtol=1e-5, atol=1e-5, err_msg=str(path))
  # Aux-loss-free balancing ran inside each step on the global loads: bias = sum of the updates.
  biases = np.stack([x for p, x in flat1 if "bias" in jax.tree_util.keystr(p)])  # [L, E]
  want = sum(c.model.moe.bias_update_rate * np.sign(l.mean(-1, keepdims=True) - l) for l in loads1)
  assert np.abs(want).max() > 0
  np.testing.assert_allclose(biases, want, atol=1e-6)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the repeated train() runs compile once."""
  from jax._src import compilation_cache
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  compilation_cache.reset_cache()
  yield jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  compilation_cache.reset_cache()


E2E_STEPS = 40


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, compile_cache):
  """An uninterrupted tiny run: (config, workdir, final metrics)."""
  c = tiny_config(steps=E2E_STEPS, log_every=2, checkpoint_every=10, warmup_steps=4)
  workdir = str(tmp_path_factory.mktemp("full"))
  return c, workdir, trainer.train(c, workdir, progress=False)


def test_end_to_end_reaches_loss_threshold(full_run):
  _, workdir, out = full_run
  losses = read_losses(workdir)
  assert out["step"] == E2E_STEPS
  # Starts near chance (uniform over 256 tokens); learns the tasks' token structure (the random
  # keys/values/words themselves are unpredictable, so the loss plateaus well above 0).
  assert losses[2] > 0.95 * np.log(256), losses
  assert out["loss"] < 5.0 and losses[E2E_STEPS] < losses[2] - 0.5, losses
  for key in ("lr", "grad_norm", "accuracy/mqar", "accuracy/variable_tracking", "seq_accuracy/mqar",
              "router/load_max_over_min", "tokens_per_second", "mfu"):
    assert key in out, key
  assert out["router/load_max_over_min"] >= 1.0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "30", "40"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))


_KILL_SCRIPT = """
import os, pickle, signal, sys
from mixtral_jax.data import pipeline
from mixtral_jax.trainer import trainer

class Killed:  # the real iterator; SIGKILLs this process when asked for batch `fail_at`
  def __init__(self, it, fail_at):
    self.it, self.fail_at, self.n = it, fail_at, 0
  def __iter__(self):
    return self
  def __next__(self):
    if self.n == self.fail_at:
      os.kill(os.getpid(), signal.SIGKILL)
    self.n += 1
    return next(self.it)
  def get_state(self):
    return self.it.get_state()
  def set_state(self, state):
    self.it.set_state(state)

with open(sys.argv[1], "rb") as f:
  config = pickle.load(f)
trainer.train(config, sys.argv[2], progress=False, data_fn=lambda c, **kw: Killed(
    pipeline.make_train_iterator(c, **kw), fail_at=int(sys.argv[3])))
"""


def test_resume_after_kill_matches_uninterrupted(tmp_path, full_run, compile_cache):
  c, full_dir, full = full_run
  killed = str(tmp_path / "killed")
  # SIGKILL a run (no cleanup, async saves in flight) when it asks for batch 26: after step 25.
  with open(tmp_path / "config.pkl", "wb") as f:
    pickle.dump(c, f)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", JAX_DEFAULT_MATMUL_PRECISION="highest")
  proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "config.pkl"), killed,
                         "25"], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  done = [int(s) for s in os.listdir(os.path.join(killed, "checkpoints")) if s.isdigit()]
  assert max(done) in (10, 20), done  # step 20's async save may not have been finalized
  assert max(read_losses(killed)) >= 20
  resumed = trainer.train(c, killed, progress=False)
  want, got = read_losses(full_dir), read_losses(killed)
  assert sorted(got) == sorted(want) == list(range(2, E2E_STEPS + 1, 2))
  for s in sorted(want):
    np.testing.assert_allclose(got[s], want[s], rtol=1e-6, err_msg=f"step {s}")
  assert resumed["step"] == full["step"] == E2E_STEPS
  np.testing.assert_allclose(resumed["loss"], full["loss"], rtol=1e-6)


def _corrupt(step_dir, how):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      p = os.path.join(root, f)
      if how == "delete":
        os.remove(p)
      else:
        with open(p, "r+b") as fh:
          fh.truncate(os.path.getsize(p) // 2)


def _save_two(directory):
  ck = ckpt_lib.Checkpointer(directory, max_to_keep=3, async_save=True)
  states = {s: {"w": jnp.full((4, 3), float(s)), "n": {0: jnp.arange(5) * s}} for s in (1, 2)}
  for s, st in states.items():
    ck.save(s, st, {"pos": s})
  ck.close()
  return states


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog, how):
  d = str(tmp_path / "checkpoints")
  states = _save_two(d)
  _corrupt(os.path.join(d, "2"), how)
  ck = ckpt_lib.Checkpointer(d, max_to_keep=3)
  assert ck.restore_latest(states[2], quarantine=False)[0] == 1  # a reader moves nothing
  assert ck.all_steps() == [1, 2]
  with caplog.at_level(logging.WARNING):
    step, state, data_state = ck.restore_latest(states[2])
  assert step == 1 and data_state == {"pos": 1}
  np.testing.assert_array_equal(state["w"], states[1]["w"])
  np.testing.assert_array_equal(state["n"][0], states[1]["n"][0])
  assert any("step 2" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
  # The unreadable checkpoint is moved aside, so step 2 can be written again.
  assert ck.all_steps() == [1]
  assert os.path.isdir(str(tmp_path / "corrupt_checkpoints" / "2"))
  ck.save(2, states[2], {"pos": 2})
  ck.close()


def test_resume_with_no_readable_checkpoint_raises(tmp_path):
  d = str(tmp_path / "checkpoints")
  states = _save_two(d)
  for s in (1, 2):
    _corrupt(os.path.join(d, str(s)), "truncate")
  ck = ckpt_lib.Checkpointer(d, max_to_keep=3)
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match="none could be restored"):
    ck.restore_latest(states[2])
  assert _step_dirs(d) == [1, 2]  # nothing moved or deleted


def _step_dirs(d):
  return sorted(int(x) for x in os.listdir(d) if x.isdigit())


@pytest.mark.parametrize("field, update", [
    ("config.mesh", lambda c: c.mesh.update(data=3, fsdp=1)),
    ("config.train.batch_size", lambda c: c.train.update(batch_size=6)),
    ("config.model.moe.top_k", lambda c: c.model.moe.update(top_k=8)),
])
def test_config_errors_raise_before_compiling(tmp_path, field, update):
  c = tiny_config()
  update(c)
  def never(*a, **k):
    raise AssertionError("built a model or data pipeline before validating the config")
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    trainer.train(c, str(tmp_path), model_fn=never, data_fn=never, progress=False)


def test_multiprocess_env_detection():
  assert not trainer.is_multiprocess_env({})
  assert not trainer.is_multiprocess_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"})
  assert trainer.is_multiprocess_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"})
  assert trainer.is_multiprocess_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert trainer.is_multiprocess_env({"TPU_WORKER_HOSTNAMES": "a,b"})
  assert not trainer.is_multiprocess_env({"TPU_WORKER_HOSTNAMES": "localhost"})


def test_bf16_compute_keeps_fp32_master_weights():
  c = tiny_config()
  c.model.update(dtype="bfloat16", param_dtype="float32", num_layers=1)
  mesh = sharding.make_mesh(c.mesh)
  tx, schedule = optim.make_optimizer(c.train)
  from mixtral_jax.model.transformer import Transformer
  def create():
    model = Transformer(c.model, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(nnx.eval_shape(create))  # shapes only: nothing compiles
    shardings = jax.tree.map(lambda _: jax.NamedSharding(mesh, jax.P()), state)
    step = trainer.make_train_step(c, graphdef, shardings, schedule, len(trainer.task_names(c)))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), next(data_iter(c)))
    jaxpr = str(jax.make_jaxpr(step)(state, batch))
    new_state, metrics = jax.eval_shape(step, state, batch)
  assert "bf16" in jaxpr  # matmuls run in bfloat16
  params = jax.tree.leaves(nnx.state(nnx.merge(graphdef, new_state)[0], nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)
  assert metrics["loss"].dtype == jnp.float32


def test_checkpointer_keeps_max_to_keep(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2, async_save=True)
  for s in (1, 2, 3):
    ck.save(s, {"w": jnp.full((2,), float(s))}, {"next_index": s})
  ck.wait()
  assert ck.all_steps() == [2, 3]
  step, state, data_state = ck.restore_latest({"w": jnp.zeros((2,))})
  assert step == 3 and data_state == {"next_index": 3}
  np.testing.assert_array_equal(state["w"], [3.0, 3.0])
  ck.close()


def test_cli_help_lists_flags():
  out = subprocess.run([sys.executable, "-m", "mixtral_jax.train", "--help"], capture_output=True,
                       text=True, timeout=120)
  for flag in ("--config", "--workdir", "--[no]progress"):
    assert flag in out.stdout, (out.stdout, out.stderr)


# --- Runs a researcher can trust: divergence, recorded config, signals, one run per workdir. ---

def _copy_run(src, dst):
  import shutil
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))
  return str(dst)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, full_run, compile_cache):
  c, full_dir, _ = full_run
  workdir = _copy_run(full_dir, tmp_path / "run")
  # Resume the good run at an absurd learning rate, saving every step (so max_to_keep would
  # rotate every good checkpoint out if non-finite ones were saved).
  bad = tiny_config(steps=E2E_STEPS + 10, log_every=4, checkpoint_every=1, warmup_steps=0,
                    learning_rate=1e30, max_to_keep=3)
  with pytest.raises(trainer.NonFiniteError, match=r"(loss|grad_norm) is nan at step (\d+)") as e:
    trainer.train(bad, workdir, progress=False)
  import re
  bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
  assert E2E_STEPS < bad_step <= E2E_STEPS + 10
  saved = _step_dirs(os.path.join(workdir, "checkpoints"))
  assert saved and max(saved) < bad_step, (saved, bad_step)
  assert f"last good checkpoint is step {max(saved)}" in str(e.value)
  # Every checkpoint left is finite, and metrics.jsonl records the bad step's value as "NaN".
  model, step = trainer.restore_model(bad, workdir)
  assert step == max(saved)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = json.loads(f.readlines()[-1])
  assert last["step"] == bad_step and "NaN" in (last.get("loss"), last.get("grad_norm")), last


def test_metrics_json_records_non_finite_values(tmp_path):
  from mixtral_jax.trainer import metrics as metrics_lib
  logger = metrics_lib.MetricsLogger(str(tmp_path), total_steps=10, start_step=0, log_every=5,
                                     task_names=["mqar"], tokens_per_step=1, flops_per_token=1.0,
                                     peak_flops=0.0, progress=False)
  assert logger.record(1, {"loss": np.float32(2.0), "grad_norm": np.float32(1.0)}) is None
  assert logger.record(2, {"loss": np.float32(np.inf), "grad_norm": np.float32(np.nan)}) == "loss"
  logger.close()
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(l) for l in f]  # strict JSON: no bare NaN/Infinity
  assert len(lines) == 1, lines  # the bad step is written at once, between log steps
  assert (lines[0]["step"], lines[0]["loss"], lines[0]["grad_norm"]) == (2, "Infinity", "NaN")
  assert metrics_lib.first_nonfinite({"lr": 1.0, "grad_norm": np.nan, "loss": 1.0}) == "grad_norm"


def test_config_json_recorded_and_changed_model_refused(tmp_path, full_run):
  c, full_dir, _ = full_run
  with open(os.path.join(full_dir, "config.json")) as f:
    recorded = json.load(f)
  assert recorded["code_version"] and recorded["config"]["model"]["d_model"] == c.model.d_model
  workdir = _copy_run(full_dir, tmp_path / "run")
  wider = tiny_config(steps=E2E_STEPS + 2)
  wider.model.update(d_model=48, window=32)
  def never(*a, **k):
    raise AssertionError("built a model or data pipeline before checking the recorded config")
  with pytest.raises(trainer.workdir_lib.ConfigMismatchError) as e:
    trainer.train(wider, workdir, model_fn=never, data_fn=never, progress=False)
  msg = str(e.value)
  assert "model.d_model: 32 in the run, 48 now" in msg and "model.window" in msg, msg
  assert len(msg.splitlines()) < 10
  # An allowed field must leave the parameters' shapes unchanged: d_model does not.
  with pytest.raises(trainer.workdir_lib.ConfigMismatchError, match="shapes"):
    trainer.train(wider, workdir, data_fn=never, progress=False,
                  allow_config_change="d_model,window")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == recorded  # a refused run rewrites nothing


def test_one_run_per_workdir_lock(tmp_path, caplog):
  from mixtral_jax.trainer import workdir as workdir_lib
  import socket
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    with open(os.path.join(workdir, "lock"), "w") as f:
      json.dump({"host": socket.gethostname(), "pid": sleeper.pid}, f)
    def never(*a, **k):
      raise AssertionError("built a model while another run holds the workdir")
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=rf"in use by pid {sleeper.pid} on this host"):
      trainer.train(tiny_config(), workdir, model_fn=never, data_fn=never, progress=False)
  finally:
    sleeper.kill()
    sleeper.wait()
  # The holder is gone: its lock is stale and taken over, then released at the end.
  with caplog.at_level(logging.WARNING):
    with workdir_lib.lock(workdir):
      with open(os.path.join(workdir, "lock")) as f:
        assert json.load(f)["pid"] == os.getpid()
      with pytest.raises(workdir_lib.WorkdirLockedError, match=str(os.getpid())):
        with workdir_lib.lock(workdir):
          pass
  assert any("no longer running" in r.getMessage() for r in caplog.records)
  assert not os.path.exists(os.path.join(workdir, "lock"))
  with open(os.path.join(workdir, "lock"), "w") as f:
    json.dump({"host": "some-other-host", "pid": 1}, f)
  with pytest.raises(workdir_lib.WorkdirLockedError, match="pid 1 on host some-other-host"):
    with workdir_lib.lock(workdir):
      pass


def test_second_signal_acts_at_once():
  got = []
  previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
  try:
    with trainer.StopOnSignal() as stop:
      signal.raise_signal(signal.SIGTERM)
      assert stop.requested == signal.SIGTERM and got == []  # first: only a request
      signal.raise_signal(signal.SIGTERM)
      assert got == [signal.SIGTERM]  # second: the handler from before, at once
    signal.raise_signal(signal.SIGTERM)
    assert got == [signal.SIGTERM] * 2  # restored on exit
  finally:
    signal.signal(signal.SIGTERM, previous)


_PICKLED_CONFIG = """
import pickle
def get_config(path):
  with open(path, "rb") as f:
    return pickle.load(f)
"""


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, compile_cache):
  c = tiny_config(steps=5000, log_every=1, checkpoint_every=1000, warmup_steps=4)
  with open(tmp_path / "config.pkl", "wb") as f:
    pickle.dump(c, f)
  (tmp_path / "cfg.py").write_text(_PICKLED_CONFIG)
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  proc = subprocess.Popen(
      [sys.executable, "-m", "mixtral_jax.train", f"--config={tmp_path / 'cfg.py'}:"
       f"{tmp_path / 'config.pkl'}", f"--workdir={workdir}", "--noprogress"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    import time
    deadline = time.time() + 240
    metrics = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()
      time.sleep(0.2)
    # A second run on the same workdir is refused, naming the running one.
    with pytest.raises(trainer.workdir_lib.WorkdirLockedError, match=f"pid {proc.pid}"):
      trainer.train(c, workdir, progress=False)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "SIGTERM: stopped after step" in err and "rerun the same command" in err, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  saved = _step_dirs(os.path.join(workdir, "checkpoints"))
  logged = read_losses(workdir)
  assert saved == [max(logged)] and 3 <= saved[0] < 1000, (saved, sorted(logged))
  assert not os.path.exists(os.path.join(workdir, "lock"))


def test_save_model_checkpoint_then_restore_model_only(tmp_path):
  """convert's path: a model written in the trainer layout (fresh optimizer) reads back as the same
  model through the model-only restore, and the trainer resumes from it."""
  from mixtral_jax.model.transformer import Transformer
  c = tiny_config(steps=1, checkpoint_every=1, warmup_steps=0)
  mesh = sharding.make_mesh(c.mesh)
  with jax.set_mesh(mesh):
    model = nnx.jit(lambda: Transformer(c.model, rngs=nnx.Rngs(5)))()
    ckpt_lib.save_model_checkpoint(model, c, str(tmp_path))
  restored, step = ckpt_lib.restore_model(c, str(tmp_path), mesh)
  assert step == 0
  ours, theirs = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(restored))
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The trainer restores the whole {0: model, 1: optimizer} state from it and resumes at step 0.
  assert trainer.train(c, str(tmp_path), progress=False)["step"] == 1

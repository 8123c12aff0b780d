"""Two JAX processes on this machine (jax.distributed, coordinator on localhost, gloo CPU
collectives), each feeding its own data shard: a run SIGKILLed mid-way and restarted resumes from its
checkpoints with the losses of an uninterrupted run (1e-6)."""
import json
import os
import pickle
import signal
import socket
import subprocess
import sys

import numpy as np

from mixtral_jax import config as config_lib

_SCRIPT = """
import os, pickle, signal, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from mixtral_jax.trainer import trainer

class Killed:  # the real iterator; SIGKILLs this process when asked for batch `fail_at`
  def __init__(self, it, fail_at):
    self.it, self.fail_at, self.n = it, fail_at, 0
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
trainer.maybe_initialize_distributed()
assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
fail_at = int(sys.argv[3])
trainer.train(config, sys.argv[2], progress=False, data_fn=lambda c, **kw: Killed(
    trainer.default_data_fn(c, **kw), fail_at))
print("shard", jax.process_index(), "of", jax.process_count(), "done")
"""


def config():
  c = config_lib.default_config()
  c.model.update(vocab_size=256, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                 head_dim=16, rotary_dim=8, mlp_dim=64)
  c.model.moe.update(num_experts=4, top_k=2, expert_dim=32, router="sigmoid", use_bias=True)
  c.mesh.update(data=2, fsdp=1, expert=2, tensor=1)   # expert-parallel MoE across the processes
  c.train.update(steps=6, batch_size=8, seq_len=64, warmup_steps=1, log_every=1,
                 checkpoint_every=2, async_checkpointing=False)
  return c


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(tmp_path, workdir, fail_at=-1):
  """Both processes of one run; returns their return codes."""
  port = free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen([sys.executable, "-c", _SCRIPT, str(tmp_path / "config.pkl"),
                                   str(workdir), str(fail_at)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  out = []
  try:
    for p in procs:
      out.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [p.returncode for p in procs], out


def losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      d = json.loads(line)
      out[d["step"]] = d["loss"]
  return out


def test_two_processes_resume_after_kill_matches_uninterrupted(tmp_path):
  with open(tmp_path / "config.pkl", "wb") as f:
    pickle.dump(config(), f)
  rc, out = launch(tmp_path, tmp_path / "full")
  assert rc == [0, 0], out[0][-3000:] + out[1][-3000:]
  rc, out = launch(tmp_path, tmp_path / "killed", fail_at=5)  # after step 5; checkpoints at 2, 4
  assert rc == [-signal.SIGKILL] * 2, out[0][-3000:] + out[1][-3000:]
  assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["2", "4"]
  rc, out = launch(tmp_path, tmp_path / "killed")
  assert rc == [0, 0], out[0][-3000:] + out[1][-3000:]
  want, got = losses(tmp_path / "full"), losses(tmp_path / "killed")
  assert sorted(want) == sorted(got) == list(range(1, 7))
  for s in want:
    np.testing.assert_allclose(got[s], want[s], rtol=1e-6, err_msg=f"step {s}")
  assert want[1] != want[6]

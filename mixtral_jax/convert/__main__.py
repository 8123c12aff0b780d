"""Hugging Face directory <-> training run (orbax checkpoint).

  python -m mixtral_jax.convert --hf_dir=DIR --workdir=OUT [--config=experiments/x.py]
  python -m mixtral_jax.convert --to_hf --workdir=RUN --hf_dir=OUT [--config=...] [--model_type=...]

HF -> run: writes OUT/converted_config.json (the experiment config: --config's train/data/eval/mesh
and run-time model settings, the architecture from DIR/config.json) and OUT/checkpoints/0 in the
trainer's layout (model + fresh optimizer state + the data iterator's initial state), so
`mixtral_jax.train` fine-tunes from the converted weights and `mixtral_jax.evaluate` scores them,
both with `--config=mixtral_jax/convert/experiment.py:OUT --workdir=OUT`.
Run -> HF: restores RUN's latest checkpoint (config from --config, else RUN/converted_config.json)
and writes config.json + safetensors that transformers' AutoModelForCausalLM loads.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax import sharding

CONFIG_FILE = "converted_config.json"


def load_converted_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config `hf_to_run` saved in workdir."""
  def tuples(x):  # JSON has no tuples; the config schema's sequences are tuples
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return ml_collections.ConfigDict(tuples(json.load(f)))


def _initial_data_state(config):
  from mixtral_jax.trainer.trainer import default_data_fn
  try:
    return default_data_fn(config, seed=config.seed, shard_index=jax.process_index(),
                           shard_count=jax.process_count()).get_state()
  except Exception as e:  # noqa: BLE001 - no data source configured: the trainer starts one fresh
    logging.warning("no initial data iterator state (%s: %s); saving {}", type(e).__name__, e)
    return {}


def save_train_checkpoint(model, config, workdir: str, step: int = 0):
  """Writes `model` as <workdir>/checkpoints/<step> in the trainer's layout: the pure dict of
  nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))[1], optimizer freshly initialised
  from config.train, plus the data iterator's state. `mixtral_jax.train` resumes from it."""
  from mixtral_jax.trainer import checkpoint as ckpt_lib
  from mixtral_jax.trainer import optim
  tx, _ = optim.make_optimizer(config.train)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  _, state = nnx.split((model, optimizer))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               max_to_keep=config.train.max_to_keep, async_save=False)
  ckpt.save(step, nnx.to_pure_dict(state), _initial_data_state(config))
  ckpt.close()


def hf_to_run(hf_dir: str, workdir: str, config=None, mesh=None):
  """from_hf + converted_config.json + trainer checkpoint at step 0. Returns (model, config)."""
  from mixtral_jax.convert import from_hf
  config = config if config is not None else config_lib.default_config()
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  start = time.time()
  with jax.set_mesh(mesh):
    model, config = from_hf(hf_dir, mesh=mesh, config=config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json(indent=2))
    save_train_checkpoint(model, config, workdir)
  print(f"converted {hf_dir} -> {workdir} in {time.time() - start:.1f}s")
  return model, config


def run_to_hf(workdir: str, hf_dir: str, config=None, model_type=None, dtype=None):
  from mixtral_jax.convert import to_hf
  config = config if config is not None else load_converted_config(workdir)
  from mixtral_jax.trainer.trainer import restore_model
  model, step = restore_model(config, workdir)
  to_hf(model, config, hf_dir, model_type=model_type, dtype=dtype)
  print(f"wrote step {step} of {workdir} to {hf_dir}")


def main(argv):
  del argv
  config = _CONFIG.value
  if _TO_HF.value:
    run_to_hf(_WORKDIR.value, _HF_DIR.value, config, _MODEL_TYPE.value, _DTYPE.value)
  else:
    hf_to_run(_HF_DIR.value, _WORKDIR.value, config)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Experiment config (experiments/*.py[:arg]) for the run settings; optional.")
  _HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face directory (config.json + safetensors).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (orbax checkpoints).")
  _TO_HF = flags.DEFINE_bool("to_hf", False, "Convert the run in --workdir to --hf_dir.")
  _MODEL_TYPE = flags.DEFINE_string("model_type", None, "--to_hf: HF family (default: inferred).")
  _DTYPE = flags.DEFINE_string("dtype", None, "--to_hf: tensor dtype on disk (default param dtype).")
  flags.mark_flags_as_required(["hf_dir", "workdir"])
  app.run(main)

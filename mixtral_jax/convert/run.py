"""Hugging Face directory <-> training run: the library behind `python -m mixtral_jax.convert`.

HF -> run (`hf_to_run`): writes <workdir>/converted_config.json (the experiment config: the given
config's train/data/eval/mesh and run-time model settings, the architecture from config.json) and
a step-0 checkpoint in the trainer's layout (`trainer.checkpoint.save_model_checkpoint`), so
`mixtral_jax.train` fine-tunes from the converted weights and `mixtral_jax.evaluate` scores them,
both with `--config=mixtral_jax/convert/experiment.py:<workdir> --workdir=<workdir>`.
Run -> HF (`run_to_hf`): the model of the run's latest checkpoint (`trainer.checkpoint.restore_model`,
no optimizer state) written as config.json + safetensors that transformers' AutoModelForCausalLM loads.
"""
from __future__ import annotations

import json
import os
import time

import ml_collections

CONFIG_FILE = "converted_config.json"


def load_converted_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config `hf_to_run` saved in workdir."""
  def tuples(x):  # JSON has no tuples; the config schema's sequences are tuples
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return ml_collections.ConfigDict(tuples(json.load(f)))


def hf_to_run(hf_dir: str, workdir: str, config=None, mesh=None):
  """from_hf + converted_config.json + trainer checkpoint at step 0. Returns (model, config)."""
  import jax

  from mixtral_jax import config as config_lib
  from mixtral_jax import sharding
  from mixtral_jax.convert.hf import from_hf
  from mixtral_jax.trainer import checkpoint

  config = config if config is not None else config_lib.default_config()
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  start = time.time()
  with jax.set_mesh(mesh):
    model, config = from_hf(hf_dir, mesh=mesh, config=config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json(indent=2))
    checkpoint.save_model_checkpoint(model, config, workdir, step=0)
  print(f"converted {hf_dir} -> {workdir} in {time.time() - start:.1f}s")
  return model, config


def run_to_hf(workdir: str, hf_dir: str, config=None, model_type=None, dtype=None) -> str:
  """The model of workdir's latest checkpoint (config: given, else converted_config.json) as a
  Hugging Face directory. Returns hf_dir."""
  from mixtral_jax.convert.hf import to_hf
  from mixtral_jax.trainer import checkpoint

  config = config if config is not None else load_converted_config(workdir)
  model, step = checkpoint.restore_model(config, workdir)
  to_hf(model, config, hf_dir, model_type=model_type, dtype=dtype)
  print(f"wrote step {step} of {workdir} to {hf_dir}")
  return hf_dir


def convert(*, hf_dir: str, workdir: str, to_hf: bool = False, config=None, model_type=None,
            dtype=None):
  """The command line's one call: run_to_hf when `to_hf`, else hf_to_run."""
  if to_hf:
    return run_to_hf(workdir, hf_dir, config, model_type, dtype)
  if model_type is not None or dtype is not None:
    raise ValueError("--model_type and --dtype apply only with --to_hf")
  return hf_to_run(hf_dir, workdir, config)

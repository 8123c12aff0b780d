"""Experiment config of a converted Hugging Face model: `--config=mixtral_jax/convert/experiment.py:OUT`.

  python -m mixtral_jax.convert --hf_dir=DIR --workdir=OUT
  python -m mixtral_jax.evaluate --config=mixtral_jax/convert/experiment.py:OUT --workdir=OUT

Reads OUT/converted_config.json, written by `python -m mixtral_jax.convert`.
"""
from mixtral_jax.convert.run import load_converted_config


def get_config(arg=None):
  if not arg:
    raise ValueError("usage: --config=mixtral_jax/convert/experiment.py:<converted workdir>")
  return load_converted_config(arg)

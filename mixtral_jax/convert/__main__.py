"""Hugging Face directory <-> training run (see `mixtral_jax.convert.run`).

  python -m mixtral_jax.convert --hf_dir=DIR --workdir=OUT [--config=experiments/x.py]
  python -m mixtral_jax.convert --to_hf --workdir=RUN --hf_dir=OUT [--config=...] [--model_type=...]
"""
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


def main(argv):
  del argv
  from mixtral_jax.convert import run  # the library (jax, flax) only once the flags parsed
  run.convert(hf_dir=_HF_DIR.value, workdir=_WORKDIR.value, to_hf=_TO_HF.value,
              config=_CONFIG.value, model_type=_MODEL_TYPE.value, dtype=_DTYPE.value)


if __name__ == "__main__":
  app.run(main)

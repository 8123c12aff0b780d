"""Hugging Face checkpoints <-> our models and training runs.

  hf.py          from_hf / to_hf: a Hugging Face directory <-> (model, config) in memory
  run.py         hf_to_run / run_to_hf: a Hugging Face directory <-> a training run's workdir
  hf_config.py   config.json <-> our model config;  mapping.py  parameter names and layouts
  __main__.py    the command line (python -m mixtral_jax.convert --help)

The names below are re-exported lazily, so importing the package (and `--help`) stays cheap.
"""
import importlib

_EXPORTS = {
    "from_hf": "hf", "to_hf": "hf", "load_hf_config": "hf", "infer_model_type": "hf",
    "ConversionError": "hf", "MissingTensorError": "hf", "UnexpectedTensorError": "hf",
    "TensorShapeError": "hf", "UnsupportedConfigError": "hf_config",
    "hf_to_run": "run", "run_to_hf": "run", "load_converted_config": "run",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

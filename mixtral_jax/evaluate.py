"""Evaluate the latest checkpoint of a run: accuracy per task at several context lengths, perplexity.

  python -m mixtral_jax.evaluate --workdir=runs/quickstart           # the run's own config.json
  python -m mixtral_jax.evaluate --workdir=runs/quickstart --config=experiments/quickstart.py \
      --config.eval.lengths='(64,1024)'                              # other eval settings

Lengths beyond the training length (and beyond a sliding window) show how each attention variant
extrapolates. Prints a table, writes <workdir>/report.json and <workdir>/accuracy_vs_length.png.
A --config whose model differs from the run's recorded config.json is refused, naming the fields
(--allow_config_change=field,... for fields that leave the parameters' shapes unchanged).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/*.py[:arg]); default: the run's "
    "<workdir>/config.json. Override fields with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.")
_ALLOW = flags.DEFINE_list(
    "allow_config_change", [], "Model fields of --config that may differ from the run's recorded "
    "config.json (e.g. attention_impl,window); only fields that leave the parameters' shapes "
    "unchanged.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mixtral_jax import config as config_lib  # after flag parsing: --help stays fast
  from mixtral_jax.trainer import workdir as workdir_lib
  config = _CONFIG.value
  if config is not None:
    config = config_lib.resolve_cli_none(config)
  try:
    from mixtral_jax import evaluation
    evaluation.run(config, _WORKDIR.value, allow_config_change=_ALLOW.value)
  except (FileNotFoundError, config_lib.ConfigError, workdir_lib.WorkdirError) as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

"""Trains an experiment config; resumes from the workdir's latest checkpoint if it has one.

  python -m mixtral_jax.train --config=experiments/quickstart.py --workdir=runs/quickstart
  python -m mixtral_jax.train --config=experiments/minimax_m2.py:smoke --workdir=/tmp/m2 --config.train.steps=50
"""
from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file: experiments/NAME.py[:arg]. Override fields with "
    "--config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, TensorBoard events, metrics.jsonl. An existing "
    "run there is resumed.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a tqdm progress bar (--noprogress hides it).")
_ALLOW = flags.DEFINE_list(
    "allow_config_change", [], "Model fields that may differ from the workdir's recorded "
    "config.json on resume (e.g. attention_impl,dtype); only fields that leave the parameters' "
    "shapes unchanged.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our own INFO lines (resume, fallbacks), not orbax's per-save chatter.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mixtral_jax").setLevel(logging.INFO)
  from mixtral_jax import config as config_lib  # after flag parsing: --help stays fast
  from mixtral_jax.trainer import trainer, workdir
  config = config_lib.resolve_cli_none(_CONFIG.value)
  try:
    metrics = trainer.train(config, _WORKDIR.value, progress=_PROGRESS.value,
                            allow_config_change=_ALLOW.value)
  except trainer.TrainingInterrupted as e:
    print(f"train: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)  # the shell's "terminated by signal": `train && evaluate` stops here
  except (config_lib.ConfigError, workdir.WorkdirError, trainer.NonFiniteError) as e:
    print(f"train: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(metrics, indent=1, sort_keys=True))


if __name__ == "__main__":
  app.run(main)

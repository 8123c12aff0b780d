"""Trains an experiment config; resumes from the workdir's latest checkpoint if it has one.

  python -m mixtral_jax.train --config=experiments/quickstart.py --workdir=runs/quickstart
  python -m mixtral_jax.train --config=experiments/minimax_m2.py:smoke --workdir=/tmp/m2 --config.train.steps=50
"""
from __future__ import annotations

import json
import logging

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our own INFO lines (resume, fallbacks), not orbax's per-save chatter.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mixtral_jax").setLevel(logging.INFO)
  from mixtral_jax.trainer import trainer  # after flag parsing: --help stays fast
  metrics = trainer.train(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
  print(json.dumps(metrics, indent=1, sort_keys=True))


if __name__ == "__main__":
  app.run(main)

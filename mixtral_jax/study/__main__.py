"""Runs the multi-hop study sweep: every variant x seed, then report.json, report.md and plots.

  python -m mixtral_jax.study --workdir=runs/study                       # 6 variants x 3 seeds
  python -m mixtral_jax.study --workdir=/tmp/s --variants=full,msa --seeds=0 --modifiers=smoke

Finished runs (<workdir>/<variant>/seed<s>/run.json) are kept, so rerunning continues a sweep.
On a GPU, --deterministic adds --xla_gpu_deterministic_ops=true to XLA_FLAGS (same seed, same
numbers); it must be set before jax starts its backend, hence here and not in the library.
"""
from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging

_ALL = ("full", "swa", "swa_hybrid", "lightning_hybrid", "msa", "moba")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: one run directory per variant "
                               "and seed, report.json, report.md, the plots.")
_VARIANTS = flags.DEFINE_list("variants", list(_ALL), "Attention variants (experiments/multihop.py).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each trains every variant once.")
_MODIFIERS = flags.DEFINE_list("modifiers", [], "Config modifiers: smoke, deep.")
_JOBS = flags.DEFINE_integer("jobs", 1, "Runs at once (> 1: one subprocess each, sharing the "
                             "accelerator).")
_STEPS = flags.DEFINE_integer("steps", 0, "Train steps per run (0: the config's); warmup and the "
                              "length curriculum keep their share.")
_SUMMARIZE = flags.DEFINE_bool("summarize", True, "Write report.json / report.md / plots.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", True, "Deterministic GPU kernels.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DETERMINISTIC.value and "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_deterministic_ops=true").strip()
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mixtral_jax").setLevel(logging.INFO)
  from mixtral_jax.study import sweep  # after flag parsing: --help stays fast
  sweep.run_sweep(_WORKDIR.value, _VARIANTS.value, [int(s) for s in _SEEDS.value],
                  modifiers=tuple(_MODIFIERS.value), jobs=_JOBS.value, steps=_STEPS.value or None,
                  summarize=_SUMMARIZE.value)


if __name__ == "__main__":
  app.run(main)

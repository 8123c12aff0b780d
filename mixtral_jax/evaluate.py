"""Evaluate the latest checkpoint of a run: accuracy per task at several context lengths, perplexity.

  python -m mixtral_jax.evaluate --config=experiments/quickstart.py --workdir=runs/quickstart

Lengths beyond the training length (and beyond a sliding window) show how each attention variant
extrapolates. Prints a table, writes <workdir>/report.json and <workdir>/accuracy_vs_length.png.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax import sharding
from mixtral_jax.data import pipeline
from mixtral_jax.data import tasks as tasks_lib


@nnx.jit
def _logits(model, inputs_BT):
  return model(inputs_BT)


def _masked_nll(logits_BTV, batch, mask_key):
  logp = jax.nn.log_softmax(logits_BTV, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  mask = batch[mask_key]
  return float(jnp.sum(nll * mask)), float(jnp.sum(mask))


def evaluate_model(model, config) -> dict:
  """Scores `model` on config.eval.tasks at config.eval.lengths (+ perplexity).

  Returns {"accuracy": {task: {length: acc}}, "perplexity": {...}, "train_seq_len": int, ...}.
  """
  e = config.eval
  report = {"accuracy": {}, "token_accuracy": {}, "answers": {}, "perplexity": {},
            "train_seq_len": config.train.seq_len,
            "window": (config.model.window if "swa" in config.model.attention_pattern else None),
            "attention_pattern": list(config.model.attention_pattern)}
  for task in e.tasks:
    for key in ("accuracy", "token_accuracy", "answers"):
      report[key][task] = {}
    for length in e.lengths:
      right = total = tok_right = tok_total = 0
      for batch in pipeline.make_eval_batches(task, length, e.num_examples, e.batch_size,
                                              seed=config.seed + 1):
        logits = np.asarray(_logits(model, jnp.asarray(batch["inputs"])))
        r, t = tasks_lib.score_counts(task, logits, batch)
        right, total = right + r, total + t
        mask = batch["loss_mask"] > 0
        tok_right += int((logits.argmax(-1) == batch["targets"])[mask].sum())
        tok_total += int(mask.sum())
      report["accuracy"][task][str(length)] = right / max(total, 1)
      report["token_accuracy"][task][str(length)] = tok_right / max(tok_total, 1)
      report["answers"][task][str(length)] = total
  if e.perplexity:
    # Held-out data: text files when the run trained on text, else fresh synthetic examples of the
    # training mixture, over the tokens the run learned to predict (train.loss_on).
    mask_key = "loss_mask" if config.train.get("loss_on", "all") == "answers" else "lm_mask"
    report["perplexity_tokens"] = "answer" if mask_key == "loss_mask" else "all"
    sources = ["text"] if len(config.data.text_files) else list(config.data.tasks)
    for source in sources:
      nll = count = 0.0
      for batch in pipeline.make_eval_batches(source, config.train.seq_len, e.num_examples,
                                              e.batch_size, seed=config.seed + 2,
                                              text_files=tuple(config.data.text_files)):
        logits = _logits(model, jnp.asarray(batch["inputs"]))
        n, c = _masked_nll(logits, {k: jnp.asarray(v) for k, v in batch.items()}, mask_key)
        nll, count = nll + n, count + c
      report["perplexity"][source] = math.exp(nll / max(count, 1.0))
  return report


def format_table(report) -> str:
  """Exact-match accuracy per answer (all of an answer's tokens right) and per answer token."""
  lengths = sorted({int(l) for acc in report["accuracy"].values() for l in acc})
  head = f"{'context length':<32}" + "".join(f"{l:>9}" for l in lengths)
  lines = [head, "-" * len(head)]
  for key, label in (("accuracy", "exact match"), ("token_accuracy", "answer tokens")):
    for task, acc in report[key].items():
      name = f"{task} ({label})"
      lines.append(f"{name:<32}" + "".join(f"{acc.get(str(l), float('nan')):>9.3f}" for l in lengths))
  for source, ppl in report["perplexity"].items():
    lines.append(f"held-out perplexity [{source}, {report['perplexity_tokens']} tokens] at "
                 f"{report['train_seq_len']}: {ppl:.3f}")
  return "\n".join(lines)


def plot(report, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (task, acc) in enumerate(report["accuracy"].items()):
    lengths = sorted(int(l) for l in acc)
    color = f"C{i}"
    ax.plot(lengths, [acc[str(l)] for l in lengths], marker="o", color=color,
            label=f"{task}: exact match")
    tok = report["token_accuracy"][task]
    ax.plot(lengths, [tok[str(l)] for l in lengths], marker=".", ls="--", color=color,
            label=f"{task}: answer tokens")
  ax.axvline(report["train_seq_len"], color="gray", ls="--", lw=1, label="training length")
  if report.get("window"):
    ax.axvline(report["window"], color="tab:red", ls=":", lw=1, label="SWA window")
  ax.set_xscale("log", base=2)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("accuracy")
  ax.set_title("accuracy vs context length: " + "/".join(dict.fromkeys(report["attention_pattern"])))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  """Restores the latest checkpoint in workdir, evaluates, writes report.json and the plot."""
  config_lib.validate(config, jax.device_count())
  from mixtral_jax.trainer import checkpoint

  start = time.time()
  mesh = sharding.make_mesh(config.mesh)
  model, step = checkpoint.restore_model(config, workdir, mesh)
  with jax.set_mesh(mesh):
    report = evaluate_model(model, config)
  report["step"] = int(step)
  report["eval_seconds"] = round(time.time() - start, 1)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  plot(report, os.path.join(workdir, "accuracy_vs_length.png"))
  print(f"step {step}\n" + format_table(report))
  print(f"wrote {os.path.join(workdir, 'report.json')} and accuracy_vs_length.png")
  return report


def main(argv):
  del argv
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py[:arg]).",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

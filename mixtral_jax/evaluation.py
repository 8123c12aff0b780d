"""Evaluation library: accuracy per task at several context lengths, perplexity, report and plot.

`evaluate_model(model, config)` scores a model; `run(config, workdir)` restores a run's latest
checkpoint, evaluates it and writes <workdir>/report.json and <workdir>/accuracy_vs_length.png.
The command line is `python -m mixtral_jax.evaluate` (evaluate.py); other drivers (the study
sweep) import this module, which defines no flags.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

# Answer symbols a guess is drawn from, per task (tokenizer.py): chance = 1 / count per token.
_ANSWER_SYMBOLS = {"mqar": 64, "variable_tracking": 64, "niah_single": 64, "niah_multikey": 64,
                   "niah_multivalue": 64, "niah_multiquery": 64, "common_words": 112,
                   "frequent_words": 112}


# jax, flax and the data pipeline are imported inside the functions: `--help` stays fast.
@functools.cache
def _jitted_forward():
  from flax import nnx
  return nnx.jit(lambda model, inputs_BT: model(inputs_BT))


def _logits(model, inputs_BT):
  return _jitted_forward()(model, inputs_BT)


def _masked_nll(logits_BTV, batch, mask_key):
  import jax
  import jax.numpy as jnp
  logp = jax.nn.log_softmax(logits_BTV, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  mask = batch[mask_key]
  return float(jnp.sum(nll * mask)), float(jnp.sum(mask))


def evaluate_model(model, config) -> dict:
  """Scores `model` on config.eval.tasks at config.eval.lengths (+ perplexity).

  Returns {"accuracy": {task: {length: acc}}, "perplexity": {...}, "train_seq_len": int, ...}.
  """
  import jax.numpy as jnp
  import numpy as np
  from mixtral_jax.data import pipeline
  from mixtral_jax.data import tasks as tasks_lib

  e = config.eval
  m = config.model
  report = {"accuracy": {}, "token_accuracy": {}, "answers": {}, "perplexity": {},
            "train_seq_len": config.train.seq_len,
            "window": (config.model.window if "swa" in config.model.attention_pattern else None),
            "attention_pattern": list(config.model.attention_pattern),
            "model": describe_model(m), "answer_tokens": {},
            "chance_per_token": {t: 1.0 / _ANSWER_SYMBOLS[t] for t in e.tasks
                                 if t in _ANSWER_SYMBOLS}}
  for task in e.tasks:
    for key in ("accuracy", "token_accuracy", "answers", "answer_tokens"):
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
      report["answer_tokens"][task][str(length)] = tok_total
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


def describe_model(m) -> str:
  """One line naming the model: attention pattern, layers, width, experts."""
  pattern = "/".join(m.attention_pattern)
  moe_layers = m.num_layers - m.num_dense_layers
  experts = f", {m.moe.num_experts} experts top-{m.moe.top_k}" if moe_layers else ""
  return f"{pattern}, {m.num_layers} layers, d_model {m.d_model}{experts}"


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


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval of a binomial proportion p observed over n trials."""
  if n <= 0:
    return 0.0, 1.0
  d = 1 + z * z / n
  center = (p + z * z / (2 * n)) / d
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return max(0.0, center - half), min(1.0, center + half)


def plot(report, path: str):
  """Accuracy vs context length: one curve per task and distinct metric, 95% binomial (Wilson)
  intervals, each task's per-token chance level, the training length; log2 x axis at the lengths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  all_lengths = sorted({int(l) for acc in report["accuracy"].values() for l in acc})
  for i, (task, acc) in enumerate(report["accuracy"].items()):
    lengths = sorted(int(l) for l in acc)
    color = f"C{i}"
    tok = report["token_accuracy"][task]
    same = all(abs(acc[str(l)] - tok[str(l)]) < 1e-12 for l in lengths)
    curves = [("exact match = answer tokens" if same else "exact match", acc,
               report["answers"][task], "o", "-")]
    if not same:
      curves.append(("answer tokens", tok, report.get("answer_tokens", {}).get(task, {}), ".", "--"))
    for label, values, counts, marker, ls in curves:
      ys = [values[str(l)] for l in lengths]
      lo_hi = [wilson_interval(values[str(l)], int(counts.get(str(l), 0))) for l in lengths]
      err = [[y - lo for y, (lo, _) in zip(ys, lo_hi)], [hi - y for y, (_, hi) in zip(ys, lo_hi)]]
      ax.errorbar(lengths, ys, yerr=err, marker=marker, ls=ls, color=color, capsize=3,
                  label=f"{task}: {label}")
  # One line per distinct chance level (tasks answering from the same symbols share one).
  by_chance = {}
  for task, chance in report.get("chance_per_token", {}).items():
    by_chance.setdefault(chance, []).append(task)
  for chance, tasks in by_chance.items():
    who = "" if len(by_chance) == 1 else f" ({', '.join(tasks)})"
    ax.axhline(chance, color="black", ls=":", lw=1,
               label=f"chance per answer token: 1/{round(1 / chance)}{who}")
  lo, hi = all_lengths[0] / 1.3, all_lengths[-1] * 1.3
  if lo <= report["train_seq_len"] <= hi:
    ax.axvline(report["train_seq_len"], color="gray", ls="--", lw=1, label="training length")
  window = report.get("window")
  if window and lo <= window <= hi:
    ax.axvline(window, color="tab:red", ls=":", lw=1, label="SWA window")
  ax.set_xscale("log", base=2)
  ax.set_xlim(lo, hi)
  ax.set_xticks(all_lengths, [str(l) for l in all_lengths])
  ax.minorticks_off()
  ax.set_ylim(-0.02, 1.02)
  xlabel = "context length (tokens)"
  if window and window < lo:
    xlabel += f"; SWA window {window}"
  ax.set_xlabel(xlabel)
  ax.set_ylabel("accuracy (95% binomial interval)")
  title = report.get("model") or "/".join(dict.fromkeys(report["attention_pattern"]))
  if "step" in report:
    title += f" @ step {report['step']}"
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _resolve_config(config, workdir: str, allow=()):
  """The config to evaluate with: `config` (checked against the run's recorded config.json) or,
  when None, the recorded one. Raises ConfigError / ConfigMismatchError / FileNotFoundError."""
  from mixtral_jax.trainer import workdir as workdir_lib
  recorded = workdir_lib.read_config(workdir)
  if config is None:
    if recorded is None:
      raise FileNotFoundError(f"workdir: {workdir} has no {workdir_lib.CONFIG_FILE} (a run trained "
                              "before runs recorded their config, or not a run): pass --config")
    return recorded
  workdir_lib.check_model_unchanged(recorded, config, allow=allow, workdir=workdir)
  return config


def run(config, workdir: str, *, allow_config_change=()) -> dict:
  """Restores the latest checkpoint in workdir, evaluates, writes report.json and the plot.

  config None: the run's own <workdir>/config.json. Everything is validated, and the checkpoint's
  presence checked, before a model is built or a file written.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir: {workdir} does not exist")
  config = _resolve_config(config, workdir, allow_config_change)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not (os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))):
    raise FileNotFoundError(f"workdir: no checkpoint under {ckpt_dir}; train first "
                            "(python -m mixtral_jax.train ...)")
  import jax
  from mixtral_jax import config as config_lib
  from mixtral_jax import sharding
  from mixtral_jax.trainer import checkpoint, trainer

  config_lib.validate(config, jax.device_count())
  if allow_config_change:
    trainer.check_against_recorded(config, workdir, allow=allow_config_change)  # parameter shapes
  start = time.time()
  mesh = sharding.make_mesh(config.mesh)
  model, step = checkpoint.restore_model(config, workdir, mesh)
  with jax.set_mesh(mesh):
    report = evaluate_model(model, config)
  report["step"] = int(step)
  report["eval_seconds"] = round(time.time() - start, 1)
  path = os.path.join(workdir, "report.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
  os.replace(path + ".tmp", path)  # a failed run never leaves half a report
  plot(report, os.path.join(workdir, "accuracy_vs_length.png"))
  print(f"step {step}: {report['model']}\n" + format_table(report))
  print(f"wrote {path} and accuracy_vs_length.png")
  return report

"""The study's summary: mean and spread over seeds, a markdown table per length, two plots.

report = build(runs, meta) groups the run.json dicts of `sweep.run_one` by variant:
  report["summary"][variant]["accuracy"][task][length] = {"mean", "std", "min", "max", "n"}
  (std over seeds with ddof=0; the same for decode_ms, step_ms and train_seconds).
write(report, workdir) writes report.json, report.md, accuracy_vs_hops.png and
accuracy_vs_length.png into workdir.
"""
from __future__ import annotations

import json
import os

import numpy as np

HOP_PREFIX = "variable_tracking_h"
SCALARS = ("decode_ms", "step_ms", "train_seconds", "final_loss")
MARKERS = "osD^vP*X"


def _offset(i: int, n: int, step: float) -> float:
  """Spreads n overlapping series apart along x (ties would hide each other)."""
  return (i - (n - 1) / 2) * step


def _stats(values) -> dict:
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not len(v):
    return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
          "max": float(v.max()), "n": int(len(v))}


def global_layers(pattern) -> int:
  """Layers that can attend to any earlier token exactly (full, msa, moba; not swa/lightning)."""
  return sum(t in ("full", "msa", "moba") for t in pattern)


def build(runs, meta) -> dict:
  """Groups runs by variant (in first-seen order) and adds mean / spread over seeds."""
  by_variant: dict[str, list] = {}
  for r in runs:
    by_variant.setdefault(r["variant"], []).append(r)
  summary = {}
  for variant, rs in by_variant.items():
    acc = {}
    for task in rs[0]["accuracy"]:
      acc[task] = {length: _stats([r["accuracy"][task][length] for r in rs])
                   for length in rs[0]["accuracy"][task]}
    summary[variant] = {
        "attention_pattern": rs[0]["attention_pattern"],
        "global_layers": global_layers(rs[0]["attention_pattern"]),
        "seeds": [r["seed"] for r in rs], "accuracy": acc,
        **{k: _stats([r.get(k) for r in rs]) for k in SCALARS},
    }
  first = runs[0]
  meta = {**meta, "train_seq_len": first["train_seq_len"], "window": first["window"],
          "decode_context": first["decode_context"],
          "decode_implementation": first["decode_implementation"]}
  return {"meta": meta, "summary": summary, "runs": runs}


def _lengths(report) -> list[str]:
  s = next(iter(report["summary"].values()))
  return sorted(next(iter(s["accuracy"].values())), key=int)


def _tasks(report) -> list[str]:
  return list(next(iter(report["summary"].values()))["accuracy"])


def _cell(st, fmt="{:.2f}") -> str:
  if st["mean"] is None:
    return "n/a"
  return fmt.format(st["mean"]) + (" ± " + fmt.format(st["std"]) if st["n"] > 1 else "")


def format_markdown(report) -> str:
  """One table per eval length: exact match per task (mean ± std over seeds), decode time."""
  meta, tasks = report["meta"], _tasks(report)
  short = [t.replace(HOP_PREFIX, "vt h") for t in tasks]
  lines = [f"Multi-hop study: {meta['device']}, jax {meta['jax']}, {meta['date']}; seeds "
           f"{meta['seeds']}; trained at {meta['train_seq_len']} tokens, SWA window "
           f"{meta['window']}" + (f"; modifiers {meta['modifiers']}" if meta["modifiers"] else "")
           + ". Exact match, mean ± std over seeds (ddof 0).", ""]
  decode_head = f"decode ms @ {meta['decode_context']} ({meta['decode_implementation'].upper()})"
  for length in _lengths(report):
    lines.append(f"**Context {length}**" + (" (training length)"
                                            if int(length) == meta["train_seq_len"] else ""))
    lines.append("")
    head = ["variant", "global layers", *short, decode_head, "step ms"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for variant, s in report["summary"].items():
      row = [variant, str(s["global_layers"])]
      row += [_cell(s["accuracy"][t][length]) for t in tasks]
      row += [_cell(s["decode_ms"], "{:.2f}"), _cell(s["step_ms"], "{:.0f}")]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  return "\n".join(lines)


def _hops(report) -> list[int]:
  return sorted(int(t[len(HOP_PREFIX):]) for t in _tasks(report) if t.startswith(HOP_PREFIX))


def plot_hops(report, path: str):
  """Exact match vs hop count per variant, one panel per eval length (error bars: std)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from mixtral_jax.data import tasks as tasks_lib

  hops, lengths = _hops(report), _lengths(report)
  n = len(report["summary"])
  fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.6), squeeze=False)
  for ax, length in zip(axes[0], lengths):
    for i, (variant, s) in enumerate(report["summary"].items()):
      st = [s["accuracy"][f"{HOP_PREFIX}{h}"][length] for h in hops]
      ax.errorbar([h + _offset(i, n, 0.06) for h in hops], [x["mean"] for x in st],
                  yerr=[x["std"] for x in st], marker=MARKERS[i % len(MARKERS)], capsize=3,
                  color=f"C{i}", label=f"{variant} (g={s['global_layers']})")
    chains = tasks_lib.vt_chains(int(length))
    ax.axhline(1 / chains, color="gray", ls=":", lw=1, label=f"guess: 1 of the {chains} values")
    ax.set_xticks(hops)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("hops (chained lookups per answer)")
    ax.set_ylabel("exact match")
    train = int(length) == report["meta"]["train_seq_len"]
    ax.set_title(f"variable tracking at {length} tokens" + (" (training length)" if train else ""))
    ax.grid(alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
  fig.suptitle("g = global layers (full / MSA / MoBA); error bars: std over seeds", fontsize=9)
  fig.tight_layout(rect=(0, 0.12, 1, 0.97))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_lengths(report, path: str):
  """Exact match vs context length, one panel per task, one line per variant."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks, lengths = _tasks(report), [int(l) for l in _lengths(report)]
  cols = min(4, len(tasks))
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
  for ax, task in zip(axes.flat, tasks):
    n = len(report["summary"])
    for i, (variant, s) in enumerate(report["summary"].items()):
      st = [s["accuracy"][task][str(l)] for l in lengths]
      ax.errorbar([l * 2 ** _offset(i, n, 0.04) for l in lengths], [x["mean"] for x in st],
                  yerr=[x["std"] for x in st], marker=MARKERS[i % len(MARKERS)], capsize=3,
                  color=f"C{i}", label=variant)
    ax.axvline(report["meta"]["train_seq_len"], color="gray", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(l) for l in lengths])
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(task.replace(HOP_PREFIX, "variable tracking, hops="), fontsize=9)
    ax.grid(alpha=0.3)
  for ax in axes.flat[len(tasks):]:
    ax.axis("off")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
  fig.supxlabel("context length (tokens; dashed: training length)")
  fig.supylabel("exact match")
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(report, workdir: str):
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  table = format_markdown(report)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(table + "\n")
  plot_hops(report, os.path.join(workdir, "accuracy_vs_hops.png"))
  plot_lengths(report, os.path.join(workdir, "accuracy_vs_length.png"))
  print(table)

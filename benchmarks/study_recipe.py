"""Recipe probes for the multi-hop study (issue 13): which training knobs let a variant learn?

Trains one study variant (experiments/multihop.py) under several candidate recipes at once, one
subprocess each sharing the accelerator, and prints a table of the answer-token accuracy per task
(from the trainer's own metrics: every batch is fresh data, so it is held-out accuracy) over
each log interval, plus throughput (K tokens/s, padding included). A candidate is
`name:key=value;key=value` with config paths (`model.qk_norm="none"`, `train.learning_rate=1e-3`, `data.curriculum=()`); values are Python
literals. `--steps` rescales warmup and the length curriculum as the study's `--steps` does.

  python benchmarks/study_recipe.py --out /tmp/recipe --variant full --steps 800 \\
      'base:' 'lr1e-3:train.learning_rate=1e-3' 'noqk:model.qk_norm="none"'

Writes <out>/<name>/metrics.jsonl (the trainer's) and <out>/recipe.md.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time

HEADLINE = ("mqar", "variable_tracking_h1", "variable_tracking_h2", "variable_tracking_h4",
            "mqar_far", "niah_multikey", "common_words")


def parse_candidate(text: str) -> tuple[str, dict]:
  name, _, body = text.partition(":")
  if not name:
    raise ValueError(f"candidate: {text!r} has no name (expected name:key=value;...)")
  overrides = {}
  for item in filter(None, (s.strip() for s in body.split(";"))):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"candidate {name}: {item!r} is not key=value")
    try:
      overrides[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"candidate {name}: value of {key.strip()!r} is not a Python literal: "
                       f"{value!r}") from e
  return name, overrides


def apply_overrides(config, overrides: dict):
  for key, value in overrides.items():
    node, *path = key.split(".")
    target = config
    for part in [node] + path[:-1]:
      if part not in target:
        raise ValueError(f"override: {key!r}: config has no field {part!r}")
      target = target[part]
    leaf = path[-1] if path else node
    if leaf not in target:
      raise ValueError(f"override: {key!r}: config has no field {leaf!r}")
    target[leaf] = value
  return config


def train_one(variant: str, steps: int, overrides: dict, workdir: str, seed: int, modifiers=()):
  from mixtral_jax.study import sweep
  from mixtral_jax.trainer import trainer
  config = sweep.run_config(variant, seed, tuple(modifiers), steps)
  config.train.log_every = max(1, steps // 5)
  apply_overrides(config, overrides)
  trainer.train(config, workdir, progress=False)


def summarize(out: str, names: list[str], wall: dict) -> str:
  lines = ["| recipe | step | loss | K tok/s | " + " | ".join(HEADLINE) + " | max expert frac |",
           "|---|---|---|---|" + "---|" * len(HEADLINE) + "---|"]
  for name in names:
    path = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(path):
      lines.append(f"| {name} | (no metrics) |")
      continue
    rows = [json.loads(l) for l in open(path) if '"loss"' in l]
    for r in rows:
      tps = r.get("tokens_per_second")
      acc = [r.get(f"accuracy/{t}") for t in HEADLINE]
      lines.append(f"| {name} | {r['step']} | {r['loss']:.3f} | "
                   f"{'' if not tps else f'{tps / 1e3:.0f}'} | "
                   + " | ".join("" if a is None else f"{a:.2f}" for a in acc)
                   + f" | {r.get('router/max_expert_fraction', float('nan')):.2f} |")
    lines.append(f"| {name} | wall {wall.get(name, float('nan')):.0f} s | | | " + "| " * len(HEADLINE) + "|")
  text = "\n".join(lines)
  with open(os.path.join(out, "recipe.md"), "w") as f:
    f.write(text + "\n")
  return text


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("candidates", nargs="+", help="name:key=value;key=value")
  p.add_argument("--out", required=True)
  p.add_argument("--variant", default="full")
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--modifiers", default="", help="experiments/multihop.py modifiers (smoke, deep)")
  p.add_argument("--deadline", type=float, default=0, help="unix time: stop waiting and summarize")
  p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run candidate <name> in-process
  args = p.parse_args()
  cands = dict(parse_candidate(c) for c in args.candidates)
  if args.one:
    train_one(args.variant, args.steps, cands[args.one], os.path.join(args.out, args.one),
              args.seed, [m for m in args.modifiers.split(",") if m])
    return
  os.makedirs(args.out, exist_ok=True)
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / len(cands):.3f}")
  procs, start, wall = {}, time.time(), {}
  for name in cands:
    log = open(os.path.join(args.out, f"{name}.log"), "w")
    procs[name] = subprocess.Popen([sys.executable, __file__, *args.candidates, "--out", args.out,
                                    "--variant", args.variant, "--steps", str(args.steps),
                                    "--seed", str(args.seed), "--modifiers", args.modifiers,
                                    "--one", name],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
  while any(pr.poll() is None for pr in procs.values()):
    for name, pr in procs.items():
      if pr.poll() is not None and name not in wall:
        wall[name] = time.time() - start
    if args.deadline and time.time() > args.deadline:
      for pr in procs.values():
        if pr.poll() is None:
          pr.terminate()
      break
    time.sleep(2)
  for name, pr in procs.items():
    pr.wait()
    wall.setdefault(name, time.time() - start)
    if pr.returncode:
      print(f"{name}: rc {pr.returncode}; tail of its log:")
      print(open(os.path.join(args.out, f"{name}.log")).read()[-1500:])
  print(summarize(args.out, list(cands), wall))


if __name__ == "__main__":
  main()

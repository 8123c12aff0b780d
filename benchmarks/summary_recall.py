"""Recall of MSA's exact top-k by the block-summary selections (decode_selection mean / minmax).

Trains an experiment's MSA model for --steps steps on its own data (or restores the latest
checkpoint of --workdir), runs it over one --seq_len-token sequence of the config's first task,
takes every MSA layer's index queries and keys on the way (the layer's own indexer on the normed
hidden state entering its attention), samples --num_queries query positions in [--min_pos,
seq_len) and prints, per layer, `msa.summary_recall` for 'mean' and 'minmax': the fraction of the
exact top-k blocks the summary selection also picks, counting the forced local blocks (recalled
trivially) and without them; then the same on random index queries/keys of the same shapes.

  python benchmarks/summary_recall.py --config msa_32k:smoke --steps 50 --seq_len 4096   # CPU, ~20 s
  python benchmarks/summary_recall.py --config msa_32k --steps 1000 --seq_len 131072 \\
      --num_queries 1024 --out /tmp/summary_recall                    # H200: ~131 s, 124 of them training

Training runs at the config's length (msa_32k: 32K tokens, the indexer trained by its KL loss);
the measured forward at --seq_len runs on the backend's kernels (Triton on a GPU, XLA on CPU).

Writes <out>/summary_recall.json and <out>/summary_recall.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time

_P = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_P.add_argument("--config", default="msa_32k",
                help="experiment module of mixtral_jax.experiments, optionally :arg (msa_32k:smoke)")
_P.add_argument("--steps", type=int, default=50, help="training steps (0: the untrained model)")
_P.add_argument("--train_seq_len", type=int, default=None, help="training length (default: the config's)")
_P.add_argument("--batch_size", type=int, default=None, help="training batch (default: the config's)")
_P.add_argument("--workdir", default=None,
                help="restore its latest checkpoint if it has one, else train into it (default: a temp dir)")
_P.add_argument("--seq_len", type=int, default=4096, help="tokens of the measured forward")
_P.add_argument("--num_queries", type=int, default=256, help="query positions sampled per layer")
_P.add_argument("--min_pos", type=int, default=None,
                help="smallest sampled position (default: top_k * block_size, where the top-k first drops blocks)")
_P.add_argument("--attention_impl", default="default",
                help="attention_impl of the measured forward (default: the backend's best; xla on CPU)")
_P.add_argument("--chunk", type=int, default=32, help="queries scored at a time")
_P.add_argument("--seed", type=int, default=0)
_P.add_argument("--out", default=None, help="directory for summary_recall.json / .md")

KINDS = ("mean", "minmax")


def load_config(name, args):
  module, _, arg = name.partition(":")
  config = importlib.import_module(f"mixtral_jax.experiments.{module}").get_config(arg or None)
  t = config.train
  t.steps = max(args.steps, 1)
  t.warmup_steps = min(t.warmup_steps, t.steps)
  t.log_every = min(t.log_every, t.steps)
  t.checkpoint_every = t.steps
  if args.train_seq_len:
    t.seq_len = args.train_seq_len
  if args.batch_size:
    t.batch_size = args.batch_size
  config.data.curriculum = ()
  if "msa" not in config.model.attention_pattern:
    raise ValueError(f"--config: {name} has no msa layer (pattern {config.model.attention_pattern})")
  return config


def capture_index(model, tokens_BT):
  """[(index queries [B, T, K, I], index keys [B, T, I])] of every MSA layer, in layer order:
  the layer's indexer on the normed hidden state its attention reads (as `MSAAttention`)."""
  import jax.numpy as jnp

  from mixtral_jax.model.transformer import ScannedBlocks
  b, t = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x_BTD = model.embed(tokens_BT)
  msa_blocks = [blk for blk in model.layers if getattr(blk, "attn_type", None) == "msa"]
  out = []
  for block in model.layers:
    if isinstance(block, ScannedBlocks):
      raise ValueError("--config: scan_layers is not supported here (set model.scan_layers=False)")
    if len(out) == len(msa_blocks):
      break
    if block.attn_type == "msa":
      cos, sin = block.attn.rope(positions_BT)
      out.append(block.attn.indexer(block.input_norm(x_BTD), cos, sin))
    x_BTD, _, _ = block(x_BTD, positions_BT)
  return out


def markdown(report) -> str:
  r = report
  lines = [f"block-summary recall of MSA's exact top-{r['top_k']} ({r['selection']}, blocks of "
           f"{r['block_size']}, {r['local_blocks']} forced local) at {r['seq_len']} tokens, "
           f"{r['num_queries']} queries in [{r['min_pos']}, {r['seq_len']}); {r['config']} "
           f"trained {r['steps']} steps ({r['device']})", "",
           "| layer | index q/k | summary | recall | recall w/o forced | exact blocks w/o forced |",
           "|---|---|---|---|---|---|"]
  for row in r["rows"]:
    lines.append(f"| {row['layer']} | {row['data']} | {row['kind']} | {row['recall']:.3f} | "
                 f"{row['recall_unforced']:.3f} | {row['exact_unforced']:.2f} |")
  return "\n".join(lines)


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from mixtral_jax import config as config_lib
  from mixtral_jax import sharding
  from mixtral_jax.data import tasks
  from mixtral_jax.model.attention import msa
  from mixtral_jax.model.transformer import Transformer
  from mixtral_jax.trainer import checkpoint, trainer

  t0 = time.time()
  config = load_config(args.config, args)
  config.seed = args.seed
  workdir = args.workdir or tempfile.mkdtemp(prefix="summary_recall_")
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  restored = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
  metrics = {}
  if args.steps and not restored:
    metrics = trainer.train(config, workdir, progress=False)
  t_train = time.time() - t0

  # The measured forward: same parameters, attention on the chosen path, no KL.
  fconfig = config.copy_and_resolve_references()
  impl = None if args.attention_impl == "default" else args.attention_impl
  if impl is None and jax.default_backend() == "cpu":
    impl = "xla"
  fconfig.model.attention_impl = impl
  fconfig.model.msa.kl_loss_weight = 0.0
  mesh = sharding.make_mesh(fconfig.mesh)
  if args.steps or restored:
    model, step = checkpoint.restore_model(fconfig, workdir, mesh)
  else:
    with jax.set_mesh(mesh):
      model, step = Transformer(fconfig.model, rngs=nnx.Rngs(args.seed)), 0
  task = list(config.data.tasks)[0]
  tokens = tasks.generate(task, args.seq_len, args.seed + 1)["inputs"][None]
  with jax.set_mesh(mesh):
    index = nnx.jit(capture_index)(model, jnp.asarray(tokens))
    jax.block_until_ready(index)
  t_forward = time.time() - t0 - t_train

  m = fconfig.model.msa
  min_pos = args.min_pos if args.min_pos is not None else m.top_k * m.block_size
  if not 0 <= min_pos < args.seq_len:
    raise ValueError(f"--min_pos {min_pos} must be in [0, --seq_len={args.seq_len})")
  rng = np.random.default_rng(args.seed)
  n = min(args.num_queries, args.seq_len - min_pos)
  pos = np.sort(rng.choice(np.arange(min_pos, args.seq_len), n, replace=False)).astype(np.int32)
  pos_BT = jnp.asarray(pos)[None]
  recall = {kind: jax.jit(lambda q, k, p, kind=kind: msa.summary_recall(q, k, p, m, kind,
                                                                        chunk=args.chunk))
            for kind in KINDS}
  rows = []
  pattern = config_lib.pattern_for_layers(fconfig.model.attention_pattern,
                                         fconfig.model.num_layers)
  layers = [i for i, a in enumerate(pattern) if a == "msa"]
  key = jax.random.key(args.seed)
  for layer, (iq_BTKI, ik_BTI) in zip(layers, index):
    q_real = iq_BTKI[:, pos].astype(jnp.float32)
    k_real = ik_BTI.astype(jnp.float32)
    key, kq, kk = jax.random.split(key, 3)
    q_rand = jax.random.normal(kq, q_real.shape, jnp.float32)
    k_rand = jax.random.normal(kk, k_real.shape, jnp.float32)
    for data, q, k in (("model", q_real, k_real), ("random", q_rand, k_rand)):
      for kind in KINDS:
        r = {name: float(v) for name, v in recall[kind](q, k, pos_BT).items()}
        rows.append({"layer": layer, "data": data, "kind": kind, **r})
  dev = jax.devices()[0]
  return {
      "config": args.config, "steps": int(step), "train_seq_len": config.train.seq_len,
      "train_loss": metrics.get("loss"), "seq_len": args.seq_len, "task": task,
      "num_queries": int(n), "min_pos": int(min_pos), "block_size": m.block_size,
      "top_k": m.top_k, "local_blocks": m.local_blocks, "selection": m.selection,
      "index_head_dim": m.index_head_dim, "attention_impl": impl, "workdir": workdir,
      "device": f"{jax.device_count()} x {dev.device_kind}", "jax": jax.__version__,
      "train_seconds": round(t_train, 1), "forward_seconds": round(t_forward, 1),
      "total_seconds": round(time.time() - t0, 1), "rows": rows,
  }


def main():
  args = _P.parse_args()
  report = run(args)
  text = markdown(report)
  print(text)
  print(f"train {report['train_seconds']} s, forward {report['forward_seconds']} s, "
        f"total {report['total_seconds']} s")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary_recall.json"), "w") as f:
      json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "summary_recall.md"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()

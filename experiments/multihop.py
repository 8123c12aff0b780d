"""The multi-hop recall study (issue 13): one small MoE, six attention variants.

Does sparse attention keep the multi-hop recall that sliding-window and linear hybrids lose?
Every variant is the same 4-layer MoE (8 sigmoid-routed experts, top-2, aux-loss-free bias
balancing), trained on the same mixture at 512 tokens (16x the window of 32); only the
attention of each layer differs:

  full              full x 4                          4 global layers
  swa               swa x 4 (window 32)               none: 4 stacked windows bridge 124 tokens
  swa_hybrid        swa, swa, swa, full               1 global layer (M2's rejected SWA hybrid)
  lightning_hybrid  lightning x 3, full               1 softmax-global layer + 3 linear ones
  msa               full, msa x 3                     M3's pattern: top-4 of 16-token blocks
                                                      (12.5% of 512) chosen by an indexer
  moba              full, moba x 3                    the same blocks chosen by mean-pooled keys

The argument is `<variant>[,modifier...]`; modifiers:
  deep   8 layers (the hybrids then hold 2 global layers: does the hop threshold move with g?)
  smoke  tiny dims, 64 tokens, a few steps: the structure only, for CPU tests

  python -m mixtral_jax.study --workdir=runs/study                  # the whole sweep
  python -m mixtral_jax.train --config=experiments/multihop.py:msa --workdir=runs/msa
"""
from mixtral_jax.config import default_config
from mixtral_jax.experiments import _common

VARIANTS = ("full", "swa", "swa_hybrid", "lightning_hybrid", "msa", "moba")
MODIFIERS = ("deep", "smoke")
HOP_TASKS = tuple(f"variable_tracking_h{h}" for h in (1, 2, 3, 4))
EVAL_TASKS = HOP_TASKS + ("mqar", "mqar_far", "niah_multikey", "common_words")


def attention_pattern(variant: str, num_layers: int) -> tuple[str, ...]:
  """One attention type per layer; hybrids repeat (3 local/linear : 1 full) periods."""
  period = {"full": ("full",), "swa": ("swa",), "swa_hybrid": ("swa",) * 3 + ("full",),
            "lightning_hybrid": ("lightning",) * 3 + ("full",)}
  if variant in period:
    p = period[variant]
    return tuple(p[i % len(p)] for i in range(num_layers))
  if variant in ("msa", "moba"):
    return ("full",) + (variant,) * (num_layers - 1)
  raise ValueError(f"variant: unknown {variant!r}; expected one of {VARIANTS}")


def get_config(arg=None):
  args = _common.parse_arg(arg)
  variants = [a for a in args if a in VARIANTS]
  if len(variants) != 1:
    raise ValueError(f"arg: {arg!r} must name exactly one variant of {VARIANTS}")
  unknown = [a for a in args if a not in VARIANTS + MODIFIERS]
  if unknown:
    raise ValueError(f"arg: unknown {unknown}; variants {VARIANTS}, modifiers {MODIFIERS}")
  variant, smoke = variants[0], "smoke" in args
  num_layers = 8 if "deep" in args else 4

  c = default_config()
  m = c.model
  # Half of each head rotates (M2's partial rotary): the other half matches by content alone,
  # which is what lets retrieval survive positions never seen in training (the 2x evaluation).
  m.update(vocab_size=256, d_model=256, num_layers=num_layers, num_heads=8, num_kv_heads=4,
           head_dim=32, rotary_dim=16, rope_theta=10_000.0, qk_norm="per_head",
           num_dense_layers=0, attention_pattern=attention_pattern(variant, num_layers),
           window=32, lightning_block=32, dtype="bfloat16", param_dtype="float32",
           # Training on XLA: at 512 tokens its [T, S] tensors are small, and on the H200
           # (2026-12-02) the msa layers' Triton training step at these dims (head 32, blocks of
           # 16-32, 16 x 1024 tokens) ran ~0.5-0.8 s a step against ~0.04 s for full attention.
           # The decode timing runs on the backend's decode kernels (study.decode_impl).
           attention_impl="xla")
  m.msa.update(block_size=16, top_k=4, index_head_dim=32, local_blocks=1, selection="per_group",
               kl_loss_weight=1.0)
  m.moba.update(block_size=16, top_k=4)
  m.moe.update(num_experts=8, top_k=2, expert_dim=256, router="sigmoid", use_bias=True,
               routed_scaling_factor=1.0, dispatch="dropless")
  c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  # Recipe (docs/study.md): loss on the answers; the circuit found at 64 tokens, where the
  # quickstart learns, then the length grows. At 1024 tokens, batch 16 and 2000 steps no recipe
  # left chance on MQAR (H200 probes, 2026-12-02, docs/NOTES.md).
  c.train.update(steps=3000, batch_size=32, seq_len=512, learning_rate=3e-3, warmup_steps=100,
                 end_lr_fraction=0.1, weight_decay=0.01, loss_on="answers", log_every=100,
                 checkpoint_every=3000, max_to_keep=1)
  c.data.tasks = {**{t: 1.0 for t in HOP_TASKS}, "mqar": 0.5, "mqar_far": 0.5,
                  "niah_multikey": 0.5, "common_words": 0.5}
  c.data.curriculum = ((600, 64), (1200, 128), (1800, 256))
  c.data.num_workers = 2
  c.eval.update(tasks=EVAL_TASKS, lengths=(512, 1024), num_examples=64, batch_size=16,
                perplexity=False)
  # decode_impl None: the backend's decode kernels (XLA on CPU).
  c.study = {"decode_context": 32768, "decode_batch": 1, "decode_steps": 20, "decode_impl": None}

  if smoke:
    c = _common.apply_arg(c, ["smoke"])
    # apply_arg's smoke keeps the pattern but trains MQAR only; keep the study's tasks, at 64.
    m = c.model
    m.update(num_layers=num_layers, attention_pattern=attention_pattern(variant, num_layers),
             window=16, rotary_dim=8)
    m.msa.update(block_size=16, top_k=2)
    m.moba.update(block_size=16, top_k=2)
    c.train.update(steps=6, batch_size=8, seq_len=64, warmup_steps=1, log_every=3,
                   checkpoint_every=6)
    c.data.tasks = {t: 1.0 for t in EVAL_TASKS}
    c.data.curriculum = ()
    c.data.num_workers = 0
    c.eval.update(tasks=EVAL_TASKS, lengths=(64, 128), num_examples=8, batch_size=8)
    c.study = {"decode_context": 256, "decode_batch": 1, "decode_steps": 3, "decode_impl": None}
  return c

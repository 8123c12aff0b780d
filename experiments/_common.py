"""Shared handling of the experiment argument (`--config=experiments/X.py:arg1,arg2`)."""


def parse_arg(arg):
  if arg is None:
    return []
  if isinstance(arg, (list, tuple)):
    return list(arg)
  return [a for a in str(arg).split(",") if a]


def apply_arg(c, arg):
  """`smoke`: shrink a full-size config to a few-second CPU run with the same structure
  (attention pattern, router, dispatch) — for checking a config end to end on a laptop."""
  for a in parse_arg(arg):
    if a == "smoke":
      m = c.model
      pattern = tuple(m.attention_pattern)
      m.update(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
               rotary_dim=min(m.rotary_dim, 8) if m.rotary_dim else 0, mlp_dim=128,
               num_layers=max(2, min(len(pattern), 8)), dtype="float32", remat=False)
      if len(pattern) > m.num_layers:
        m.attention_pattern = pattern[:m.num_layers]
      m.num_dense_layers = min(m.num_dense_layers, m.num_layers - 1)
      m.window = min(m.window, 32)
      m.lightning_block = 16
      m.msa.update(block_size=16, top_k=2, index_head_dim=16)
      m.moe.update(num_experts=min(m.moe.num_experts, 8), top_k=min(m.moe.top_k, 2), expert_dim=32,
                   shared_expert_dim=32)
      c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
      c.train.update(batch_size=8, seq_len=64, steps=20, warmup_steps=2, log_every=5,
                     checkpoint_every=10)
      c.data.tasks = {"mqar": 1.0}
      c.eval.update(tasks=("mqar",), lengths=(64,), num_examples=16, batch_size=8)
    else:
      raise ValueError(f"unknown experiment argument {a!r} (known: smoke)")
  return c

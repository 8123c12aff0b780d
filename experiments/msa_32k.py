"""A small MSA model trained at 32K tokens on one GPU, attention on kernels.msa_attention.

Two MSA layers (top-8 of 128-token blocks, index head dim 64, KL loss on the indexer) with dense
SwiGLU MLPs, one 32K-token MQAR sequence per step, bf16, remat. No [T, S] tensor exists in the
step: selection, sparse attention (forward and backward) and the KL run on the kernels, so the
step's memory (memory/peak_gib in metrics.jsonl) is linear in T. `smoke` shrinks it to a CPU run.

  python -m mixtral_jax.train --config=experiments/msa_32k.py --workdir=/tmp/msa32k
  python -m mixtral_jax.train --config=experiments/msa_32k.py:smoke --workdir=/tmp/msa32k_smoke
"""
from mixtral_jax.config import default_config
from mixtral_jax.experiments import _common


def get_config(arg=None):
  c = default_config()
  m = c.model
  m.update(vocab_size=256, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
           rotary_dim=64, rope_theta=500_000.0, qk_norm="per_head", mlp_dim=512,
           num_dense_layers=2, attention_pattern=("msa", "msa"), dtype="bfloat16", remat=True,
           attention_impl="pallas_triton")
  m.msa.update(block_size=128, top_k=8, index_head_dim=64, local_blocks=1, selection="per_group",
               kl_loss_weight=1.0)
  c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  c.train.update(steps=30, batch_size=1, seq_len=32768, learning_rate=3e-3, warmup_steps=5,
                 log_every=5, checkpoint_every=1000, weight_decay=0.01)
  c.data.tasks = {"mqar": 1.0}
  c.eval.update(tasks=("mqar",), lengths=(32768,), num_examples=4, batch_size=1)
  args = _common.parse_arg(arg)
  if "smoke" in args:
    m.update(attention_impl=None, dtype="float32")
    m.msa.update(block_size=16, top_k=2, index_head_dim=16)
    c.train.update(seq_len=256, steps=6, log_every=2)
    c.eval.update(lengths=(256,))
    args = [a for a in args if a != "smoke"]
  return _common.apply_arg(c, args)

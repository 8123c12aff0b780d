"""GPU check of the model with its attention on the Pallas kernels (issue 4's plug-in step).

  python3 benchmarks/check_gpu_model.py

Builds a small Transformer twice from the same seed, once with attention_impl="xla" and once per
kernel implementation, and compares logits and parameter gradients (relative L2). Also checks that
attention_impl=None ("best for the backend") falls back instead of failing on shapes or dtypes
the Hopper kernel rejects (float32, head_dim 32).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax.model.transformer import Transformer


def model_config(**kw):
  m = config_lib.model_defaults()
  m.update(vocab_size=512, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
           rotary_dim=64, mlp_dim=512, num_dense_layers=2, attention_pattern=("full",),
           dtype="bfloat16", attention_block=128)
  m.update(**kw)
  config_lib.validate_model(m)
  return m


def run(cfg, tokens):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 1])
  logits = nnx.jit(lambda m: m(tokens))(model)
  grads = nnx.jit(nnx.grad(loss))(model)
  return np.asarray(logits, np.float32), [np.asarray(g[...], np.float32)
                                           for _, g in nnx.to_flat_state(grads)]


def rel(a, b):
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  print(jax.devices()[0].device_kind, "jax", jax.__version__)
  tokens = jax.random.randint(jax.random.key(1), (2, 1024), 0, 512)
  rows = []
  for dtype, head_dim in (("bfloat16", 64), ("float32", 32)):
    base = dict(dtype=dtype, head_dim=head_dim, rotary_dim=head_dim)
    want_logits, want_grads = run(model_config(attention_impl="xla", **base), tokens)
    for impl in ("pallas_mosaic_gpu", "pallas_triton", None):
      if impl == "pallas_mosaic_gpu" and dtype == "float32":
        continue  # the Hopper kernel takes bf16/f16 only; None must fall back for this case
      t0 = time.time()
      try:
        logits, grads = run(model_config(attention_impl=impl, **base), tokens)
      except Exception as e:  # report, keep checking the others
        rows.append((dtype, head_dim, str(impl), "ERROR", type(e).__name__ + ": " + str(e)[:120]))
        continue
      grad_err = max(rel(g, w) for g, w in zip(grads, want_grads))
      rows.append((dtype, head_dim, str(impl), f"{rel(logits, want_logits):.2e}", f"{grad_err:.2e}",
                   f"{time.time() - t0:.1f}s"))
  print("\n| dtype | head_dim | attention_impl | logits rel err | max grad rel err | wall |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
  main()

"""The cache protocol (attention/cache.py): every variant's cache has a capacity, the positions its
slots hold and a chunk write; scanned layers stack them and keep the protocol per layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.model.attention import make_attention
from mixtral_jax.model.attention.cache import (EMPTY_POSITION, Cache, KVCache, LightningCache,
                                               MoBACache, MSACache, RingCache)
from mixtral_jax.model.transformer import Transformer
from test_attention import B, small_cfg

MAX_LEN = 16
# kind -> (cache type, capacity)
KINDS = {"full": (KVCache, MAX_LEN), "moba": (MoBACache, MAX_LEN), "swa": (RingCache, 5),
         "msa": (MSACache, MAX_LEN), "lightning": (LightningCache, 0)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_attention_cache_follows_the_protocol(kind):
  cfg = small_cfg()
  cache = make_attention(cfg, kind, rngs=nnx.Rngs(0)).init_cache(B, MAX_LEN, jnp.float32)
  cls, capacity = KINDS[kind]
  assert isinstance(cache, cls) and isinstance(cache, Cache)
  assert cache.capacity == capacity
  assert cache.positions.shape == (capacity,) and cache.positions.dtype == jnp.int32
  assert jax.tree.structure(cache) == jax.tree.structure(jax.jit(lambda c: c)(cache))  # a pytree


def test_linear_caches_write_the_chunk_at_its_start():
  k = jnp.arange(B * 3 * 2 * 4, dtype=jnp.float32).reshape(B, 3, 2, 4)
  kv = KVCache.zeros(B, 8, 2, 4, jnp.float32).write(k, -k, jnp.int32(2))  # traced start is fine
  np.testing.assert_array_equal(kv.k_BSKH[:, 2:5], k)
  np.testing.assert_array_equal(kv.v_BSKH[:, 2:5], -k)
  assert not np.any(kv.k_BSKH[:, :2]) and not np.any(kv.k_BSKH[:, 5:])
  np.testing.assert_array_equal(kv.positions, np.arange(8))
  msa = MSACache(KVCache.zeros(B, 8, 2, 4, jnp.float32), jnp.zeros((B, 8, 3)))
  msa = msa.write(k, k, jnp.ones((B, 3, 3)), 5)
  np.testing.assert_array_equal(msa.index_k_BSI[:, 5:].sum(), B * 3 * 3)
  np.testing.assert_array_equal(msa.kv.k_BSKH[:, 5:], k)


@pytest.mark.parametrize("max_len", [16, 14])  # a whole number of blocks, and a short last one
def test_moba_cache_block_means_kept_one_token_at_a_time_equal_a_rebuild(max_len):
  k = jax.random.normal(jax.random.key(0), (B, max_len, 2, 4))
  step = MoBACache.zeros(B, max_len, 2, 4, jnp.float32, block_size=4).write(k[:, :5], k[:, :5], 0)
  for t in range(5, max_len):
    step = jax.jit(lambda c, x, t: c.write(x, x, t))(step, k[:, t:t + 1], t)
  whole = MoBACache.zeros(B, max_len, 2, 4, jnp.float32, block_size=4).write(k, k, 0)
  want = jnp.pad(k, ((0, 0), (0, -max_len % 4), (0, 0), (0, 0))).reshape(B, -1, 4, 2, 4).mean(2)
  np.testing.assert_allclose(step.mean_BCKH, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(whole.mean_BCKH, want, rtol=1e-6, atol=1e-6)
  assert step.block_size == 4 and step.mean_BCKH.shape == (B, -(-max_len // 4), 2, 4)


def test_ring_cache_keeps_the_last_window_positions():
  ring = RingCache.zeros(1, 4, 1, 1, jnp.float32)
  np.testing.assert_array_equal(ring.positions, [EMPTY_POSITION] * 4)
  k = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1, 1) + 100  # positions 3..8
  ring = ring.write(k, k, 3)
  np.testing.assert_array_equal(ring.positions, [8, 5, 6, 7])  # slot p % 4 holds position p
  np.testing.assert_array_equal(ring.k_BWKH[0, :, 0, 0], [105, 102, 103, 104])
  ring = ring.write(k[:, :1] * 0, k[:, :1] * 0, 9)
  np.testing.assert_array_equal(ring.positions, [8, 9, 6, 7])


def test_stacked_caches_of_scanned_layers_follow_the_protocol_per_layer():
  cfg = small_cfg(num_layers=3, attention_pattern=("swa",), scan_layers=True, num_dense_layers=0,
                  vocab_size=32)
  cfg.moe.update(num_experts=2, top_k=1, expert_dim=8)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  (stacked,) = model.init_cache(B, MAX_LEN)
  assert stacked.k_BWKH.shape[0] == 3  # one ring per scanned layer
  one = jax.tree.map(lambda a: a[1], stacked)
  assert isinstance(one, RingCache) and one.capacity == cfg.window
  assert one.positions.shape == (cfg.window,)

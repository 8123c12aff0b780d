"""Grouped matmul: every implementation vs an independent one-hot oracle, forward and both gradients.

Kernels run in interpret mode on CPU. Group sizes are hypothesis-drawn (empty groups, groups of one
row, sum(group_sizes) < M) over fixed shapes with M not a multiple of the row tile, so one compile
per (implementation, dtype) serves every drawn example (the sizes are data, not shapes). Tolerances: float32 (matmul precision
'highest', conftest) 1e-5 relative to the largest entry; bfloat16 inputs against the float32 oracle of
the same bf16 values at 2e-2 (one bf16 rounding of the output and of each gradient's inputs).
"""
import functools
import logging
import os

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import grouped_matmul as gmm_lib
from mixtral_jax.kernels.grouped_matmul import api, metadata

TILES = gmm_lib.BlockSizes(block_m=8, block_k=16, block_n=16, tgmm_block_m=8, tgmm_block_d=16,
                           tgmm_block_f=16)
_SETTINGS = hypothesis.settings(
    max_examples=int(os.environ.get("GMM_HYPOTHESIS_EXAMPLES", "6")), deadline=None,
    derandomize=True, suppress_health_check=list(hypothesis.HealthCheck))


M, E = 37, 5  # 37 rows: not a multiple of any tile


@st.composite
def _sizes(draw):
  # Sizes as cut points of [0, used]: duplicates make empty groups; used < M leaves trailing rows.
  used = draw(st.integers(0, M))
  cuts = sorted(draw(st.lists(st.integers(0, used), min_size=E - 1, max_size=E - 1)))
  return np.diff([0] + cuts + [used]).astype(np.int32)


def oracle_vjp(x, w, gs, dy):
  """Forward and (dx, dw) in float64-free float32 from the one-hot reference (E x the work)."""
  f = lambda x, w: gmm_lib.gmm_dense_reference(x, w, gs)
  y, vjp = jax.vjp(f, x.astype(jnp.float32), w.astype(jnp.float32))
  return (y,) + vjp(dy.astype(jnp.float32))


@functools.lru_cache(maxsize=None)
def _vjp_fn(implementation, tiles):
  def run(x, w, gs, dy):
    fn = lambda x, w: gmm_lib.grouped_matmul(x, w, gs, implementation=implementation,
                                             block_sizes=tiles, interpret=True)
    y, vjp = jax.vjp(fn, x, w)
    return (y,) + vjp(dy)
  return jax.jit(run)


def _check(implementation, sizes, seed, dtype, m=M, d=16, f=32, tiles=TILES):
  rng = np.random.default_rng(seed)
  e = len(sizes)
  x = jnp.asarray(rng.standard_normal((m, d)), dtype)
  w = jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), dtype)
  dy = jnp.asarray(rng.standard_normal((m, f)), dtype)
  gs = jnp.asarray(sizes, jnp.int32)
  got = _vjp_fn(implementation, tiles)(x, w, gs, dy)
  want = oracle_vjp(x, w, gs, dy)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    assert a.dtype == dtype, name
    a, b = np.asarray(a, np.float32), np.asarray(b)
    scale = max(float(np.max(np.abs(b))), 1.0)
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol, err_msg=f"{implementation} {name}")
  # Rows past sum(group_sizes) are exactly zero, and so is their input gradient.
  assert np.all(np.asarray(got[0])[sizes.sum():] == 0)
  assert np.all(np.asarray(got[1])[sizes.sum():] == 0)
  return got


@pytest.mark.parametrize("implementation", ["xla", "ragged_dot", "pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@_SETTINGS
@hypothesis.given(sizes=_sizes(), seed=st.integers(0, 2**16))
def test_matches_oracle(implementation, dtype, sizes, seed):
  _check(implementation, sizes, seed, dtype=dtype)


@pytest.mark.parametrize("implementation", ["pallas_triton", "pallas_tpu"])
def test_fixed_edge_cases(implementation):
  # All rows in one group; every group empty; single-row groups straddling every tile boundary.
  for sizes in ((0, 0, 37, 0, 0), (0, 0, 0, 0, 0), (1, 7, 1, 1, 8), (8, 8, 8, 8, 5)):
    _check(implementation, np.asarray(sizes, np.int32), seed=sum(sizes), dtype=jnp.float32)


def test_oracle_can_fail():
  # A wrong group assignment (sizes shifted by one row) must be caught by the same comparison.
  with pytest.raises(AssertionError):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((10, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    got = gmm_lib.grouped_matmul(x, w, jnp.asarray([4, 6]), implementation="pallas_triton",
                                 block_sizes=TILES, interpret=True)
    want = gmm_lib.gmm_dense_reference(x, w, jnp.asarray([5, 5]))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_metadata_visits_each_tile_row_once():
  sizes = jnp.asarray([3, 0, 9, 1, 0, 2], jnp.int32)  # 15 of 20 rows; tiles of 4
  meta = metadata.group_metadata(sizes, 20, 4, trailing_group=True, visit_empty=False)
  nv = int(meta.num_visits[0])
  assert nv <= metadata.max_visits(20, 7, 4) == meta.visit_group_V.shape[0]
  covered = np.zeros(20, int)
  for v in range(nv):
    g, t = int(meta.visit_group_V[v]), int(meta.visit_tile_V[v])
    rows = np.arange(t * 4, t * 4 + 4)
    covered[rows[(rows >= int(meta.starts_G[g])) & (rows < int(meta.ends_G[g]))]] += 1
  np.testing.assert_array_equal(covered, 1)  # every row (trailing ones too) written exactly once
  # tgmm metadata: the empty groups get a visit each, groups stay in order.
  meta = metadata.group_metadata(sizes, 20, 4, trailing_group=False, visit_empty=True)
  groups = np.asarray(meta.visit_group_V)[: int(meta.num_visits[0])]
  assert set(groups.tolist()) == set(range(6)) and np.all(np.diff(groups) >= 0)


def test_default_implementation_and_fallback(caplog):
  assert gmm_lib.default_implementation("tpu") == "pallas_tpu"
  assert gmm_lib.default_implementation("gpu") == "pallas_triton"
  assert gmm_lib.default_implementation("cpu") == "xla"
  x, w, gs = jnp.ones((8, 16)), jnp.ones((2, 16, 32)), jnp.asarray([3, 5])
  api._warned.clear()
  with caplog.at_level(logging.WARNING):
    # Triton without a GPU and without interpret: falls back to xla, warning once.
    y1 = gmm_lib.grouped_matmul(x, w, gs, implementation="pallas_triton")
    y2 = gmm_lib.grouped_matmul(x, w, gs, implementation="pallas_triton")
  assert sum("falls back to xla" in r.message for r in caplog.records) == 1
  np.testing.assert_allclose(y1, gmm_lib.gmm_dense_reference(x, w, gs), atol=1e-5)
  np.testing.assert_array_equal(y1, y2)
  # A dimension the Triton tiles cannot cover (not a power of two) falls back too.
  y = gmm_lib.grouped_matmul(jnp.ones((8, 24)), jnp.ones((2, 24, 32)), gs,
                             implementation="pallas_triton", interpret=True)
  np.testing.assert_allclose(y, 24.0 * (jnp.arange(8) < 8)[:, None] * jnp.ones((8, 32)))


@pytest.mark.parametrize("bad, match", [
    (dict(x=jnp.ones((8,))), "x_MD"),
    (dict(w=jnp.ones((2, 15, 32))), "w_EDF"),
    (dict(w=jnp.ones((2, 16, 32), jnp.bfloat16)), "dtype"),
    (dict(gs=jnp.asarray([1.0, 2.0])), "group_sizes_E"),
    (dict(gs=jnp.asarray([1, 2, 3])), "group_sizes_E"),
    (dict(implementation="cuda"), "implementation"),
    (dict(block_sizes=(8, 8, 8)), "block_sizes"),
])
def test_validation_names_the_argument(bad, match):
  kw = dict(x=jnp.ones((8, 16)), w=jnp.ones((2, 16, 32)), gs=jnp.asarray([3, 5]))
  extra = {k: bad.pop(k) for k in ("implementation", "block_sizes") if k in bad}
  kw.update(bad)
  with pytest.raises(ValueError, match=match):
    gmm_lib.grouped_matmul(kw["x"], kw["w"], kw["gs"], **extra)
  with pytest.raises(ValueError, match="block_m"):
    gmm_lib.BlockSizes(block_m=0)

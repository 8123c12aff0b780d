"""XLA references for the grouped matmuls (what the kernels are tested against, and the CPU path).

  gmm(x_MD, w_EDF, group_sizes_E)   y[m] = x[m] @ w[group(m)]   (rows past sum(group_sizes): 0)
  gmm(..., transpose_rhs=True)      y[m] = x[m] @ w[group(m)].T  (w is then [E, F, D])
  tgmm(x_MD, dy_MF, group_sizes_E)  dw[e] = x[rows of e].T @ dy[rows of e]  -> [E, D, F]

"blocked": each group's rows padded to whole blocks of `block` rows and one batched matmul over the
blocks with each block's expert matrix gathered (MegaBlocks-style). On CPU XLA lowers ragged_dot to
one masked dense matmul per group (E times the work), so this is the fast CPU path; the padding
costs at most E blocks of rows.
"""
import jax
import jax.numpy as jnp


def _blocks(group_sizes_E, m, block):
  """(row_M: each row's place in the padded buffer, block_expert_n: each block's group, n)."""
  e = group_sizes_E.shape[0]
  sizes = group_sizes_E.astype(jnp.int32)
  num_blocks = -(-m // block) + e                       # each group wastes less than one block
  padded_E = -(-sizes // block) * block
  padded_start_E = jnp.cumsum(padded_E) - padded_E
  start_E = jnp.cumsum(sizes) - sizes
  # Rows past sum(group_sizes) get group e (none): they land on the spare block index.
  expert_M = jnp.sum(jnp.arange(m)[:, None] >= jnp.cumsum(sizes)[None, :], axis=1)
  valid_M = expert_M < e
  expert_M = jnp.minimum(expert_M, e - 1)
  row_M = jnp.where(valid_M, padded_start_E[expert_M] + jnp.arange(m) - start_E[expert_M],
                    num_blocks * block)
  # Block i belongs to the group whose padded range holds row i*block (unused blocks: the last).
  block_expert = jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(num_blocks) * block, side="right")
  return row_M, jnp.minimum(block_expert, e - 1), num_blocks


def _pad_rows(x_MD, row_M, num_blocks, block):
  # One spare row past the blocks takes the rows outside every group (then dropped).
  buf = jnp.zeros((num_blocks * block + 1, x_MD.shape[1]), x_MD.dtype).at[row_M].set(x_MD)
  return buf[:-1].reshape(num_blocks, block, -1)


def gmm_blocked(x_MD, w_EDF, group_sizes_E, *, transpose_rhs=False, block=128):
  """Blocked grouped matmul; [M, F] in x's dtype (float32 accumulation)."""
  m = x_MD.shape[0]
  block = max(1, min(block, m))
  row_M, block_expert, n = _blocks(group_sizes_E, m, block)
  x_nbD = _pad_rows(x_MD, row_M, n, block)
  w_nDF = w_EDF[block_expert]
  eq = "nbD,nFD->nbF" if transpose_rhs else "nbD,nDF->nbF"
  y_nbF = jnp.einsum(eq, x_nbD, w_nDF, preferred_element_type=jnp.float32).astype(x_MD.dtype)
  y_PF = jnp.concatenate([y_nbF.reshape(n * block, -1), jnp.zeros((1, y_nbF.shape[-1]), x_MD.dtype)])
  return y_PF[row_M]


def tgmm_blocked(x_MD, dy_MF, group_sizes_E, *, block=128):
  """Blocked per-group x^T dy; [E, D, F] in x's dtype (empty groups: 0)."""
  m, e = x_MD.shape[0], group_sizes_E.shape[0]
  block = max(1, min(block, m))
  row_M, block_expert, n = _blocks(group_sizes_E, m, block)
  dw_nDF = jnp.einsum("nbD,nbF->nDF", _pad_rows(x_MD, row_M, n, block),
                      _pad_rows(dy_MF, row_M, n, block), preferred_element_type=jnp.float32)
  return jax.ops.segment_sum(dw_nDF, block_expert, num_segments=e,
                             indices_are_sorted=True).astype(x_MD.dtype)


def gmm_ragged_dot(x_MD, w_EDF, group_sizes_E, *, transpose_rhs=False):
  """jax.lax.ragged_dot (XLA's native grouped matmul; on GPU XLA expands it E-fold)."""
  if transpose_rhs:
    w_EDF = jnp.swapaxes(w_EDF, 1, 2)
  # Precision pinned from the dtype: a global 'highest' default on bf16 makes XLA:TPU's own Mosaic
  # ragged-dot kernels fail to compile ("Bad lhs type").
  return jax.lax.ragged_dot(x_MD, w_EDF, group_sizes_E.astype(jnp.int32), precision=_precision(x_MD))


def _precision(x):
  return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def tgmm_ragged_dot(x_MD, dy_MF, group_sizes_E):
  """Per-group x^T dy through ragged_dot's transpose (ragged contracting dimension)."""
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[])
  return jax.lax.ragged_dot_general(x_MD, dy_MF, group_sizes_E.astype(jnp.int32), dims,
                                    preferred_element_type=jnp.float32).astype(x_MD.dtype)


def gmm_dense_reference(x_MD, w_EDF, group_sizes_E, *, transpose_rhs=False):
  """Naive oracle for tests: each row times its group's matrix via a [M, E] one-hot (E x the work)."""
  m, e = x_MD.shape[0], w_EDF.shape[0]
  ends = jnp.cumsum(group_sizes_E.astype(jnp.int32))
  g_M = jnp.sum(jnp.arange(m)[:, None] >= ends[None, :], axis=1)
  onehot_ME = jax.nn.one_hot(g_M, e, dtype=jnp.float32)   # all-zero rows past sum(group_sizes)
  eq = "MD,EFD->MEF" if transpose_rhs else "MD,EDF->MEF"
  y = jnp.einsum(eq, x_MD.astype(jnp.float32), w_EDF.astype(jnp.float32))
  return jnp.einsum("MEF,ME->MF", y, onehot_ME)

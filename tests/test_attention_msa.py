"""MSA (MiniMax sparse attention): naive reference, decode == forward, KL loss, HF MiniMax-M3 parity.

Sequences of 64 tokens in blocks of 8 with top_k 2, so most blocks are dropped for late queries.
Tolerances: float32 model vs float64 naive reference at 2e-5; decode vs forward and HF at 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_naive as naive
from mixtral_jax.kernels.block_sparse_attention import selection
from mixtral_jax.model.attention import msa
from test_attention import B, D, build, close, decode, forward, inputs, small_cfg

T = 64


def naive_index(m, x, cfg):
  """Index queries [B, T, K, I] and keys [B, T, I] in float64, positions 0..T-1."""
  xs = naive.np_(x)
  assert cfg.msa.index_head_dim >= cfg.rotary_dim  # HF rotates the index dims with the main rope
  pos = np.arange(x.shape[1], dtype=np.float64)
  iq = np.einsum("btd,dki->btki", xs, naive.np_(m.indexer.q_proj.kernel[...]))
  ik = np.einsum("btd,di->bti", xs, naive.np_(m.indexer.k_proj.kernel[...]))[:, :, None]
  iq = naive.rmsnorm(iq, naive.np_(m.indexer.q_norm.scale[...]), cfg.norm_eps, cfg.norm_zero_centered)
  ik = naive.rmsnorm(ik, naive.np_(m.indexer.k_norm.scale[...]), cfg.norm_eps, cfg.norm_zero_centered)
  iq = np.stack([naive.rope(a, pos, cfg.rotary_dim, cfg.rope_theta) for a in iq])
  ik = np.stack([naive.rope(a, pos, cfg.rotary_dim, cfg.rope_theta) for a in ik])[:, :, 0]
  return iq, ik


def naive_msa(m, x, cfg):
  """Allowed keys per (batch, group, query), index scores [B, K, T, T] and main q/k/v."""
  q, k, v = naive.qkv(m, x, cfg)
  mc, kh = cfg.msa, cfg.num_kv_heads
  iq, ik = naive_index(m, x, cfg)
  s = np.einsum("btki,bsi->bkts", iq, ik)
  bs, t = mc.block_size, x.shape[1]
  table = {}
  for b in range(x.shape[0]):
    for i in range(t):
      nblk = i // bs + 1
      block = np.array([[s[b, g, i, c * bs:min((c + 1) * bs, i + 1)].max() for c in range(nblk)]
                        for g in range(kh)])
      if mc.selection == "max_heads":
        block = np.broadcast_to(block.max(0), block.shape)
      forced = [max(i // bs - l, 0) for l in range(mc.local_blocks)]
      for g in range(kh):
        table[b, g, i] = naive.blocks_to_keys(naive.top_blocks(block[g], forced, mc.top_k), bs, i)
  return table, s, q, k, v


def naive_kl(table, s, q, k, cfg):
  g = cfg.num_heads // cfg.num_kv_heads
  total = []
  for (b, grp, i), js in table.items():
    js = np.asarray(js)
    p = 0
    for h in range(grp * g, (grp + 1) * g):
      z = k[b, js, grp] @ q[b, i, h] / np.sqrt(cfg.head_dim)
      e = np.exp(z - z.max())
      p = p + e / e.sum() / g
    z = s[b, grp, i, js] / np.sqrt(cfg.msa.index_head_dim)
    logq = z - z.max() - np.log(np.exp(z - z.max()).sum())
    total.append(np.sum(p * (np.log(p) - logq)))
  return np.mean(total)


@pytest.mark.parametrize("selection,local_blocks,top_k,qk_norm,heads", [
    ("per_group", 1, 2, "per_head", (4, 2)),
    ("max_heads", 1, 2, "full", (4, 2)),
    ("per_group", 2, 3, "none", (6, 3)),
])
def test_msa_matches_naive(selection, local_blocks, top_k, qk_norm, heads):
  cfg = small_cfg(qk_norm=qk_norm, num_heads=heads[0], num_kv_heads=heads[1],
                  norm_zero_centered=qk_norm == "per_head", **{
                      "msa.selection": selection, "msa.local_blocks": local_blocks,
                      "msa.top_k": top_k, "msa.kl_loss_weight": 0.5})
  m = build(cfg, "msa")
  x, pos = inputs(T)
  y, losses = forward(m, x, pos)
  table, s, q, k, v = naive_msa(m, x, cfg)
  close(y, naive.out(m, naive.attend(q, k, v, lambda b, g, i: table[b, g, i])))
  close(losses["msa_kl"], 0.5 * naive_kl(table, s, q, k, cfg))
  # Blocks really are dropped, and per-group selections differ unless shared by construction.
  assert len(table[0, 0, T - 1]) == top_k * cfg.msa.block_size < T
  differ = any(table[b, 0, i] != table[b, 1, i] for b in range(B) for i in range(T))
  assert differ == (selection == "per_group")


def test_msa_decode_matches_forward():
  cfg = small_cfg(qk_norm="per_head", norm_zero_centered=True, **{"msa.kl_loss_weight": 0.1})
  m = build(cfg, "msa")
  x, pos = inputs(T, seed=5)
  y_full, _ = forward(m, x, pos)
  chunks = (20,) + (1,) * 12 + (13,) + (1,) * 19
  close(decode(m, x, chunks, max_len=T + 3), y_full, tol=1e-5)


def test_msa_kl_trains_only_the_indexer():
  cfg = small_cfg(qk_norm="per_head", **{"msa.kl_loss_weight": 1.0})
  m = build(cfg, "msa")
  x, pos = inputs(32)

  kl_grads = nnx.jit(nnx.grad(lambda m: m(x, pos)[2]["msa_kl"]))(m)
  y_grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, pos)[0] ** 2)))(m)
  for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
    for leaf in jax.tree.leaves(kl_grads[name]):
      assert not np.any(np.asarray(leaf)), name
  for leaf in jax.tree.leaves(kl_grads["indexer"]):
    assert np.all(np.isfinite(np.asarray(leaf))) and np.any(np.asarray(leaf))
  # The indexer reaches the output only through the discrete block choice.
  for leaf in jax.tree.leaves(y_grads["indexer"]):
    assert not np.any(np.asarray(leaf))
  # ... and the KL never reaches the hidden state (the indexer reads a detached copy).
  gx = nnx.jit(jax.grad(lambda x, m: m(x, pos)[2]["msa_kl"]))(x, m)
  assert not np.any(np.asarray(gx))
  kl = forward(m, x, pos)[1]["msa_kl"]
  assert np.isfinite(kl) and kl > 0


def test_msa_no_loss_at_zero_weight():
  m = build(small_cfg(), "msa")
  x, pos = inputs(16)
  assert forward(m, x, pos)[1] == {}


def test_msa_matches_hf_minimax_m3():
  torch = pytest.importorskip("torch")
  from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf

  cfg = small_cfg(qk_norm="per_head", norm_zero_centered=True, rotary_dim=4,
                  **{"msa.index_head_dim": 8, "msa.top_k": 2, "msa.block_size": 8})
  m = build(cfg, "msa")
  hcfg = hf.MiniMaxM3VLTextConfig(
      hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rotary_dim=4,
      num_hidden_layers=1, rms_norm_eps=cfg.norm_eps, index_n_heads=2, index_head_dim=8,
      index_block_size=8, index_topk_blocks=2, index_local_blocks=1,
      layer_types=["minimax_m3_sparse"], mlp_layer_types=["sparse"],
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                       "partial_rotary_factor": 0.5})
  hcfg._attn_implementation = "eager"
  ref = hf.MiniMaxM3VLAttention(hcfg, layer_idx=0).eval()
  t = lambda a: torch.tensor(np.asarray(a))
  with torch.no_grad():
    for name in ("q_proj", "k_proj", "v_proj"):
      getattr(ref, name).weight.copy_(t(getattr(m, name).kernel[...]).reshape(D, -1).T)
    ref.o_proj.weight.copy_(t(m.o_proj.kernel[...]).reshape(-1, D).T)
    ref.indexer.q_proj.weight.copy_(t(m.indexer.q_proj.kernel[...]).reshape(D, -1).T)
    ref.indexer.k_proj.weight.copy_(t(m.indexer.k_proj.kernel[...]).T)
    for mod, ours in ((ref, m), (ref.indexer, m.indexer)):
      mod.q_norm.weight.copy_(t(ours.q_norm.scale[...]))  # both store w with scale 1 + w
      mod.k_norm.weight.copy_(t(ours.k_norm.scale[...]))
  x, pos = inputs(T)
  y, _ = forward(m, x, pos)
  cos, sin = hf.MiniMaxM3VLRotaryEmbedding(hcfg)(t(x), t(pos).long())
  assert cos.shape[-1] == cfg.rotary_dim
  with torch.no_grad():
    y_ref, _ = ref(t(x), (cos, sin), None, position_ids=t(pos).long())
    hf_idx = ref.indexer(t(x), (cos, sin), None, t(pos).long())
  close(y, y_ref.numpy(), tol=1e-5)
  # Same block choice: HF index lists vs our block mask.
  ccos, csin = m.rope(pos)
  iq, ik = m.indexer(x, ccos, csin)
  ours = msa.msa_selection(msa.index_scores(iq, ik, pos, pos), pos, cfg.msa)
  hf_mask = selection.block_mask_from_indices(jnp.asarray(hf_idx.numpy()), T // cfg.msa.block_size)
  np.testing.assert_array_equal(ours, hf_mask)
  assert int(hf_mask[0, 0, T - 1].sum()) == 2  # sparse: 2 of 8 blocks

"""The assembled Transformer: decode == forward for every attention variant, generation, and the
parameter counts of the full-size configs through jax.eval_shape (no memory)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax.experiments import (minimax_m2, minimax_m2_lightning_hybrid, minimax_m2_swa_hybrid,
                                     minimax_m3_msa, mixtral_8x7b)
from mixtral_jax.model import generate
from mixtral_jax.model.transformer import Transformer, count_params


def tiny(pattern, **kw):
  m = config_lib.model_defaults()
  m.update(vocab_size=64, d_model=32, num_layers=len(pattern), num_heads=4, num_kv_heads=2,
           head_dim=8, rotary_dim=4, mlp_dim=48, num_dense_layers=1, attention_pattern=pattern,
           window=8, lightning_block=8)
  m.msa.update(block_size=8, top_k=2, index_head_dim=8)
  m.moba.update(block_size=8, top_k=2)
  m.moe.update(num_experts=4, top_k=2, expert_dim=16)
  m.update(**kw)
  config_lib.validate_model(m)
  return m


PATTERNS = {
    "mixtral": dict(pattern=("full",)),
    "m2": dict(pattern=("full",), qk_norm="full"),
    "swa_hybrid": dict(pattern=("swa", "swa", "full")),
    "lightning_hybrid": dict(pattern=("lightning", "lightning", "full")),
    "msa": dict(pattern=("full", "msa", "msa"), qk_norm="per_head", norm_zero_centered=True),
    "moba": dict(pattern=("full", "moba")),
    "minimax01_residual": dict(pattern=("lightning", "full"), post_norm_residual=True),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_prefill_then_decode_equals_forward(name):
  kw = dict(PATTERNS[name])
  cfg = tiny(kw.pop("pattern"), **kw)
  if name == "m2":
    cfg.moe.update(router="sigmoid", use_bias=True)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  T, P = 40, 21  # long enough for MSA/MoBA to drop blocks and SWA to slide
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
  full = model(tokens)
  logits, cache = generate.prefill(model, tokens[:, :P], max_len=T)
  np.testing.assert_allclose(logits, full[:, :P], atol=2e-5, rtol=2e-5)
  for t in range(P, T):
    step_logits, cache = generate.decode_step(model, tokens[:, t:t + 1], t, cache)
    np.testing.assert_allclose(step_logits, full[:, t], atol=2e-5, rtol=2e-5,
                               err_msg=f"{name}: decode step at position {t}")


def test_generate_greedy_matches_argmax_of_forward():
  cfg = tiny(("swa", "full"))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
  out = generate.generate(model, prompt, 6)
  forward = nnx.jit(lambda m, x: m(x))  # eager, each of the 6 prefixes ran op by op (~50 s on CPU)
  for t in range(12, 18):  # each generated token is the argmax of the full forward on its prefix
    np.testing.assert_array_equal(out[:, t], jnp.argmax(forward(model, out[:, :t])[:, -1], -1))


def _pattern_model(name):
  kw = dict(PATTERNS[name])
  cfg = tiny(kw.pop("pattern"), **kw)
  if name == "m2":
    cfg.moe.update(router="sigmoid", use_bias=True)
  return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", list(PATTERNS))
def test_generate_ragged_prompts_equal_each_row_alone(name):
  """Prompts of 5, 9 and 7 tokens in one batch (right-padded with random tokens, which must never
  be read): each row gets the 4 greedy tokens `generate` gives that row alone. 9 + 4 > window 8
  and lightning_block 8: the ring slides and the recurrent state crosses a block after the
  common prefix, where a padded prefill would have written pads into both."""
  model = _pattern_model(name)
  lengths, n, S = (5, 9, 7), 4, 16  # one cache size for every call: fewer compiles
  T = max(lengths)
  prompt = jax.random.randint(jax.random.key(6), (3, T), 0, model.cfg.vocab_size)
  out, out_lengths = generate.generate(model, prompt, n, prompt_lengths=lengths, max_len=S,
                                       pad_id=-1)
  assert out.shape == (3, T + n) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out_lengths, np.array(lengths) + n)
  for b, length in enumerate(lengths):
    alone = generate.generate(model, prompt[b:b + 1, :length], n, max_len=S)
    np.testing.assert_array_equal(out[b, :length + n], alone[0], err_msg=f"{name}: row {b}")
    assert (out[b, length + n:] == -1).all()


def test_generate_prompt_lengths_none_is_the_rectangular_batch():
  """prompt_lengths=None returns the plain [B, T + n] array; lengths all equal to T take the
  per-row path and draw exactly the same samples (same keys, same positions)."""
  model = _pattern_model("swa_hybrid")
  prompt = jax.random.randint(jax.random.key(7), (2, 6), 0, model.cfg.vocab_size)
  kw = dict(rng=jax.random.key(3), temperature=1.0, top_p=0.9)
  out = generate.generate(model, prompt, 5, **kw)
  assert isinstance(out, jax.Array) and out.shape == (2, 11)
  same, out_lengths = generate.generate(model, prompt, 5, prompt_lengths=[6, 6], **kw)
  np.testing.assert_array_equal(same, out)
  np.testing.assert_array_equal(out_lengths, [11, 11])
  # No new tokens: the prompts come back, padded past each row's length.
  only, _ = generate.generate(model, prompt, 0, prompt_lengths=np.array([2, 4]), pad_id=-1)
  np.testing.assert_array_equal(only, jnp.where(jnp.arange(4) < jnp.array([[2], [4]]),
                                                prompt[:, :4], -1))


def test_top_p_sampling_keeps_only_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.vmap(lambda k: generate.sample(logits, k, temperature=1.0, top_p=0.7))(
      jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(draws).tolist()) == {0, 1}
  greedy = generate.sample(logits, jax.random.key(0))
  assert int(greedy[0]) == 0


def _abstract_counts(cfg):
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  return count_params(model, cfg.model)


@pytest.mark.parametrize("module, total, active, embed_free", [
    # Mixtral 8x7B: 46.7B total / 12.9B active (with embeddings), as published.
    (mixtral_8x7b, (46.6e9, 46.8e9), (12.8e9, 13.0e9), False),
    # MiniMax-M2: 229.9B published includes multi-token-prediction modules that this model does not
    # build; the 62 decoder layers and embeddings come to 228.7B. Active 9.8B without embeddings.
    (minimax_m2, (228.6e9, 230.9e9), (9.75e9, 9.85e9), True),
])
def test_full_size_parameter_counts(module, total, active, embed_free):
  cfg = module.get_config()
  config_lib.validate(cfg)
  counts = _abstract_counts(cfg)
  a = counts["active_no_embed"] if embed_free else counts["active"]
  assert total[0] < counts["total"] < total[1], counts
  assert active[0] < a < active[1], counts
  # FLOP estimates count the active parameters a token multiplies through: not the input gather.
  m = cfg.model
  assert counts["active_matmul"] == counts["active"] - m.vocab_size * m.d_model


@pytest.mark.parametrize("module", [minimax_m2_swa_hybrid, minimax_m2_lightning_hybrid, minimax_m3_msa])
def test_full_size_variants_build_abstractly(module):
  cfg = module.get_config()
  config_lib.validate(cfg)
  counts = _abstract_counts(cfg)
  assert counts["total"] > 1e11 and counts["active"] < counts["total"] / 5


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_triton"])
def test_pallas_kernel_in_the_model_matches_xla(impl, monkeypatch):
  """attention_impl switches full attention onto the block-sparse kernel (interpret mode on CPU);
  logits and parameter gradients match the XLA path. SWA layers run on it too, with the window.
  (tests/test_swa_moba_kernels.py covers swa and moba layers in detail.)"""
  cfg = tiny(("full", "swa"), attention_block=8)
  tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, cfg.vocab_size)

  def logits_and_grads(impl_name):
    c = cfg.copy_and_resolve_references()
    c.attention_impl = impl_name
    model = Transformer(c, rngs=nnx.Rngs(0))
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])
    return model(tokens), nnx.grad(loss)(model)

  from mixtral_jax import kernels
  calls = []
  real = kernels.block_sparse_attention
  monkeypatch.setattr(kernels, "block_sparse_attention",
                      lambda *a, **kw: calls.append(kw["implementation"]) or real(*a, **kw))
  want_logits, want_grads = logits_and_grads("xla")
  assert not calls
  got_logits, got_grads = logits_and_grads(impl)
  assert calls and set(calls) == {impl}  # the full and swa layers really ran on the kernel
  assert len(calls) >= 2
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-5, rtol=2e-5)
  for (path, g), (_, w) in zip(nnx.to_flat_state(got_grads), nnx.to_flat_state(want_grads)):
    np.testing.assert_allclose(g[...], w[...], atol=1e-5, rtol=1e-4, err_msg=str(path))


def test_scanned_layers_equal_unrolled_layers_and_decode():
  """scan_layers stacks runs of identical layers (here 1 dense + 3 MoE full layers -> 1 + scan(3))
  and must compute exactly what the unrolled stack computes, in forward and in decode."""
  cfg = tiny(("full",), num_layers=4, num_dense_layers=1)
  unrolled = Transformer(cfg, rngs=nnx.Rngs(0))
  scfg = cfg.copy_and_resolve_references()
  scfg.scan_layers = True
  scanned = Transformer(scfg, rngs=nnx.Rngs(1))
  assert [type(l).__name__ for l in scanned.layers] == ["Block", "ScannedBlocks"]
  # Transplant the unrolled weights (and router biases) into the stacked layout.
  per_layer = [nnx.state(unrolled.layers[i]) for i in (1, 2, 3)]
  nnx.update(scanned.layers[1].blocks, jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer))
  for name in ("embed", "final_norm", "lm_head"):
    nnx.update(getattr(scanned, name), nnx.state(getattr(unrolled, name)))
  nnx.update(scanned.layers[0], nnx.state(unrolled.layers[0]))
  tokens = jax.random.randint(jax.random.key(4), (2, 24), 0, cfg.vocab_size)
  want, _, want_aux = unrolled.forward(tokens)
  got, _, got_aux = scanned.forward(tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got_aux["load"], want_aux["load"])
  _, cache = generate.prefill(scanned, tokens[:, :13], max_len=24)
  for t in range(13, 24):
    step, cache = generate.decode_step(scanned, tokens[:, t:t + 1], t, cache)
    np.testing.assert_allclose(step, want[:, t], atol=2e-5, rtol=2e-5)


def test_scanned_parameters_are_created_sharded():
  from mixtral_jax import sharding
  cfg = tiny(("full",), num_layers=3, num_dense_layers=0, scan_layers=True)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2, tensor=1))
  with jax.set_mesh(mesh):
    model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()
  gate_proj = model.layers[0].blocks.mlp.gate_proj[...]
  assert gate_proj.shape == (3, 4, 32, 16)  # [layers, experts, D, F]
  assert tuple(gate_proj.sharding.spec)[:3] == (None, "expert", "fsdp")


def test_generate_and_sample_reject_bad_arguments():
  cfg = tiny(("full",))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  prompt = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="max_len"):  # the cache could not hold every position
    generate.generate(model, prompt, 8, max_len=6)
  with pytest.raises(ValueError, match="top_p"):
    generate.sample(jnp.zeros((1, 4)), jax.random.key(0), temperature=1.0, top_p=0.0)


def test_weight_decay_skips_norm_scales_of_scanned_layers():
  from mixtral_jax.trainer import optim
  cfg = tiny(("full",), num_layers=3, num_dense_layers=0, scan_layers=True)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  mask = optim._decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  flat = {"/".join(map(str, p)): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  scales = [k for k in flat if "scale" in k]
  assert scales and not any(flat[k] for k in scales)  # stacked [3, D] norm scales: no decay
  assert all(flat[k] for k in flat if "gate_proj" in k or "q_proj" in k)


@pytest.mark.parametrize("name, selection", [("mixtral", None), ("msa", "per_group"),
                                             ("msa", "max_heads"), ("moba", None)])
def test_decode_step_on_decode_kernels_equals_forward(name, selection, monkeypatch):
  """attention_impl='pallas_tpu' (interpret mode on CPU) moves the decode step of full and MSA
  layers onto `kernels.decode_attention` (dense_decode; MSA block scores + sparse decode; MoBA
  scores from the cached block means + sparse decode) with a cache that is a whole number of
  kernel blocks; prefill-then-decode still equals the forward, with MSA's top-3 of 16-token
  blocks and MoBA's top-2 of 8 dropping blocks, and greedy `generate` works on it."""
  from mixtral_jax.kernels import decode_attention as da
  kw = dict(PATTERNS[name])
  cfg = tiny(kw.pop("pattern"), attention_impl="pallas_tpu", **kw)
  cfg.msa.update(block_size=16, top_k=3, local_blocks=1)
  if selection:
    cfg.msa.selection = selection
  calls = []
  for fn in ("dense_decode", "msa_block_scores", "summary_block_scores", "sparse_decode"):
    real = getattr(da, fn)
    monkeypatch.setattr(da, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(
        (_fn, k["implementation"])) or _real(*a, **k))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  T, P, S = 60, 52, 256  # 52 > 3 blocks of 16: MSA drops blocks
  tokens = jax.random.randint(jax.random.key(5), (2, T), 0, cfg.vocab_size)
  full = model(tokens)
  assert not calls  # the forward and the prefill below stay off the decode kernels
  _, cache = generate.prefill(model, tokens[:, :P], max_len=S)
  assert not calls
  for t in range(P, T):
    step_logits, cache = generate.decode_step(model, tokens[:, t:t + 1], t, cache)
    np.testing.assert_allclose(step_logits, full[:, t], atol=1e-5, rtol=1e-5,
                               err_msg=f"{name}: decode step at position {t}")
  sparse = {"msa": "msa_block_scores", "moba": "summary_block_scores"}.get(name)
  want = {("dense_decode", "pallas_tpu")} | (
      {(sparse, "pallas_tpu"), ("sparse_decode", "pallas_tpu")} if sparse else set())
  assert set(calls) == want  # the kernels really ran: a named kernel raises instead of falling back
  out = generate.generate(model, tokens[:, :P], 3, max_len=S)
  for t in range(P, P + 3):
    np.testing.assert_array_equal(out[:, t], jnp.argmax(model(out[:, :t])[:, -1], -1))

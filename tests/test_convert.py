"""Hugging Face conversion: parity with the transformers reference models, round trips, bad input.

For each family a tiny random model is built with transformers' own config class, its weights
re-drawn at a scale where attention, routing and the MSA indexer matter (not the 0.02 init), saved
with save_pretrained, converted with `from_hf` and compared in float32: logits within 1e-4 of the
logits' scale, greedy generation of 16 tokens identical (ours through the KV-cache decode path),
and `to_hf` -> transformers / `from_hf` round trips bit-identical.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mixtral_jax import config as config_lib  # noqa: E402
from mixtral_jax import sharding  # noqa: E402
from mixtral_jax.convert import (  # noqa: E402
    MissingTensorError, TensorShapeError, UnexpectedTensorError, UnsupportedConfigError, from_hf,
    hf_config, safetensors_io, to_hf)
from mixtral_jax.model.generate import generate  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
              num_experts_per_tok=2, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _mixtral():
  return transformers.MixtralConfig(**COMMON), transformers.MixtralForCausalLM


def _m2():
  return (transformers.MiniMaxM2Config(**COMMON, rotary_dim=8, rms_norm_eps=1e-6),
          transformers.MiniMaxM2ForCausalLM)


def _minimax():
  # Lightning at layers 0, 1 and 3 (each with its own decay slopes), softmax at 2; MiniMax-01's
  # post-norm residual with non-trivial alpha/beta; a lightning block shorter than the sequence.
  cfg = transformers.MiniMaxConfig(
      **COMMON, layer_types=["linear_attention", "linear_attention", "full_attention",
                             "linear_attention"],
      block_size=16, full_attn_alpha_factor=1.5, full_attn_beta_factor=0.7,
      linear_attn_alpha_factor=0.8, linear_attn_beta_factor=1.2, mlp_alpha_factor=1.1,
      mlp_beta_factor=0.9)
  return cfg, transformers.MiniMaxForCausalLM


def _m3():
  from transformers.models.minimax_m3_vl import MiniMaxM3VLForCausalLM, MiniMaxM3VLTextConfig
  # Dense first layer, MSA at layers 1 and 3: with 8-token index blocks, top-2 blocks and 64
  # tokens, every query past position 16 has more visible blocks than it keeps.
  cfg = MiniMaxM3VLTextConfig(
      **COMMON, dense_intermediate_size=48, shared_intermediate_size=24, rotary_dim=8,
      partial_rotary_factor=0.5, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
      layer_types=["full_attention", "minimax_m3_sparse", "full_attention", "minimax_m3_sparse"],
      index_n_heads=2, index_head_dim=16, index_block_size=8, index_topk_blocks=2,
      index_local_blocks=1, swiglu_limit=1.5)
  return cfg, MiniMaxM3VLForCausalLM


FAMILIES = {"mixtral": _mixtral, "minimax_m2": _m2, "minimax": _minimax, "minimax_m3_vl_text": _m3}
SEQ = 64


def _randomize(model, seed):
  """Weights at a scale where softmax, routing and block selection are far from uniform."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # norm weights: ones (or zeros when zero-centered) plus noise
        p.add_(0.3 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.2 * torch.randn(b.shape, generator=g))


def _build(family, tmp_path, seed=0):
  cfg, cls = FAMILIES[family]()
  torch.manual_seed(seed)
  model = cls(cfg).eval()
  _randomize(model, seed)
  path = str(tmp_path / family)
  model.save_pretrained(path)
  return model, path


def _logits(hf_model, tokens):
  with torch.no_grad():
    return hf_model(torch.tensor(tokens)).logits.float().numpy()


def _params(model):
  from flax import nnx
  from mixtral_jax.model.router import RouterBias
  state = nnx.state(model, (nnx.Param, RouterBias))
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_generation_round_trip(family, tmp_path):
  hf_model, path = _build(family, tmp_path)
  t0 = time.perf_counter()
  model, config = from_hf(path, progress=False)
  convert_s = time.perf_counter() - t0
  tokens = np.random.RandomState(1).randint(0, COMMON["vocab_size"], (2, SEQ))
  picked = []
  indexers = [m for n, m in hf_model.named_modules() if n.endswith("self_attn.indexer")]
  hooks = [m.register_forward_hook(lambda mod, args, out: picked.append(out)) for m in indexers]
  ref = _logits(hf_model, tokens)
  for h in hooks:
    h.remove()
  if family == "minimax_m3_vl_text":
    # The index branch really drops blocks: late queries see 8 causal blocks and keep 2.
    assert len(picked) == 2
    for idx in picked:  # [B, K, T, top_k] block ids, -1 = empty slot
      kept = (idx >= 0).sum(-1)
      visible = torch.arange(SEQ) // 8 + 1
      assert bool((kept < visible).any()) and int(kept.max()) == 2
  ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  scale = float(np.abs(ref).max())
  diff = float(np.abs(ours - ref).max())
  print(f"\n{family}: max |logit diff| = {diff:.3g} (logit scale {scale:.3g}), from_hf {convert_s:.2f}s")
  assert scale > 1.0, "logits too small for the comparison to mean anything"
  assert diff <= 1e-4 * scale, (family, diff, scale)

  prompt = tokens[:, :SEQ - 16]
  with torch.no_grad():
    theirs = hf_model.generate(torch.tensor(prompt), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False, pad_token_id=0).numpy()
  ours_gen = np.asarray(generate(model, jnp.asarray(prompt, jnp.int32), 16))
  np.testing.assert_array_equal(ours_gen, theirs)

  out = str(tmp_path / f"{family}_out")
  to_hf(model, config, out, progress=False)
  again, config2 = from_hf(out, progress=False)
  assert config2.model.to_dict() == config.model.to_dict()
  p1, p2 = _params(model), _params(again)
  assert p1.keys() == p2.keys()
  for k in p1:
    assert p1[k].dtype == p2[k].dtype and np.array_equal(p1[k], p2[k]), k
  # transformers loads what to_hf wrote into exactly the original weights.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(reloaded) is type(hf_model)
  sd0, sd1 = hf_model.state_dict(), reloaded.state_dict()
  assert sd0.keys() == sd1.keys()
  for k in sd0:
    if k.split(".")[-1] in ("slope_rate", "query_decay", "key_decay", "diagonal_decay"):
      # Lightning decay buffers: recomputed from our slopes, equal up to float32 rounding.
      torch.testing.assert_close(sd0[k], sd1[k], rtol=1e-5, atol=1e-7)
    else:
      assert torch.equal(sd0[k], sd1[k]), k


def test_sharded_checkpoint_onto_mesh(tmp_path):
  """A sharded checkpoint (index.json) read onto a data x expert x tensor mesh."""
  cfg, cls = _mixtral()
  torch.manual_seed(0)
  hf_model = cls(cfg).eval()
  _randomize(hf_model, 0)
  path = str(tmp_path / "sharded")
  hf_model.save_pretrained(path, max_shard_size="100KB")
  assert os.path.exists(os.path.join(path, safetensors_io.INDEX_FILE))
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=2, tensor=2))
  model, config = from_hf(path, mesh=mesh, progress=False)
  experts = model.layers[0].mlp.gate_proj[...]
  assert experts.sharding.spec == sharding.logical_to_spec(("expert", "embed", "expert_mlp"))
  tokens = np.random.RandomState(2).randint(0, COMMON["vocab_size"], (2, 16))
  with jax.set_mesh(mesh):
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  ref = _logits(hf_model, tokens)
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
  out = str(tmp_path / "sharded_out")
  to_hf(model, config, out, max_shard_bytes=50_000, progress=False)
  assert os.path.exists(os.path.join(out, safetensors_io.INDEX_FILE))
  again, _ = from_hf(out, progress=False)
  p1, p2 = _params(model), _params(again)
  assert all(np.array_equal(p1[k], p2[k]) for k in p1)


def test_vl_wrapped_text_model(tmp_path):
  """minimax_m3_vl: the text model under model.language_model.*, vision tensors skipped."""
  _, path = _build("minimax_m3_vl_text", tmp_path)
  model, _ = from_hf(path, progress=False)
  vl = tmp_path / "vl"
  vl.mkdir()
  text = json.load(open(os.path.join(path, "config.json")))
  json.dump({"model_type": "minimax_m3_vl", "text_config": text, "vision_config": {"hidden_size": 8},
             "image_token_index": 5}, open(vl / "config.json", "w"))
  reader = safetensors_io.SafetensorsReader(path)
  tensors = {("lm_head.weight" if n == "lm_head.weight" else n.replace("model.", "model.language_model.", 1)):
             np.array(reader.read(n)) for n in reader.names()}
  tensors["model.visual.patch_embed.weight"] = np.zeros((2, 2), np.float32)
  safetensors_io.save_file(tensors, str(vl / "model.safetensors"))
  vl_model, config = from_hf(str(vl), progress=False)
  assert config.model.num_dense_layers == 1 and "msa" in config.model.attention_pattern
  p1, p2 = _params(model), _params(vl_model)
  assert all(np.array_equal(p1[k], p2[k]) for k in p1)


def _rewrite(src, dst, edit_config=None, edit_tensors=None):
  shutil.copytree(src, dst)
  if edit_config:
    c = json.load(open(os.path.join(dst, "config.json")))
    edit_config(c)
    json.dump(c, open(os.path.join(dst, "config.json"), "w"))
  if edit_tensors:
    reader = safetensors_io.SafetensorsReader(src)
    tensors = {n: np.array(reader.read(n)) for n in reader.names()}
    edit_tensors(tensors)
    safetensors_io.save_file(tensors, os.path.join(dst, "model.safetensors"))
  return str(dst)


def test_bad_input_names_the_field_or_tensor(tmp_path):
  _, path = _build("mixtral", tmp_path)
  w1 = "model.layers.1.block_sparse_moe.experts.2.w1.weight"

  bad = _rewrite(path, tmp_path / "type", edit_config=lambda c: c.update(model_type="llama"))
  with pytest.raises(UnsupportedConfigError, match="model_type"):
    from_hf(bad, progress=False)

  bad = _rewrite(path, tmp_path / "field", edit_config=lambda c: c.update(use_fancy_thing=True))
  with pytest.raises(UnsupportedConfigError, match="use_fancy_thing"):
    from_hf(bad, progress=False)

  def yarn(c):
    c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
  bad = _rewrite(path, tmp_path / "rope", edit_config=yarn)
  with pytest.raises(UnsupportedConfigError, match="rope_type"):
    from_hf(bad, progress=False)

  bad = _rewrite(path, tmp_path / "act", edit_config=lambda c: c.update(hidden_act="gelu"))
  with pytest.raises(UnsupportedConfigError, match="hidden_act"):
    from_hf(bad, progress=False)

  bad = _rewrite(path, tmp_path / "missing", edit_tensors=lambda t: t.pop(w1))
  with pytest.raises(MissingTensorError, match=w1.replace(".", r"\.")):
    from_hf(bad, progress=False)

  def reshape(t):
    t["model.layers.2.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  bad = _rewrite(path, tmp_path / "shape", edit_tensors=reshape)
  with pytest.raises(TensorShapeError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight"):
    from_hf(bad, progress=False)

  def extra(t):
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones((64,), np.float32)
  bad = _rewrite(path, tmp_path / "extra", edit_tensors=extra)
  with pytest.raises(UnexpectedTensorError, match=r"q_norm"):
    from_hf(bad, progress=False)


def test_m3_config_errors():
  cfg, _ = _m3()
  hf = cfg.to_dict()
  ok = hf_config.to_model_config(hf)
  assert ok.num_dense_layers == 1 and ok.rotary_dim == 8 and ok.msa.top_k == 2
  for field, value in (("mlp_layer_types", ["sparse", "dense", "sparse", "sparse"]),
                       ("index_n_heads", 4),
                       ("layer_types", ["full_attention", "sliding_attention"] * 2)):
    with pytest.raises(UnsupportedConfigError, match=field):
      hf_config.to_model_config({**hf, field: value})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_round_trip(family):
  cfg, _ = FAMILIES[family]()
  ours = hf_config.to_model_config(cfg.to_dict())
  back = hf_config.to_model_config(hf_config.from_model_config(ours, family))
  assert back.to_dict() == ours.to_dict()
  config_lib.validate_model(ours)


def test_cli_run_round_trip(tmp_path):
  """HF dir -> trainer checkpoint (step 0, trainer layout) -> HF dir gives back the same tensors."""
  from mixtral_jax.convert.run import hf_to_run, load_converted_config, run_to_hf
  _, path = _build("minimax_m2", tmp_path)
  run = str(tmp_path / "run")
  config = config_lib.default_config()
  config.mesh = dict(data=2, fsdp=1, expert=2, tensor=2)
  hf_to_run(path, run, config)
  assert load_converted_config(run).model.to_dict() == from_hf(path, progress=False)[1].model.to_dict()
  out = str(tmp_path / "back")
  run_to_hf(run, out)
  a, b = safetensors_io.SafetensorsReader(path), safetensors_io.SafetensorsReader(out)
  assert sorted(a.names()) == sorted(b.names())
  for n in a.names():
    assert np.array_equal(a.read(n), b.read(n)), n


def test_bfloat16_checkpoint(tmp_path):
  """bfloat16 safetensors read into float32 params exactly; written back as bfloat16."""
  cfg, cls = _mixtral()
  torch.manual_seed(0)
  hf_model = cls(cfg).eval()
  _randomize(hf_model, 0)
  path = str(tmp_path / "bf16")
  hf_model.to(torch.bfloat16).save_pretrained(path)
  model, config = from_hf(path, progress=False)
  q = model.layers[1].attn.q_proj.kernel[...]
  assert q.dtype == jnp.float32
  want = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T.reshape(q.shape)
  np.testing.assert_array_equal(np.asarray(q), want)
  out = str(tmp_path / "bf16_out")
  to_hf(model, config, out, dtype="bfloat16", progress=False)
  a, b = safetensors_io.SafetensorsReader(path), safetensors_io.SafetensorsReader(out)
  assert sorted(a.names()) == sorted(b.names())
  for n in a.names():
    assert b.read(n).dtype == a.read(n).dtype and np.array_equal(a.read(n), b.read(n)), n


def test_mixtral_sliding_window(tmp_path):
  """Mixtral's sliding_window maps to our swa layers (query sees itself and window-1 keys back)."""
  cfg, cls = _mixtral()
  cfg.sliding_window = 16
  torch.manual_seed(0)
  hf_model = cls(cfg).eval()
  _randomize(hf_model, 3)
  path = str(tmp_path / "swa")
  hf_model.save_pretrained(path)
  model, config = from_hf(path, progress=False)
  assert tuple(config.model.attention_pattern) == ("swa",) and config.model.window == 16
  tokens = np.random.RandomState(3).randint(0, COMMON["vocab_size"], (2, 48))
  ref = _logits(hf_model, tokens)
  ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
  assert hf_config.from_model_config(config.model, "mixtral")["sliding_window"] == 16


def test_tied_embeddings(tmp_path):
  cfg, cls = _m2()
  cfg.tie_word_embeddings = True
  torch.manual_seed(0)
  hf_model = cls(cfg).eval()
  _randomize(hf_model, 4)
  hf_model.tie_weights()
  path = str(tmp_path / "tied")
  hf_model.save_pretrained(path)
  model, config = from_hf(path, progress=False)
  assert config.model.tie_embeddings and not hasattr(model, "lm_head")
  tokens = np.random.RandomState(4).randint(0, COMMON["vocab_size"], (2, 16))
  ref = _logits(hf_model, tokens)
  assert np.abs(np.asarray(model(jnp.asarray(tokens, jnp.int32))) - ref).max() <= 1e-4 * np.abs(ref).max()
  out = str(tmp_path / "tied_out")
  to_hf(model, config, out, progress=False)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_array_equal(_logits(reloaded, tokens), ref)


@pytest.mark.parametrize("use_mesh", [False, True])
def test_scanned_layers(tmp_path, use_mesh):
  """config.model.scan_layers: the identical layers' params are stacked; loads and writes per layer."""
  _, path = _build("minimax_m2", tmp_path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  config = config_lib.default_config()
  config.model.scan_layers = True
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=2, tensor=2)) if use_mesh else None
  model, config = from_hf(path, mesh=mesh, config=config, progress=False)
  assert config.model.scan_layers and model.layers[0].blocks.attn.q_proj.kernel[...].shape[0] == 4
  tokens = np.random.RandomState(5).randint(0, COMMON["vocab_size"], (2, 32))
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  ref = _logits(hf_model, tokens)
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
  out = str(tmp_path / "scan_out")
  to_hf(model, config, out, progress=False)
  a, b = safetensors_io.SafetensorsReader(path), safetensors_io.SafetensorsReader(out)
  assert sorted(a.names()) == sorted(b.names())
  for n in a.names():
    assert np.array_equal(a.read(n), b.read(n)), n

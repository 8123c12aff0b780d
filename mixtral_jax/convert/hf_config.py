"""Hugging Face `config.json` <-> our model ConfigDict, for the four families we model.

  mixtral              MixtralForCausalLM: softmax top-k router, plain SwiGLU experts, full (or
                       sliding-window) attention.
  minimax_m2           MiniMaxM2ForCausalLM: + QK-norm over all heads, sigmoid router with selection
                       bias, partial rotary.
  minimax              MiniMax-Text-01: Lightning / softmax hybrid by `layer_types` (or the original
                       checkpoint's `attn_type_list`), post-norm residuals with alpha/beta scales.
  minimax_m3_vl        MiniMax-M3's text model (its `text_config`; `minimax_m3_vl_text` alone too):
                       Gemma-style zero-centered norms, per-head QK-norm, MSA sparse layers
                       (`minimax_m3_sparse`), dense first layers, shared expert, clamped SwiGLU.

The field values follow what the transformers modeling code *does*, which is what parity is measured
against. Two places where that differs from a reading of the config:
  * mixtral / minimax rotate the whole head (their rotary classes ignore `partial_rotary_factor`);
  * minimax_m3_vl's rotary width comes from `rope_parameters.partial_rotary_factor` only; its
    `rotary_dim` field is not read by the transformers model (we check the two agree when both exist).

Every field of config.json is either mapped, checked against the one value we support, or in a list
of fields that do not change the forward pass (token ids, dtype, training-only knobs). Anything else
raises `UnsupportedConfigError` naming the field, so a checkpoint never converts into a silently
different model.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from mixtral_jax import config as config_lib
from mixtral_jax.model import plan as plan_lib

FAMILIES = ("mixtral", "minimax_m2", "minimax", "minimax_m3_vl", "minimax_m3_vl_text")


class UnsupportedConfigError(ValueError):
  """A Hugging Face config field or value we cannot represent; the message names the field."""


def _fail(field: str, msg: str):
  raise UnsupportedConfigError(f"config.json field {field!r}: {msg}")


# Fields that do not change the forward pass of the text model (ids, bookkeeping, training knobs).
_IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "max_position_embeddings",
    "use_cache", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "attention_dropout", "output_attentions", "output_hidden_states", "return_dict",
    "is_encoder_decoder", "tokenizer_class", "chunk_size_feed_forward", "id2label", "label2id",
    "problem_type", "_name_or_path", "name_or_path", "base_config_key", "add_cross_attention",
    "tie_encoder_decoder", "is_decoder", "pruned_heads", "torchscript", "use_bfloat16",
    "finetuning_task", "task_specific_params", "cross_attention_hidden_size", "prefix",
    "sep_token_id", "decoder_start_token_id", "num_labels", "_attn_implementation_autoset",
    "ignore_keys_at_rope_validation",
    # multi-token-prediction heads are not part of the causal LM forward (transformers drops them)
    "use_mtp", "num_mtp_modules", "mtp_transformer_layers",
}
_VL_IGNORED = {"vision_config", "image_token_index", "video_token_index", "image_token_id",
               "video_token_id", "projector_hidden_size", "merged_hidden_size", "text_config",
               "vision_start_token_id", "vision_end_token_id"}

_COMMON = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
           "tie_word_embeddings", "num_experts_per_tok", "num_local_experts", "num_experts",
           "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor"}
_FAMILY_FIELDS = {
    "mixtral": {"sliding_window"},
    "minimax_m2": {"rotary_dim", "sliding_window", "attn_type_list", "use_qk_norm", "qk_norm_type",
                   "scoring_func", "use_routing_bias", "shared_intermediate_size",
                   "layernorm_full_attention_beta", "layernorm_linear_attention_beta",
                   "layernorm_mlp_beta", "swa_rope_theta", "shared_moe_mode", "mlp_intermediate_size"},
    "minimax": {"sliding_window", "layer_types", "attn_type_list", "block_size",
                "full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor",
                "linear_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor"},
    "minimax_m3_vl_text": {"dense_intermediate_size", "shared_intermediate_size",
                           "routed_scaling_factor", "rotary_dim", "swiglu_alpha", "swiglu_limit",
                           "mlp_layer_types", "moe_layer_freq", "index_n_heads", "index_head_dim",
                           "index_block_size", "index_topk_blocks", "index_local_blocks",
                           "layer_types", "sparse_attention_config"},
}
_DEFAULT_THETA = {"mixtral": 1e6, "minimax_m2": 5e6, "minimax": 1e6, "minimax_m3_vl_text": 5e6}


def text_config(hf: dict) -> tuple[str, dict]:
  """(family, the text model's config dict): unwraps minimax_m3_vl's text_config."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    _fail("model_type", f"unknown model_type {model_type!r}; supported: {FAMILIES}")
  if model_type == "minimax_m3_vl":
    for k in hf:
      if k not in _IGNORED | _VL_IGNORED | {"tie_word_embeddings"}:
        _fail(k, "not supported for minimax_m3_vl (only its text model converts)")
    text = dict(hf.get("text_config") or {})
    if not text:
      _fail("text_config", "minimax_m3_vl config without a text_config")
    if hf.get("tie_word_embeddings"):
      text["tie_word_embeddings"] = True
    return "minimax_m3_vl_text", text
  return model_type, hf


def _rope(family: str, hf: dict, head_dim: int) -> tuple[float, int]:
  """(theta, rotary_dim) as the family's transformers rotary embedding computes them."""
  rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rp.get("rope_type", rp.get("type", "default"))
  if rope_type != "default":
    _fail("rope_parameters.rope_type", f"only 'default' rope is supported, got {rope_type!r}")
  for k in rp:
    if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor"):
      _fail(f"rope_parameters.{k}", "not supported (only default rope with theta and partial factor)")
  theta = float(rp.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA[family])))
  factor = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if family == "minimax_m2" and factor is None and hf.get("rotary_dim") is not None:
    factor = hf["rotary_dim"] / head_dim  # legacy field, as MiniMaxM2Config reads it
  if family in ("mixtral", "minimax"):
    factor = 1.0  # their rotary classes rotate the whole head whatever the config says
  rotary_dim = int(head_dim * (1.0 if factor is None else float(factor)))
  if family == "minimax_m3_vl_text" and hf.get("rotary_dim") not in (None, rotary_dim):
    if "partial_rotary_factor" in rp or "partial_rotary_factor" in hf:
      _fail("rotary_dim", f"{hf['rotary_dim']} disagrees with rope_parameters.partial_rotary_factor "
                          f"(rotary width {rotary_dim})")
    # transformers' M3 model rotates the whole head unless rope_parameters carries the factor.
  if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
    _fail("rope_parameters.partial_rotary_factor", f"gives rotary width {rotary_dim} of head_dim {head_dim}")
  return theta, rotary_dim


def _compress_pattern(types: list[str]) -> tuple[str, ...]:
  """Shortest period p with types[i] == types[i % p] (the layer plan repeats it)."""
  for p in range(1, len(types) + 1):
    if all(types[i] == types[i % p] for i in range(len(types))):
      return tuple(types[:p])
  return tuple(types)


def to_model_config(hf: dict, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Our model ConfigDict for a Hugging Face config dict (config.json contents).

  base: a model ConfigDict whose run-time fields (dtype, param_dtype, attention_impl, remat,
  dispatch, loss weights, ...) are kept; the architecture fields are overwritten. Default:
  `config.model_defaults()`. Raises UnsupportedConfigError naming the offending field.
  """
  family, hf = text_config(hf)
  allowed = _IGNORED | _COMMON | _FAMILY_FIELDS[family]
  for k in hf:
    if k not in allowed:
      _fail(k, f"not supported for model_type {family!r}")
  if "quantization_config" in hf:
    _fail("quantization_config", "quantized checkpoints are not supported")
  if hf.get("hidden_act", "silu") != "silu" and family != "minimax_m3_vl_text":
    _fail("hidden_act", f"only 'silu' is supported, got {hf['hidden_act']!r}")

  m = ml_collections.ConfigDict(base.to_dict()) if base is not None else config_lib.model_defaults()
  req = lambda k: hf[k] if k in hf else _fail(k, "missing")  # noqa: E731
  m.vocab_size = int(req("vocab_size"))
  m.d_model = int(req("hidden_size"))
  m.num_layers = int(req("num_hidden_layers"))
  m.num_heads = int(req("num_attention_heads"))
  m.num_kv_heads = int(hf.get("num_key_value_heads") or m.num_heads)
  m.head_dim = int(hf.get("head_dim") or m.d_model // m.num_heads)
  m.rope_theta, m.rotary_dim = _rope(family, hf, m.head_dim)
  m.norm_eps = float(hf.get("rms_norm_eps", 1e-6 if family in ("minimax_m2", "minimax_m3_vl_text") else 1e-5))
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  e = m.moe
  e.num_experts = int(hf.get("num_local_experts", hf.get("num_experts", 8)))
  e.top_k = int(hf.get("num_experts_per_tok", 2))
  e.expert_dim = int(req("intermediate_size"))
  e.normalize_topk = True
  e.routed_scaling_factor = 1.0
  e.num_shared_experts = 0
  m.num_dense_layers = 0
  m.qk_norm = "none"
  m.norm_zero_centered = False
  m.post_norm_residual = False
  m.mlp_activation = "swiglu"
  m.residual_scales = ml_collections.ConfigDict(dict(
      full_alpha=1.0, full_beta=1.0, lightning_alpha=1.0, lightning_beta=1.0,
      mlp_alpha=1.0, mlp_beta=1.0))
  window = hf.get("sliding_window")
  full = "full"
  if window is not None and family in ("mixtral", "minimax"):
    full, m.window = "swa", int(window)

  if family == "mixtral":
    e.router, e.use_bias = "softmax", False
    m.attention_pattern = (full,)
  elif family == "minimax_m2":
    _m2_checks(hf)
    e.router, e.use_bias = "sigmoid", True
    m.qk_norm = "full"
    m.attention_pattern = ("full",)
  elif family == "minimax":
    e.router, e.use_bias = "softmax", False
    m.post_norm_residual = True
    types = _minimax_layer_types(hf, m.num_layers)
    m.attention_pattern = _compress_pattern([full if t == "full_attention" else "lightning" for t in types])
    m.lightning_block = int(hf.get("block_size", 256))
    s = m.residual_scales
    for ours, theirs in (("full", "full_attn"), ("lightning", "linear_attn"), ("mlp", "mlp")):
      s[f"{ours}_alpha"] = float(hf.get(f"{theirs}_alpha_factor", 1.0))
      s[f"{ours}_beta"] = float(hf.get(f"{theirs}_beta_factor", 1.0))
  else:
    _m3_text(hf, m)
  config_lib.validate_model(m)
  return m


def _m2_checks(hf: dict):
  checks = {"use_qk_norm": True, "qk_norm_type": "per_layer", "scoring_func": "sigmoid",
            "shared_intermediate_size": 0, "layernorm_full_attention_beta": 1.0,
            "layernorm_linear_attention_beta": 1.0, "layernorm_mlp_beta": 1.0}
  for k, want in checks.items():
    if k in hf and hf[k] != want:
      _fail(k, f"only {want!r} is supported (what MiniMaxM2ForCausalLM computes), got {hf[k]!r}")
  if any(int(t) != 1 for t in hf.get("attn_type_list") or ()):
    _fail("attn_type_list", "minimax_m2 with non-softmax layers is not a transformers model")
  if hf.get("sliding_window") is not None:
    _fail("sliding_window", "MiniMaxM2ForCausalLM attends to every position; a window is not supported")


def _minimax_layer_types(hf: dict, num_layers: int) -> list[str]:
  types = hf.get("layer_types")
  if types is None and hf.get("attn_type_list") is not None:
    types = ["full_attention" if int(t) == 1 else "linear_attention" for t in hf["attn_type_list"]]
  if types is None:  # MiniMaxConfig's default
    types = ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(num_layers)]
  if len(types) != num_layers:
    _fail("layer_types", f"has {len(types)} entries for {num_layers} layers")
  for t in types:
    if t not in ("full_attention", "linear_attention"):
      _fail("layer_types", f"unknown layer type {t!r}; expected full_attention or linear_attention")
  return list(types)


def _m3_text(hf: dict, m: ml_collections.ConfigDict):
  e = m.moe
  e.router, e.use_bias = "sigmoid", True
  e.routed_scaling_factor = float(hf.get("routed_scaling_factor", 2.0))
  e.num_shared_experts = 1
  e.shared_expert_dim = int(hf.get("shared_intermediate_size", 3072))
  m.qk_norm = "per_head"
  m.norm_zero_centered = True
  m.mlp_activation = "swiglu_clamped"
  m.swiglu_alpha = float(hf.get("swiglu_alpha", 1.702))
  m.swiglu_limit = float(hf.get("swiglu_limit", 7.0))
  m.mlp_dim = int(hf.get("dense_intermediate_size", 12288))
  n = m.num_layers
  sparse_cfg = hf.get("sparse_attention_config") or {}
  legacy = {"index_n_heads": "sparse_num_index_heads", "index_head_dim": "sparse_index_dim",
            "index_block_size": "sparse_block_size", "index_topk_blocks": "sparse_topk_blocks",
            "index_local_blocks": "sparse_local_block"}
  for k in sparse_cfg:
    if k not in set(legacy.values()) | {"sparse_attention_freq"}:
      _fail(f"sparse_attention_config.{k}", "not supported")
  idx = {k: sparse_cfg.get(v, hf.get(k)) for k, v in legacy.items()}
  defaults = dict(index_n_heads=4, index_head_dim=128, index_block_size=128, index_topk_blocks=16,
                  index_local_blocks=1)
  idx = {k: int(defaults[k] if v is None else v) for k, v in idx.items()}

  types = hf.get("layer_types")
  if types is None and "sparse_attention_freq" in sparse_cfg:
    types = ["minimax_m3_sparse" if f else "full_attention" for f in sparse_cfg["sparse_attention_freq"]]
  types = list(types or ["full_attention"] * n)
  if len(types) != n:
    _fail("layer_types", f"has {len(types)} entries for {n} layers")
  attn = []
  for t in types:
    if t not in ("full_attention", "minimax_m3_sparse"):
      _fail("layer_types", f"unknown layer type {t!r}; expected full_attention or minimax_m3_sparse")
    attn.append("msa" if t == "minimax_m3_sparse" else "full")
  m.attention_pattern = _compress_pattern(attn)
  if "msa" in attn and idx["index_n_heads"] != m.num_kv_heads:
    _fail("index_n_heads", f"must equal num_key_value_heads={m.num_kv_heads} (one index query per "
                           f"GQA group), got {idx['index_n_heads']}")
  m.msa.index_head_dim = idx["index_head_dim"]
  m.msa.block_size = idx["index_block_size"]
  m.msa.top_k = idx["index_topk_blocks"]
  m.msa.local_blocks = idx["index_local_blocks"]
  m.msa.selection = "per_group"  # what transformers' MiniMaxM3VLIndexer does (one top-k per group)

  mlp_types = hf.get("mlp_layer_types")
  if mlp_types is None and hf.get("moe_layer_freq") is not None:
    mlp_types = ["sparse" if f else "dense" for f in hf["moe_layer_freq"]]
  mlp_types = list(mlp_types or ["sparse"] * n)
  if len(mlp_types) != n or any(t not in ("dense", "sparse") for t in mlp_types):
    _fail("mlp_layer_types", f"expected {n} entries of 'dense'/'sparse', got {mlp_types}")
  num_dense = mlp_types.index("sparse") if "sparse" in mlp_types else n
  if any(t != "sparse" for t in mlp_types[num_dense:]):
    _fail("mlp_layer_types",
          f"dense layers must be a prefix of the stack (num_dense_layers), got {mlp_types}")
  m.num_dense_layers = num_dense


def from_model_config(m: ml_collections.ConfigDict, family: str) -> dict:
  """The Hugging Face config dict of our model config, for `family` (a model_type).

  minimax_m3_vl is written as its text model, model_type minimax_m3_vl_text, which
  AutoModelForCausalLM loads. Raises UnsupportedConfigError naming a field the family cannot express.
  """
  if family == "minimax_m3_vl":
    family = "minimax_m3_vl_text"
  if family not in _DEFAULT_THETA:
    _fail("model_type", f"unknown model_type {family!r}; supported: {FAMILIES}")
  e = m.moe
  plan = plan_lib.layer_plan(m)
  pattern = plan_lib.attention_types(plan)

  def need(cond, field, msg):
    if not cond:
      raise UnsupportedConfigError(f"model config field {field!r}: {msg} for model_type {family!r}")

  hf: dict[str, Any] = dict(
      model_type=family, vocab_size=m.vocab_size, hidden_size=m.d_model,
      intermediate_size=e.expert_dim, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
      hidden_act="silu", rms_norm_eps=m.norm_eps, tie_word_embeddings=bool(m.tie_embeddings),
      num_local_experts=e.num_experts, num_experts_per_tok=e.top_k,
      rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
      dtype=m.param_dtype)
  need(e.normalize_topk, "moe.normalize_topk", "must be True")
  need(m.num_dense_layers < m.num_layers, "num_dense_layers", "a model without MoE layers")
  softmax_types = {"full"}
  if family in ("mixtral", "minimax", "minimax_m2"):
    need(m.num_dense_layers == 0, "num_dense_layers", "must be 0")
    need(e.num_shared_experts == 0, "moe.num_shared_experts", "must be 0")
    need(not m.norm_zero_centered, "norm_zero_centered", "must be False")
    need(m.mlp_activation == "swiglu", "mlp_activation", "must be 'swiglu'")
    need(e.routed_scaling_factor == 1.0, "moe.routed_scaling_factor", "must be 1.0")
  if family in ("mixtral", "minimax"):
    need(m.rotary_dim == m.head_dim, "rotary_dim", "must equal head_dim")
    need(m.qk_norm == "none", "qk_norm", "must be 'none'")
    need(e.router == "softmax" and not e.use_bias, "moe.router", "must be softmax without bias")
    need(len(set(pattern) & {"full", "swa"}) <= 1, "attention_pattern", "cannot mix full and swa")
    if "swa" in pattern:
      hf["sliding_window"] = int(m.window)
    else:
      hf["sliding_window"] = None
    softmax_types = {"full", "swa"}
  if family == "mixtral":
    need(set(pattern) <= softmax_types, "attention_pattern", "only full or swa layers")
    need(not m.post_norm_residual, "post_norm_residual", "must be False")
  elif family == "minimax":
    need(set(pattern) <= softmax_types | {"lightning"}, "attention_pattern", "only full/swa/lightning")
    need(m.post_norm_residual, "post_norm_residual", "must be True")
    hf["layer_types"] = ["linear_attention" if t == "lightning" else "full_attention" for t in pattern]
    hf["block_size"] = int(m.lightning_block)
    s = m.residual_scales
    for ours, theirs in (("full", "full_attn"), ("lightning", "linear_attn"), ("mlp", "mlp")):
      hf[f"{theirs}_alpha_factor"] = float(s[f"{ours}_alpha"])
      hf[f"{theirs}_beta_factor"] = float(s[f"{ours}_beta"])
  elif family == "minimax_m2":
    need(set(pattern) == {"full"}, "attention_pattern", "only full layers")
    need(m.qk_norm == "full", "qk_norm", "must be 'full'")
    need(e.router == "sigmoid" and e.use_bias, "moe.router", "must be sigmoid with use_bias")
    need(not m.post_norm_residual, "post_norm_residual", "must be False")
    hf["rotary_dim"] = int(m.rotary_dim)
    hf["rope_parameters"]["partial_rotary_factor"] = m.rotary_dim / m.head_dim
  else:
    need(set(pattern) <= {"full", "msa"}, "attention_pattern", "only full or msa layers")
    need(m.qk_norm == "per_head", "qk_norm", "must be 'per_head'")
    need(m.norm_zero_centered, "norm_zero_centered", "must be True")
    need(e.router == "sigmoid" and e.use_bias, "moe.router", "must be sigmoid with use_bias")
    need(e.num_shared_experts == 1, "moe.num_shared_experts", "must be 1")
    need(m.mlp_activation == "swiglu_clamped", "mlp_activation", "must be 'swiglu_clamped'")
    need(not m.post_norm_residual, "post_norm_residual", "must be False")
    need(m.msa.selection == "per_group", "msa.selection", "transformers selects per GQA group")
    hf.update(
        dense_intermediate_size=m.mlp_dim, shared_intermediate_size=e.shared_expert_dim,
        routed_scaling_factor=float(e.routed_scaling_factor), rotary_dim=int(m.rotary_dim),
        swiglu_alpha=float(m.swiglu_alpha), swiglu_limit=float(m.swiglu_limit),
        mlp_layer_types=["sparse" if spec.moe else "dense" for spec in plan],
        layer_types=["minimax_m3_sparse" if t == "msa" else "full_attention" for t in pattern],
        index_n_heads=m.num_kv_heads, index_head_dim=m.msa.index_head_dim,
        index_block_size=m.msa.block_size, index_topk_blocks=m.msa.top_k,
        index_local_blocks=m.msa.local_blocks)
    hf["rope_parameters"]["partial_rotary_factor"] = m.rotary_dim / m.head_dim
  if family != "minimax":
    need(all(float(v) == 1.0 for v in m.residual_scales.values()), "residual_scales", "must all be 1.0")
  hf["architectures"] = [_ARCH[family]]
  return hf


_ARCH = {"mixtral": "MixtralForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM",
         "minimax": "MiniMaxForCausalLM", "minimax_m3_vl_text": "MiniMaxM3VLForCausalLM"}

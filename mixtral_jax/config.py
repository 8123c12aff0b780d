"""Experiment configuration: defaults for every field, and validation that names the bad field.

An experiment file in `experiments/` starts from `default_config()` and overrides what it needs.
Model families differ by these values only; no code branches on a model's name.
"""
from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

ATTENTION_TYPES = ("full", "swa", "lightning", "msa", "moba")
ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity")
BALANCE_LOSSES = ("sequence", "switch")
QK_NORMS = ("none", "full", "per_head")
ATTENTION_IMPLS = ("xla", "pallas_tpu", "pallas_triton", "pallas_mosaic_gpu", None)
MSA_SELECTIONS = ("max_heads", "per_group")
MSA_DECODE_SELECTIONS = ("exact", "mean", "minmax")
MESH_AXES = ("data", "fsdp", "expert", "tensor")  # the device mesh's axes (see sharding.py)
# Fields documented as taking None. They are typed references (str), so the command line can set
# them to a string even when the default is None, and `resolve_cli_none` turns "None" into None.
NONE_FIELDS = ("model.attention_impl", "model.moe.grouped_matmul", "model.moe.all_to_all")


def _str_or_none(default):
  return config_dict.FieldReference(default, field_type=str)


def model_defaults() -> ml_collections.ConfigDict:
  """A small MoE transformer; every field the model reads is here."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 256
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 16
  m.rotary_dim = 16            # partial rotary: the first rotary_dim dims of each head rotate
  m.rope_theta = 10_000.0
  m.qk_norm = "none"           # none | full (M2: one RMSNorm over all heads) | per_head (M3/Gemma)
  m.norm_eps = 1e-6
  m.norm_zero_centered = False # RMSNorm scale stored as w - 1 (Gemma3 / MiniMax-M3)
  m.tie_embeddings = False
  # Residual form: x + attn(norm(x)) by default. MiniMax-01 ("post_norm_residual") carries the
  # normed input as the residual and scales both branches: alpha * norm(x) + beta * attn(norm(x)).
  m.post_norm_residual = False
  m.residual_scales = ml_collections.ConfigDict(dict(
      full_alpha=1.0, full_beta=1.0,            # softmax-attention layers (full/swa/msa/moba)
      lightning_alpha=1.0, lightning_beta=1.0,  # lightning layers
      mlp_alpha=1.0, mlp_beta=1.0))
  m.num_dense_layers = 0       # first layers use a dense SwiGLU MLP instead of the MoE block
  m.mlp_dim = 128              # ffn width of the dense layers
  # Gated activation of every MLP and expert: swiglu = silu(gate) * up; swiglu_clamped (GPT-OSS,
  # MiniMax-M3) = clamp(gate) * sigmoid(alpha * clamp(gate)) * (clamp(up) + 1).
  m.mlp_activation = "swiglu"
  m.swiglu_alpha = 1.702
  m.swiglu_limit = 7.0
  # One entry per layer, or a period repeated to num_layers ([lightning]*7 + [full]).
  m.attention_pattern = ("full",)
  m.attention_impl = _str_or_none("xla")  # xla | pallas_tpu | pallas_triton | pallas_mosaic_gpu | None (best)
  m.attention_block = 128      # tile size (block_q = block_kv) of the Pallas attention kernels
  m.window = 64                # swa: each query sees itself and the window-1 keys before it
  m.lightning_block = 64       # lightning: block size of the intra/inter-block training form
  m.msa = ml_collections.ConfigDict(dict(
      block_size=128,          # tokens per KV block (M3: 128)
      top_k=16,                # selected blocks per query (M3: 16), the query's own block included
      index_head_dim=128,      # one shared index key per token, one index query per GQA group
      local_blocks=1,          # blocks ending at the query's own block, always kept (HF: 1)
      selection="per_group",   # per_group: top-k per GQA group (MSA paper; transformers 5.x
                               # reference); max_heads: max over index heads, then one top-k
      kl_loss_weight=0.0,      # weight of the indexer KL loss in the training loss
      # Decode-time block choice (T == 1 over a cache): exact reads every cached index key;
      # mean / minmax score complete past blocks from per-block summaries of the index keys kept
      # in the cache (mean key, or Quest's per-channel min/max bound), reading ~1/block_size of
      # them: an approximation of the exact top-k (benchmarks/summary_recall.py measures its
      # recall). Training, evaluation and prefill are always exact.
      decode_selection="exact",
  ))
  m.moba = ml_collections.ConfigDict(dict(block_size=64, top_k=4))
  m.moe = ml_collections.ConfigDict(dict(
      num_experts=4,
      top_k=2,
      expert_dim=64,
      router="softmax",          # softmax (Mixtral) | sigmoid (M2/M3/DeepSeek-V3)
      normalize_topk=True,       # renormalize the selected weights to sum to 1
      routed_scaling_factor=1.0, # M2 1.0, M3 2.0, DeepSeek-V3 2.5
      use_bias=False,            # aux-loss-free balancing: bias changes which experts, not weights
      bias_update_rate=1e-3,     # u in bias_i += u * sign(mean_load - load_i)
      num_shared_experts=0,
      shared_expert_dim=64,
      dispatch="dropless",       # dropless (sort + ragged_dot) | capacity (token dropping)
      expert_parallel=True,      # dropless on a mesh with expert > 1: expert-parallel all-to-all
                                 # dispatch (model/moe_ep.py); False: global-view GSPMD dispatch
      all_to_all=_str_or_none(None),  # EP exchange: ragged | dense | None (ragged; dense on CPU)
      grouped_matmul=_str_or_none(None),  # dropless matmul: xla|blocked|ragged_dot|pallas_tpu|pallas_triton|None (backend's best)
      capacity_factor=1.25,
      aux_loss_weight=0.0,       # weight of the balance loss below
      balance_loss="sequence",   # sequence (DeepSeek-V3, per sequence) | switch (Switch/Mixtral, per batch)
      z_loss_weight=0.0,         # router z-loss
  ))
  m.dtype = "float32"          # compute dtype (bfloat16 with float32 master weights)
  m.param_dtype = "float32"
  m.remat = False
  m.scan_layers = False
  return m


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_defaults()
  # Mesh axis sizes; -1 takes the devices left over.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.train = ml_collections.ConfigDict(dict(
      steps=100,
      batch_size=8,
      seq_len=128,
      learning_rate=3e-3,
      warmup_steps=10,
      end_lr_fraction=0.1,
      weight_decay=0.01,
      b1=0.9,
      b2=0.95,
      grad_clip=1.0,
      loss_on="all",             # all: next-token loss on every real token (lm_mask);
                                 # answers: only on the task answers (loss_mask; Zoology-style MQAR)
      log_every=10,
      checkpoint_every=50,
      max_to_keep=3,
      async_checkpointing=True,
  ))
  c.data = ml_collections.ConfigDict(dict(
      # Task name -> sampling weight; see mixtral_jax.data.tasks.TASKS.
      tasks={"mqar": 1.0},
      text_files=(),             # byte-level text dataset from these files (globs allowed)
      num_workers=0,
  ))
  c.eval = ml_collections.ConfigDict(dict(
      tasks=("mqar",),
      lengths=(128,),
      num_examples=64,
      batch_size=16,
      perplexity=True,
  ))
  return c


def pattern_for_layers(pattern, num_layers: int) -> tuple[str, ...]:
  """Repeats `attention_pattern` to one attention type per layer."""
  pattern = tuple(pattern)
  return tuple(pattern[i % len(pattern)] for i in range(num_layers))


def resolve_cli_none(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`--config.model.attention_impl=None` arrives as the string "None": makes it None (in place)
  for the NONE_FIELDS. Returns config."""
  for field in NONE_FIELDS:
    *parents, name = field.split(".")
    node = config
    for p in parents:
      node = node.get(p) if node is not None else None
    if node is not None and name in node and node[name] in ("None", "none"):
      node[name] = None
  return config


class ConfigError(ValueError):
  """A config value is invalid; the message names the field."""


def _fail(field: str, msg: str):
  raise ConfigError(f"config.{field}: {msg}")


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes of `config.mesh` on `num_devices` devices, its -1 entry resolved to the devices
  left over; raises ConfigError naming the field. Pure Python: `sharding.make_mesh` builds the mesh."""
  sizes = {a: int(mesh_config[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {free}")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"config.mesh.{a}: must be positive or -1, got {s}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"config.mesh.{free[0]}: the other axes ({fixed} devices) do not divide the "
          f"device count {num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"config.mesh: axes multiply to {fixed} devices but {num_devices} are present")
  return sizes


def validate_model(m: ml_collections.ConfigDict, *, prefix: str = "model", seq_len: int | None = None):
  """Checks a model config; raises ConfigError naming the field. Runs before anything compiles."""
  def pos(name):
    v = m[name]
    if not isinstance(v, int) or v <= 0:
      _fail(f"{prefix}.{name}", f"must be a positive integer, got {v!r}")

  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
    pos(name)
  if m.num_heads % m.num_kv_heads:
    _fail(f"{prefix}.num_heads",
          f"{m.num_heads} is not divisible by num_kv_heads={m.num_kv_heads}")
  if not 0 <= m.rotary_dim <= m.head_dim or m.rotary_dim % 2:
    _fail(f"{prefix}.rotary_dim", f"must be even and in [0, head_dim={m.head_dim}], got {m.rotary_dim}")
  if m.qk_norm not in QK_NORMS:
    _fail(f"{prefix}.qk_norm", f"unknown {m.qk_norm!r}; expected one of {QK_NORMS}")
  if m.attention_impl not in ATTENTION_IMPLS:
    _fail(f"{prefix}.attention_impl", f"unknown {m.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
  if m.attention_impl != "xla" and (m.attention_block < 8 or m.attention_block & (m.attention_block - 1)):
    _fail(f"{prefix}.attention_block", f"must be a power of two >= 8 for the Pallas kernels "
          f"(Mosaic GPU and TPU want 128), got {m.attention_block}")
  if not 0 <= m.num_dense_layers <= m.num_layers:
    _fail(f"{prefix}.num_dense_layers", f"must be in [0, num_layers={m.num_layers}]")
  if not len(m.attention_pattern):
    _fail(f"{prefix}.attention_pattern", "is empty")
  for t in m.attention_pattern:
    if t not in ATTENTION_TYPES:
      _fail(f"{prefix}.attention_pattern", f"unknown attention type {t!r}; expected one of {ATTENTION_TYPES}")
  types = set(pattern_for_layers(m.attention_pattern, m.num_layers))
  if "swa" in types:
    if m.window <= 0:
      _fail(f"{prefix}.window", f"must be positive, got {m.window}")
    if seq_len is not None and m.window > seq_len:
      _fail(f"{prefix}.window", f"window {m.window} is longer than the training sequence ({seq_len})")
  if "lightning" in types and m.lightning_block <= 0:
    _fail(f"{prefix}.lightning_block", f"must be positive, got {m.lightning_block}")
  if "msa" in types:
    if m.msa.block_size <= 0:
      _fail(f"{prefix}.msa.block_size", f"must be positive, got {m.msa.block_size}")
    if m.msa.top_k <= 0:
      _fail(f"{prefix}.msa.top_k", f"must be positive, got {m.msa.top_k}")
    if not 1 <= m.msa.local_blocks <= m.msa.top_k:
      _fail(f"{prefix}.msa.local_blocks", f"must be in [1, msa.top_k={m.msa.top_k}] so the "
            f"query's own block is always kept, got {m.msa.local_blocks}")
    if m.msa.index_head_dim <= 0 or m.msa.index_head_dim % 2:
      _fail(f"{prefix}.msa.index_head_dim", f"must be positive and even, got {m.msa.index_head_dim}")
    if m.msa.selection not in MSA_SELECTIONS:
      _fail(f"{prefix}.msa.selection", f"unknown {m.msa.selection!r}; expected one of {MSA_SELECTIONS}")
    if m.msa.get("decode_selection", "exact") not in MSA_DECODE_SELECTIONS:
      _fail(f"{prefix}.msa.decode_selection", f"unknown {m.msa.decode_selection!r}; expected one "
            f"of {MSA_DECODE_SELECTIONS}")
  if "moba" in types and (m.moba.block_size <= 0 or m.moba.top_k <= 0):
    _fail(f"{prefix}.moba", "block_size and top_k must be positive")
  e = m.moe
  if m.num_dense_layers < m.num_layers:
    if e.num_experts <= 0:
      _fail(f"{prefix}.moe.num_experts", f"must be positive, got {e.num_experts}")
    if not 0 < e.top_k <= e.num_experts:
      _fail(f"{prefix}.moe.top_k", f"top_k={e.top_k} must be in [1, num_experts={e.num_experts}]")
    if e.router not in ROUTERS:
      _fail(f"{prefix}.moe.router", f"unknown {e.router!r}; expected one of {ROUTERS}")
    if e.use_bias and e.bias_update_rate < 0:
      _fail(f"{prefix}.moe.bias_update_rate", f"must be >= 0 (a negative rate reverses the "
            f"balancing), got {e.bias_update_rate}")
    if e.expert_dim <= 0:
      _fail(f"{prefix}.moe.expert_dim", f"must be positive, got {e.expert_dim}")
    if e.dispatch not in DISPATCHES:
      _fail(f"{prefix}.moe.dispatch", f"unknown {e.dispatch!r}; expected one of {DISPATCHES}")
    if e.get("balance_loss", "sequence") not in BALANCE_LOSSES:
      _fail(f"{prefix}.moe.balance_loss", f"unknown {e.balance_loss!r}; expected one of {BALANCE_LOSSES}")
    if e.get("all_to_all") not in ("ragged", "dense", None):
      _fail(f"{prefix}.moe.all_to_all", f"unknown {e.all_to_all!r}; expected ragged, dense or None")
    if e.dispatch == "capacity" and e.capacity_factor <= 0:
      _fail(f"{prefix}.moe.capacity_factor", f"must be positive, got {e.capacity_factor}")
  if m.mlp_activation not in ("swiglu", "swiglu_clamped"):
    _fail(f"{prefix}.mlp_activation", f"unknown {m.mlp_activation!r}; expected swiglu or swiglu_clamped")
  for name in ("dtype", "param_dtype"):
    if m[name] not in ("float32", "bfloat16", "float16"):
      _fail(f"{prefix}.{name}", f"unsupported dtype {m[name]!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None):
  """Checks a whole experiment config; raises ConfigError naming the field."""
  validate_model(config.model, seq_len=config.train.seq_len)
  t = config.train
  for name in ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "max_to_keep"):
    if not isinstance(t[name], int) or t[name] <= 0:
      _fail(f"train.{name}", f"must be a positive integer, got {t[name]!r}")
  if t.warmup_steps < 0 or t.warmup_steps > t.steps:
    _fail("train.warmup_steps", f"must be in [0, train.steps={t.steps}], got {t.warmup_steps}")
  if t.loss_on not in ("all", "answers"):
    _fail("train.loss_on", f"unknown {t.loss_on!r}; expected 'all' or 'answers'")
  if t.learning_rate <= 0:
    _fail("train.learning_rate", f"must be positive, got {t.learning_rate}")
  if num_devices is not None:
    shape = mesh_shape(config.mesh, num_devices)
    data_par = shape["data"] * shape["fsdp"] * shape["expert"]  # sharding.RULES["batch"]
    if t.batch_size % data_par:
      _fail("train.batch_size", f"{t.batch_size} is not divisible by data*fsdp*expert={data_par}")
  if not len(config.data.tasks) and not len(config.data.text_files):
    _fail("data.tasks", "no tasks and no text_files: nothing to train on")
  from mixtral_jax.data import tasks as tasks_lib  # numpy only
  for task in config.data.tasks:
    if task not in tasks_lib.TASKS:
      _fail("data.tasks", f"unknown task {task!r}; expected some of {tuple(tasks_lib.TASKS)}")
  if len(config.data.tasks) and t.seq_len < tasks_lib.MIN_SEQ_LEN:
    _fail("train.seq_len", f"{t.seq_len} is shorter than the tasks' minimum length "
          f"{tasks_lib.MIN_SEQ_LEN}")
  validate_eval(config.eval)


def validate_eval(e: ml_collections.ConfigDict):
  """Checks config.eval; raises ConfigError naming the field."""
  from mixtral_jax.data import tasks as tasks_lib
  for name in ("num_examples", "batch_size"):
    if not isinstance(e[name], int) or isinstance(e[name], bool) or e[name] <= 0:
      _fail(f"eval.{name}", f"must be a positive integer, got {e[name]!r}")
  if isinstance(e.tasks, str) or not len(e.tasks):
    _fail("eval.tasks", f"must be a non-empty tuple of task names, got {e.tasks!r}")
  for task in e.tasks:
    if task not in tasks_lib.TASKS:
      _fail("eval.tasks", f"unknown task {task!r}; expected some of {tuple(tasks_lib.TASKS)}")
  if isinstance(e.lengths, (int, str)) or not len(e.lengths):
    _fail("eval.lengths", f"must be a non-empty tuple of lengths, got {e.lengths!r}")
  for length in e.lengths:
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
      _fail("eval.lengths", f"must be positive integers, got {length!r}")
    if length < tasks_lib.MIN_SEQ_LEN:
      _fail("eval.lengths", f"{length} is shorter than the tasks' minimum length "
            f"{tasks_lib.MIN_SEQ_LEN}")

"""Hugging Face checkpoints in and out: `from_hf(path, mesh) -> (model, config)`, `to_hf(model, config, dir)`.

Parameters are addressed through the layer plan (`model/plan.py`): a logical per-layer path
('layers', i, ...) becomes the model's own through `LayerSpec.param_path`.

from_hf reads config.json (mapped by `hf_config`), builds the model abstractly (no parameter is
initialised), then streams the safetensors one tensor at a time: each is transformed (`mapping`),
cast to the parameter dtype and `jax.device_put` with that parameter's sharding on `mesh` before
the next is read, so a large checkpoint never has two host copies. Every parameter must receive a
tensor and every tensor must be used: a missing, extra or wrongly shaped tensor raises an error
naming it.

to_hf writes config.json and model.safetensors (sharded with an index past `max_shard_bytes`) in the
layout transformers' own save_pretrained writes, so `AutoModelForCausalLM.from_pretrained` loads it.
"""
from __future__ import annotations

import contextlib
import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from mixtral_jax import config as config_lib
from mixtral_jax.convert import hf_config, mapping
from mixtral_jax.convert.hf_config import UnsupportedConfigError
from mixtral_jax.convert.safetensors_io import SafetensorsReader, ShardedWriter
from mixtral_jax.model import plan as plan_lib
from mixtral_jax.model.router import RouterBias

_STATE = (nnx.Param, RouterBias)


class ConversionError(ValueError):
  """A checkpoint does not fit the model; the message names the tensor."""


class MissingTensorError(ConversionError):
  pass


class UnexpectedTensorError(ConversionError):
  pass


class TensorShapeError(ConversionError):
  pass


def load_hf_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file}: no config.json in the Hugging Face directory")
  with open(file) as f:
    return json.load(f)


def _model_fn(cfg):
  from mixtral_jax.model.transformer import Transformer  # late: keeps `hf_config` importable alone
  return Transformer(cfg, rngs=nnx.Rngs(0))


def _mesh_ctx(mesh):
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _walk(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  _walk(tree, path[:-1])[path[-1]] = value


class _Layers:
  """Logical per-layer paths ('layers', i, ...) <-> the model's own, through the layer plan
  (`LayerSpec.param_path`: a scanned layer's parameters are stacked in ('layers', seg, 'blocks', ...)
  at index `position` of axis 0)."""

  def __init__(self, cfg):
    self.plan = plan_lib.layer_plan(cfg)

  def physical(self, path):
    """(model path, index along the stacked axis or None)."""
    if path[0] != "layers":
      return path, None
    return self.plan[path[1]].param_path(*path[2:])

  def logical_shapes(self, shapes):
    """The model's parameter shapes keyed by logical path (stacked ones split per layer)."""
    segs = plan_lib.segments(self.plan)
    out = {}
    for path, shape in shapes.items():
      if path[0] != "layers":
        out[path] = shape
        continue
      seg = segs[path[1]]
      if seg[0].scanned:
        for spec in seg:
          out[("layers", spec.index) + path[3:]] = shape[1:]
      else:
        out[("layers", seg[0].index) + path[2:]] = shape
    return out

  def lightning(self, model):
    """(spec, attention module) of each Lightning layer (never scanned: slopes depend on the index)."""
    for spec in self.plan:
      if spec.attention == "lightning":
        yield spec, model.layers[spec.segment].attn


_SETTERS: dict = {}


def _set_layer(buf, value, j: int):
  """buf[j] = value on device (buf donated), keeping buf's sharding."""
  f = _SETTERS.get(buf.sharding)
  if f is None:
    f = _SETTERS[buf.sharding] = jax.jit(
        lambda b, v, j: jax.lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), j, 0),
        donate_argnums=0, out_shardings=buf.sharding)
  return f(buf, value, jax.numpy.int32(j))


def _progress(total, desc, enabled):
  if not enabled:
    return contextlib.nullcontext(None)
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="tensor")


def from_hf(path: str, mesh=None, *, config: ml_collections.ConfigDict | None = None,
            progress: bool = True):
  """Loads a Hugging Face checkpoint directory as (model, config).

  path: directory with config.json and model.safetensors (or shards + model.safetensors.index.json).
  mesh: parameters are placed with their logical sharding on it (None: the default device).
  config: an experiment config (`config.default_config()` layout) whose run-time model fields
    (dtype, param_dtype, attention_impl, dispatch, loss weights) and train/data/eval settings are
    kept; the architecture comes from config.json. Returned with `.model` replaced.
  Returns (Transformer, config). Raises UnsupportedConfigError / MissingTensorError /
  UnexpectedTensorError / TensorShapeError naming the offending field or tensor.
  """
  hf = load_hf_config(path)
  family, _ = hf_config.text_config(hf)
  config = ml_collections.ConfigDict((config or config_lib.default_config()).to_dict())
  config.model = hf_config.to_model_config(hf, base=config.model)
  cfg = config.model

  with _mesh_ctx(mesh):
    abstract = nnx.eval_shape(lambda: _model_fn(cfg))
  graphdef, params, rest = nnx.split(abstract, _STATE, ...)
  flat = {tuple(p): v for p, v in nnx.to_flat_state(params)}
  pure = nnx.to_pure_dict(params)
  lay = _Layers(cfg)
  shapes = lay.logical_shapes({p: tuple(v.get_value().shape) for p, v in flat.items()})

  reader = SafetensorsReader(path)
  canon: dict[str, str] = {}
  for name in reader.names():
    c = mapping.canonical_name(name, family)
    if c is None:
      continue
    if c in canon:
      raise UnexpectedTensorError(f"tensors {canon[c]!r} and {name!r} both map to {c!r}")
    canon[c] = name
  rules = mapping.rules(cfg, family, shapes, lay.plan, available=set(canon))
  covered = [p for r in rules for p in r.ours]
  missing = sorted(set(shapes) - set(covered), key=str)
  if missing:
    raise ConversionError(f"no Hugging Face tensor maps to model parameters {missing}")

  used: set[str] = set()
  stacked: dict = {}
  with _progress(sum(len(r.hf) for r in rules), f"from_hf {family}", progress) as bar:
    for rule in rules:
      arrays = []
      for name, shape in zip(rule.hf, rule.hf_shapes):
        if name not in canon:
          disk = mapping.disk_name(name, family)
          alias = f" (or {name!r})" if disk != name else ""
          raise MissingTensorError(f"tensor {disk!r}{alias} is missing from {path} (needed for "
                                   f"{['.'.join(map(str, p)) for p in rule.ours]})")
        a = reader.read(canon[name])
        if tuple(a.shape) != shape:
          raise TensorShapeError(f"tensor {canon[name]!r} has shape {tuple(a.shape)}, expected {shape} "
                                 f"for this config.json")
        arrays.append(a)
        used.add(name)
        if bar is not None:
          bar.update(1)
      for p, value in zip(rule.ours, rule.to_ours(arrays)):
        phys, j = lay.physical(p)
        target = flat[phys].get_value()
        value = np.asarray(value).astype(target.dtype)
        if mesh is not None and any(
            d % n for d, n in zip(target.shape, _shards_per_dim(target, mesh))):
          raise ConversionError(
              f"parameter {'.'.join(map(str, phys))} of shape {target.shape} (from {rule.hf[0]!r}) "
              f"cannot be split by {getattr(target.sharding, 'spec', None)} over mesh "
              f"{dict(mesh.shape)}; choose config.mesh sizes that divide it")
        if j is None:
          _set(pure, phys, _place(value, target, mesh))
        else:  # one layer of a stacked (scanned) parameter, written in place on device
          if phys not in stacked:
            stacked[phys] = _zeros(target, mesh)
          layer = jax.ShapeDtypeStruct(target.shape[1:], target.dtype, sharding=_drop_axis0(target))
          stacked[phys] = _set_layer(stacked[phys], _place(value, layer, mesh), j)
      del arrays
  for phys, buf in stacked.items():
    _set(pure, phys, buf)

  used |= _check_lightning_buffers(abstract, cfg, canon, reader, lay)
  if cfg.tie_embeddings and "lm_head.weight" in canon:
    used.add("lm_head.weight")  # a tied copy some checkpoints keep
  extra = sorted(canon[c] for c in set(canon) - used)
  reader.close()
  if extra:
    raise UnexpectedTensorError(f"{len(extra)} tensor(s) in {path} map to no model parameter: "
                                f"{extra[:20]}{' ...' if len(extra) > 20 else ''}")
  nnx.replace_by_pure_dict(params, pure)
  if len(nnx.to_flat_state(rest)):
    rest = _concrete_rest(cfg, mesh)
  return nnx.merge(graphdef, params, rest), config


def _place(value: np.ndarray, target, mesh):
  """Each device receives only its shard of `value` (works across hosts too)."""
  sharding = getattr(target, "sharding", None)
  if mesh is not None and isinstance(sharding, NamedSharding):
    named = NamedSharding(mesh, sharding.spec)
    if named.is_fully_addressable:
      return jax.device_put(value, named)
    return jax.make_array_from_callback(value.shape, named, lambda idx: value[idx])
  return jax.device_put(value)


def _shards_per_dim(target, mesh):
  spec = tuple(getattr(getattr(target, "sharding", None), "spec", ()) or ())
  out = []
  for axes in spec + (None,) * (len(target.shape) - len(spec)):
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    out.append(int(np.prod([mesh.shape[a] for a in axes])) if axes else 1)
  return out


def _drop_axis0(target):
  sharding = getattr(target, "sharding", None)
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
  return None


def _zeros(target, mesh):
  sharding = getattr(target, "sharding", None)
  if mesh is not None and isinstance(sharding, NamedSharding):
    named = NamedSharding(mesh, sharding.spec)
    return jax.jit(lambda: jax.numpy.zeros(target.shape, target.dtype), out_shardings=named)()
  return jax.numpy.zeros(target.shape, target.dtype)


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _concrete_rest(cfg, mesh):
  """Non-parameter state (if a module keeps any) computed by its initialiser under jit."""
  with _mesh_ctx(mesh):
    return jax.jit(lambda: nnx.split(_model_fn(cfg), _STATE, ...)[2])()


def _check_lightning_buffers(model, cfg, canon, reader, lay) -> set[str]:
  """transformers saves each Lightning layer's decay buffers; its slopes must equal ours."""
  used = set()
  for spec, attn in lay.lightning(model):
    i = spec.index
    p = f"model.layers.{i}.self_attn."
    name = p + "slope_rate"
    if name in canon:
      theirs = np.asarray(reader.read(canon[name]), np.float64).reshape(-1)
      ours = np.asarray(getattr(attn, "slopes", ()), np.float64).reshape(-1)
      if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=1e-5, atol=0):
        raise ConversionError(
            f"tensor {canon[name]!r} = {theirs.tolist()} but layer {i}'s lightning attention uses "
            f"slopes {ours.tolist()} (does make_attention pass layer_idx to LightningAttention?)")
    used |= {p + b for b in mapping.LIGHTNING_BUFFERS if p + b in canon}
  return used


def _lightning_buffers(model, cfg, lay):
  """The decay buffers transformers keeps (and saves) per Lightning layer, from our slopes, as
  `MiniMaxLightningAttention.decay_factors` computes them (float32)."""
  bs = int(cfg.lightning_block)
  r = np.arange(1, bs + 1, dtype=np.float32)
  for spec, attn in lay.lightning(model):
    slope = np.asarray(attn.slopes, np.float32)[:, None, None]  # [N, 1, 1]
    diag = (r[:, None] - r[None, :])[None, None] * slope[None]  # [1, N, bs, bs]
    p = f"model.layers.{spec.index}.self_attn."
    yield p + "slope_rate", slope
    yield p + "query_decay", np.exp(-slope * r[:, None])
    yield p + "key_decay", np.exp(-slope * (bs - r[:, None]))
    yield p + "diagonal_decay", np.exp(np.where(diag >= 0, -diag, -np.inf)).astype(np.float32)


def infer_model_type(cfg) -> str:
  """The Hugging Face family that can express this model config."""
  types = set(plan_lib.attention_types(plan_lib.layer_plan(cfg)))
  if "lightning" in types or cfg.post_norm_residual:
    return "minimax"
  if "msa" in types or cfg.norm_zero_centered or cfg.qk_norm == "per_head":
    return "minimax_m3_vl_text"
  if cfg.qk_norm == "full":
    return "minimax_m2"
  return "mixtral"


def to_hf(model, config, out_dir: str, *, model_type: str | None = None, dtype: str | None = None,
          max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> str:
  """Writes `model` as a Hugging Face directory (config.json + safetensors) that
  `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

  config: the experiment config (or just its model ConfigDict). model_type: the HF family
  (default: inferred from the config; minimax_m3_vl is written as minimax_m3_vl_text).
  dtype: tensor dtype on disk ('float32' | 'bfloat16' | 'float16'; default the param dtype; the
  router selection bias always stays float32). Returns out_dir.
  """
  cfg = config.model if "model" in config else config
  family = model_type or infer_model_type(cfg)
  if family == "minimax_m3_vl":
    family = "minimax_m3_vl_text"
  hf = hf_config.from_model_config(cfg, family)
  params = nnx.state(model, _STATE)
  flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(params)}
  lay = _Layers(cfg)
  shapes = lay.logical_shapes({p: tuple(v.shape) for p, v in flat.items()})
  rules = mapping.rules(cfg, family, shapes, lay.plan, available=None)
  missing = sorted(set(shapes) - {p for r in rules for p in r.ours}, key=str)
  if missing:
    raise ConversionError(f"model parameters {missing} have no Hugging Face tensor")
  out_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
  hf["dtype"] = str(dtype or cfg.param_dtype)
  # Every process joins the gathers of sharded arrays; process 0 writes.
  primary = jax.process_index() == 0
  writer = ShardedWriter(out_dir, max_shard_bytes) if primary else None
  with _progress(len(rules), f"to_hf {family}", progress) as bar:
    for rule in rules:
      ours = []
      for p in rule.ours:
        phys, j = lay.physical(p)
        ours.append(_to_host(flat[phys] if j is None else flat[phys][j]))
      keep32 = any(p[-1] == "e_score_correction_bias" for p in rule.ours)
      for name, shape, a in zip(rule.hf, rule.hf_shapes, rule.to_hf(ours)):
        assert tuple(a.shape) == shape, (name, a.shape, shape)
        if primary:
          writer.add(mapping.disk_name(name, family),
                     np.ascontiguousarray(a.astype(np.float32 if keep32 else out_dtype)))
      if bar is not None:
        bar.update(1)
  if not primary:
    return out_dir
  for name, a in _lightning_buffers(model, cfg, lay):
    writer.add(name, a.astype(out_dtype))
  writer.close()
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  return out_dir

"""Bad inputs fail early, naming what is wrong: CLI None values, eval settings, corrupt safetensors
files, generate arguments."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from mixtral_jax import config as config_lib
from mixtral_jax.convert import safetensors_io
from mixtral_jax.model import generate
from mixtral_jax.model.transformer import Transformer

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "experiments", "quickstart.py")


def parse(*overrides):
  """The config the train/evaluate CLIs would see for these --config.* flags."""
  fv = flags.FlagValues()
  argv = ["prog", f"--config={QUICKSTART}", *overrides]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return config_lib.resolve_cli_none(fv.config)


def test_none_and_strings_reachable_from_the_cli():
  c = parse("--config.model.attention_impl=None", "--config.model.moe.grouped_matmul=blocked")
  assert c.model.attention_impl is None and c.model.moe.grouped_matmul == "blocked"
  config_lib.validate(c)
  c = parse("--config.model.attention_impl=pallas_tpu", "--config.model.moe.grouped_matmul=None")
  assert c.model.attention_impl == "pallas_tpu" and c.model.moe.grouped_matmul is None
  # An experiment that sets a None default in Python can still be overridden with a string.
  c = config_lib.default_config()
  c.model.attention_impl = None
  c.model.attention_impl = "xla"
  assert c.model.attention_impl == "xla"


def _none_defaults(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _none_defaults(v, f"{prefix}{k}.")
    elif v is None:
      yield prefix + k


def test_every_none_default_is_settable_from_the_cli():
  # A plain None default makes ml_collections refuse any override ("NoneType ... not supported"):
  # such fields must be typed references listed in NONE_FIELDS.
  nones = sorted(_none_defaults(config_lib.default_config().to_dict()))
  assert nones and set(nones) <= set(config_lib.NONE_FIELDS), nones
  for field in nones:
    c = parse(f"--config.{field}=some_string")
    node = c
    for part in field.split("."):
      node = node[part]
    assert node == "some_string", field


@pytest.mark.parametrize("field, value, match", [
    ("num_examples", 0, "eval.num_examples: must be a positive integer"),
    ("batch_size", 0, "eval.batch_size: must be a positive integer"),
    ("lengths", (8,), "eval.lengths: 8 is shorter than the tasks' minimum length 64"),
    ("lengths", (64, -128), "eval.lengths: must be positive integers"),
    ("lengths", (), "eval.lengths: must be a non-empty"),
    ("tasks", ("mqar", "nope"), "eval.tasks: unknown task 'nope'"),
])
def test_eval_settings_validated_naming_the_field(field, value, match):
  c = config_lib.default_config()
  c.eval[field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


def _write(tmp_path):
  path = str(tmp_path / "model.safetensors")
  safetensors_io.save_file({"a.weight": np.ones((4, 8), np.float32),
                            "b.weight": np.arange(64, dtype=np.float32)}, path)
  return path


def test_safetensors_random_bytes_names_the_file(tmp_path):
  path = str(tmp_path / "model.safetensors")
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(4096))
  with pytest.raises(safetensors_io.CheckpointFormatError, match=f"{path}: not a safetensors"):
    safetensors_io.SafetensorsReader(path)
  with open(path, "wb") as f:  # a plausible length, then garbage where the JSON should be
    f.write((16).to_bytes(8, "little") + b"\xff" * 100)
  with pytest.raises(safetensors_io.CheckpointFormatError, match="header is not JSON"):
    safetensors_io.SafetensorsReader(path)


def test_safetensors_truncated_names_the_file_and_tensor(tmp_path):
  path = _write(tmp_path)
  safetensors_io.SafetensorsReader(path).close()
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(safetensors_io.CheckpointFormatError,
                     match=rf"{path}: tensor 'b.weight' .* truncated"):
    safetensors_io.SafetensorsReader(str(tmp_path))


@pytest.fixture(scope="module")
def model():
  c = config_lib.default_config().model
  c.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, rotary_dim=16)
  c.moe.update(num_experts=2, top_k=1, expert_dim=16)
  # Shapes only: every check below fails before a parameter is read.
  return nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[[1, 256]]), r"prompt_BT: token ids must be in \[0, vocab_size=256\), got 256"),
    (dict(prompt=[[-1, 3]]), "prompt_BT: token ids .* got -1"),
    (dict(prompt=[[1.0, 2.0]]), "prompt_BT: expected integer"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=-1.0), "temperature must be finite and >= 0"),
    (dict(max_len=0), "max_len must be a positive int"),
    (dict(max_len=3), "max_len=3 cannot hold"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(prompt_lengths=[1, 2]), r"prompt_lengths: expected ints of shape \(1,\), .* \(2,\)"),
    (dict(prompt_lengths=[[3]]), "prompt_lengths: expected ints of shape"),
    (dict(prompt_lengths=[2.0]), "prompt_lengths: expected ints .* got float64"),
    (dict(prompt_lengths=[0]), r"prompt_lengths: each length must be in \[1, T=3\], got 0"),
    (dict(prompt_lengths=[4]), r"prompt_lengths: each length must be in \[1, T=3\], got 4"),
    (dict(prompt=[[1, 2, 256]], prompt_lengths=[3]), "prompt_BT: token ids .* got 256"),
    (dict(prompt_lengths=[2], max_len=4), "max_len=4 cannot hold the prompt \\(2\\) plus 4"),
])
def test_generate_validates_arguments(model, kwargs, match):
  prompt = jnp.asarray(kwargs.pop("prompt", [[1, 2, 3]]))
  if prompt.dtype == jnp.float32:
    prompt = prompt.astype(jnp.float32)
  else:
    prompt = prompt.astype(jnp.int32)
  n = kwargs.pop("max_new_tokens", 4)
  with pytest.raises(ValueError, match=match):
    generate.generate(model, prompt, n, **kwargs)


def test_requested_kernel_falling_back_warns_once(caplog):
  import logging
  from mixtral_jax.model.attention import common
  c = config_lib.default_config().model
  c.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, rotary_dim=16,
           attention_pattern=("full",), attention_impl="pallas_tpu")
  c.moe.update(num_experts=2, top_k=1, expert_dim=16)
  m = nnx.jit(lambda: Transformer(c, rngs=nnx.Rngs(0)))()
  common._FALLBACK_LOGGED.clear()  # other tests in this process may have logged it already
  with caplog.at_level(logging.WARNING):
    for t in (16, 24):  # two traces, both through the fallback (a prefill into a longer cache)
      generate.prefill(m, jnp.zeros((1, t), jnp.int32), max_len=32)
  hits = [r for r in caplog.records if "pallas_tpu" in r.getMessage() and "XLA" in r.getMessage()]
  assert len(hits) == 1 and hits[0].levelno == logging.WARNING, [r.getMessage() for r in hits]

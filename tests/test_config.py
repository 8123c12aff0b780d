"""Config errors fail before anything compiles, with a message that names the field."""
import subprocess
import sys

import pytest

from mixtral_jax import config as config_lib
from mixtral_jax.config import ConfigError


def _cfg():
  return config_lib.default_config()


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.model.update(num_heads=6, num_kv_heads=4), "model.num_heads"),
    (lambda c: c.model.update(attention_pattern=("swa",), window=1024), "model.window"),
    (lambda c: c.model.update(attention_pattern=("full", "flash")), "model.attention_pattern"),
    (lambda c: c.model.moe.update(top_k=5), "model.moe.top_k"),
    (lambda c: c.model.moe.update(router="relu"), "model.moe.router"),
    (lambda c: c.model.moe.update(dispatch="drop"), "model.moe.dispatch"),
    (lambda c: c.model.update(rotary_dim=3), "model.rotary_dim"),
    (lambda c: c.model.update(qk_norm="layer"), "model.qk_norm"),
    (lambda c: c.model.update(attention_pattern=("msa",)) or c.model.msa.update(selection="x"),
     "model.msa.selection"),
    (lambda c: c.model.update(mlp_activation="gelu"), "model.mlp_activation"),
    (lambda c: c.model.update(attention_pattern=("msa",)) or c.model.msa.update(top_k=2, local_blocks=3),
     "model.msa.local_blocks"),
    (lambda c: c.model.update(attention_impl="pallas_tpu", attention_block=96), "model.attention_block"),
    (lambda c: c.model.moe.update(use_bias=True, bias_update_rate=-1e-3), "model.moe.bias_update_rate"),
    (lambda c: c.train.update(warmup_steps=1000), "train.warmup_steps"),
    (lambda c: c.train.update(batch_size=6), "train.batch_size"),
    (lambda c: c.mesh.update(data=3), "mesh"),
    (lambda c: c.mesh.update(data=-1, tensor=3), "mesh.data"),
    (lambda c: c.mesh.update(data=-1, tensor=-1), "mesh"),
    (lambda c: setattr(c.data, "tasks", {}), "data.tasks"),
])
def test_config_errors_name_the_field(mutate, field):
  c = _cfg()
  mutate(c)
  with pytest.raises(ConfigError, match=f"config\\.{field.replace('.', '[.]')}"):
    config_lib.validate(c, num_devices=8)


def test_default_config_is_valid():
  config_lib.validate(_cfg(), num_devices=8)


def test_pattern_repeats_to_layers():
  assert config_lib.pattern_for_layers(("lightning",) * 3 + ("full",), 8) == (
      ("lightning",) * 3 + ("full",)) * 2


def test_mesh_shape_resolves_the_free_axis_and_names_bad_fields():
  mesh = dict(data=-1, fsdp=2, expert=1, tensor=2)
  assert config_lib.mesh_shape(mesh, 8) == dict(data=2, fsdp=2, expert=1, tensor=2)
  with pytest.raises(ConfigError, match=r"config\.mesh\.data"):
    config_lib.mesh_shape(mesh, 6)
  with pytest.raises(ConfigError, match="only one axis"):
    config_lib.mesh_shape(dict(mesh, fsdp=-1), 8)
  with pytest.raises(ConfigError, match=r"config\.mesh\.tensor"):
    config_lib.mesh_shape(dict(mesh, tensor=0), 8)


def test_config_imports_neither_jax_nor_sharding():
  # config sits below sharding in the import graph: sharding imports it, never the reverse.
  code = ("import sys, mixtral_jax.config; "
          "assert 'mixtral_jax.sharding' not in sys.modules and 'jax' not in sys.modules, "
          "sorted(m for m in sys.modules if 'jax' in m)")
  subprocess.run([sys.executable, "-c", code], check=True)

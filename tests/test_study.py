"""The multi-hop study driver end to end at smoke size: sweep, resume, report, plots, determinism."""
import json
import os

import pytest

from mixtral_jax.experiments import multihop
from mixtral_jax.study import report as report_lib
from mixtral_jax.study import sweep

TIMING = ("tokens_per_second", "mfu")


def test_multihop_config_variants():
  for variant in multihop.VARIANTS:
    c = multihop.get_config(variant)
    assert c.train.seq_len >= 8 * c.model.window
    assert c.model.moe.router == "sigmoid" and c.model.moe.use_bias
    assert set(c.eval.tasks) == set(multihop.EVAL_TASKS)
    assert c.eval.lengths == (c.train.seq_len, 2 * c.train.seq_len)
  pats = {v: multihop.get_config(v).model.attention_pattern for v in multihop.VARIANTS}
  assert pats["swa_hybrid"] == ("swa", "swa", "swa", "full")
  assert pats["msa"] == ("full", "msa", "msa", "msa")
  assert report_lib.global_layers(multihop.get_config("swa_hybrid,deep").model.attention_pattern) == 2
  # The variants differ in attention only.
  base = multihop.get_config("full").to_dict()
  for variant in multihop.VARIANTS:
    other = multihop.get_config(variant).to_dict()
    other["model"]["attention_pattern"] = base["model"]["attention_pattern"]
    assert other == base, variant
  half = sweep.run_config("msa", 3, steps=600)
  assert (half.seed, half.train.steps, half.train.warmup_steps) == (3, 600, 20)
  assert half.data.curriculum == ((120, 64), (240, 128), (360, 256))
  with pytest.raises(ValueError, match="variant"):
    multihop.get_config("smoke")
  with pytest.raises(ValueError, match="unknown"):
    multihop.get_config("full,bogus")


def test_multihop_full_size_shapes():
  """Every full-size variant validates and traces at 2x the training length (no memory used)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mixtral_jax import config as config_lib
  from mixtral_jax.model.transformer import Transformer, count_params
  totals = {}
  for variant in multihop.VARIANTS:
    c = multihop.get_config(variant)
    config_lib.validate(c, 1)
    model = nnx.eval_shape(lambda: Transformer(c.model, rngs=nnx.Rngs(0)))
    tokens = jax.ShapeDtypeStruct((2, 2 * c.train.seq_len), jnp.int32)
    assert jax.eval_shape(lambda m, x: m(x), model, tokens).shape == (2, 2 * c.train.seq_len, 256)
    totals[variant] = count_params(nnx.state(model, nnx.Param), c.model)["total"]
  # Same MoE everywhere: only Lightning's gate/norm and MSA's indexer add parameters.
  assert totals["full"] == totals["swa"] == totals["swa_hybrid"] == totals["moba"] == 7_219_712
  assert totals["full"] < totals["msa"] < totals["lightning_hybrid"] < 1.06 * totals["full"]


def test_sweep_end_to_end_resume_and_determinism(tmp_path, monkeypatch):
  """2 variants x 1 seed through `--jobs=2` subprocesses on one CPU device each (compiling for
  conftest's 8 fake devices would triple the time), then the same run again in a fresh workdir."""
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if "xla_force_host_platform_device_count" not in f)
  monkeypatch.setenv("XLA_FLAGS", flags)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The rerun reuses the compiled programs (a fresh trainer compiles the same programs again).
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla_cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  workdir = str(tmp_path / "sweep")
  variants = ["swa_hybrid", "full"]
  report = sweep.run_sweep(workdir, variants, [0], modifiers=("smoke",), jobs=2)
  for name in ("report.json", "report.md", "accuracy_vs_hops.png", "accuracy_vs_length.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "accuracy_vs_hops.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "report.json")) as f:
    on_disk = json.load(f)
  assert list(on_disk["summary"]) == variants and on_disk["meta"]["device"] == "1 x cpu"
  for variant, s in on_disk["summary"].items():
    assert set(s["accuracy"]) == set(multihop.EVAL_TASKS)
    for by_len in s["accuracy"].values():
      assert set(by_len) == {"64", "128"}
      assert all(st["n"] == 1 and 0.0 <= st["mean"] <= 1.0 for st in by_len.values())
    assert s["decode_ms"]["mean"] > 0 and s["step_ms"]["mean"] > 0
  assert on_disk["summary"]["swa_hybrid"]["global_layers"] == 1
  assert on_disk["summary"]["full"]["global_layers"] == 4
  table = report_lib.format_markdown(report)
  assert "decode ms @ 256 (XLA)" in table and "| swa_hybrid | 1 |" in table
  assert "vt h4" in table and "(training length)" in table

  # A finished run is read back, not retrained; a finished run of other steps is refused.
  run_json = os.path.join(workdir, "swa_hybrid", "seed0", "run.json")
  mtime = os.path.getmtime(run_json)
  again = sweep.run_sweep(workdir, variants, [0], modifiers=("smoke",))
  assert os.path.getmtime(run_json) == mtime and again["runs"] == report["runs"]
  with pytest.raises(ValueError, match="workdir"):
    sweep.run_one("swa_hybrid", 0, workdir, ("smoke",), steps=3)

  # Same variant, same seed, fresh workdir: the same weights and numbers.
  first = report["runs"][0]
  other = str(tmp_path / "again")
  sweep.run_sweep(other, ["swa_hybrid"], [0], modifiers=("smoke",), jobs=2, summarize=False)
  with open(os.path.join(other, "swa_hybrid", "seed0", "run.json")) as f:
    rerun = json.load(f)
  assert rerun["param_checksum"] == first["param_checksum"]
  assert rerun["accuracy"] == first["accuracy"]
  assert rerun["token_accuracy"] == first["token_accuracy"]
  drop = lambda m: {k: v for k, v in m.items() if k not in TIMING}
  assert drop(rerun["final_metrics"]) == drop(first["final_metrics"])
  assert report["runs"][1]["param_checksum"] != first["param_checksum"]  # the check can fail


def test_report_stats_over_seeds():
  runs = []
  for seed, acc in ((0, 0.5), (1, 1.0)):
    runs.append({"variant": "full", "seed": seed, "attention_pattern": ["full"] * 4,
                 "accuracy": {"variable_tracking_h1": {"64": acc}}, "decode_ms": 2.0,
                 "step_ms": None, "train_seconds": 1.0, "final_loss": acc, "train_seq_len": 64,
                 "window": 16, "decode_context": 256, "decode_implementation": "xla"})
  r = report_lib.build(runs, {"date": "d", "device": "cpu", "jax": "x", "seeds": [0, 1],
                               "modifiers": []})
  st = r["summary"]["full"]["accuracy"]["variable_tracking_h1"]["64"]
  assert (st["mean"], st["std"], st["min"], st["max"], st["n"]) == (0.75, 0.25, 0.5, 1.0, 2)
  assert r["summary"]["full"]["step_ms"]["n"] == 0
  assert "0.75 ± 0.25" in report_lib.format_markdown(r)

"""mixtral_jax.evaluate end to end on a tiny run: restore, score at several lengths, report + plot."""
import json

import pytest

from mixtral_jax import evaluate
from mixtral_jax.experiments import quickstart
from mixtral_jax.trainer import trainer


def tiny_config():
  c = quickstart.get_config()
  c.model.update(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, rotary_dim=16, window=16)
  c.model.moe.update(num_experts=4, expert_dim=32)
  c.mesh.update(data=2, fsdp=1, expert=1, tensor=-1)
  c.train.update(steps=4, batch_size=4, log_every=2, checkpoint_every=4, warmup_steps=1)
  c.eval.update(lengths=(64, 96), num_examples=6, batch_size=4)
  c.data.tasks = {"mqar": 1.0, "variable_tracking": 1.0}
  return c


def test_evaluate_writes_report_and_plot(tmp_path):
  c = tiny_config()
  trainer.train(c, str(tmp_path), progress=False)
  report = evaluate.run(c, str(tmp_path))
  assert report["step"] == 4
  with open(tmp_path / "report.json") as f:
    on_disk = json.load(f)
  assert on_disk["accuracy"] == report["accuracy"]
  for key in ("accuracy", "token_accuracy"):
    assert set(report[key]) == {"mqar", "variable_tracking"}
    for task, by_len in report[key].items():
      assert set(by_len) == {"64", "96"}
      assert all(0.0 <= a <= 1.0 for a in by_len.values())
  assert all(n > 0 for by_len in report["answers"].values() for n in by_len.values())
  # Held-out perplexity of an almost untrained model over the 256-id vocabulary: finite, large.
  assert all(1.0 < p < 1e4 for p in report["perplexity"].values())
  png = tmp_path / "accuracy_vs_length.png"
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "exact match" in evaluate.format_table(report)


def test_evaluate_without_checkpoint_names_the_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="workdir"):
    evaluate.run(tiny_config(), str(tmp_path))

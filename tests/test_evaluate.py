"""mixtral_jax.evaluate end to end on a tiny run: restore, score at several lengths, report + plot."""
import json
import os
import subprocess
import sys

import pytest

from mixtral_jax import config as config_lib
from mixtral_jax import evaluation
from mixtral_jax.experiments import quickstart
from mixtral_jax.trainer import trainer
from mixtral_jax.trainer import workdir as workdir_lib


def tiny_config():
  c = quickstart.get_config()
  c.model.update(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, rotary_dim=16, window=16)
  c.model.moe.update(num_experts=4, expert_dim=32)
  c.mesh.update(data=2, fsdp=1, expert=1, tensor=-1)
  c.train.update(steps=4, batch_size=4, log_every=2, checkpoint_every=4, warmup_steps=1)
  c.eval.update(lengths=(64, 96), num_examples=6, batch_size=4)
  c.data.tasks = {"mqar": 1.0, "variable_tracking": 1.0}
  return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train(tiny_config(), workdir, progress=False)
  return workdir


def test_evaluate_writes_report_and_plot(run_dir):
  report = evaluation.run(None, run_dir)  # the run's own config.json: only the workdir is needed
  assert report["step"] == 4
  with open(os.path.join(run_dir, "report.json")) as f:
    on_disk = json.load(f)
  assert on_disk["accuracy"] == report["accuracy"]
  for key in ("accuracy", "token_accuracy"):
    assert set(report[key]) == {"mqar", "variable_tracking"}
    for task, by_len in report[key].items():
      assert set(by_len) == {"64", "96"}
      assert all(0.0 <= a <= 1.0 for a in by_len.values())
  assert all(n > 0 for by_len in report["answers"].values() for n in by_len.values())
  assert report["answer_tokens"]["variable_tracking"]["64"] == 5 * report["answers"][
      "variable_tracking"]["64"]  # five variables per answer
  assert report["chance_per_token"] == {"mqar": 1 / 64, "variable_tracking": 1 / 64}
  assert report["model"] == "swa/full, 2 layers, d_model 32, 4 experts top-2"
  # Held-out perplexity of an almost untrained model over the 256-id vocabulary: finite, large.
  assert all(1.0 < p < 1e4 for p in report["perplexity"].values())
  png = os.path.join(run_dir, "accuracy_vs_length.png")
  assert open(png, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "exact match" in evaluation.format_table(report)


def _plot_lines(report, tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  seen = {}
  save = plt.Figure.savefig
  def grab(fig, *a, **k):
    ax = fig.axes[0]
    seen.update(title=ax.get_title(), labels=ax.get_legend_handles_labels()[1],
                xlim=ax.get_xlim(), xticks=list(ax.get_xticks()))
    return save(fig, *a, **k)
  plt.Figure.savefig = grab
  try:
    evaluation.plot(report, str(tmp_path / "p.png"))
  finally:
    plt.Figure.savefig = save
  return seen


def test_plot_chance_error_bars_title_and_distinct_curves(tmp_path):
  report = {"accuracy": {"mqar": {"64": 0.5, "256": 0.1}, "variable_tracking": {"64": 0.4, "256": 0.0}},
            "token_accuracy": {"mqar": {"64": 0.5, "256": 0.1},
                               "variable_tracking": {"64": 0.8, "256": 0.2}},
            "answers": {"mqar": {"64": 100, "256": 100}, "variable_tracking": {"64": 50, "256": 50}},
            "answer_tokens": {"mqar": {"64": 100, "256": 100},
                              "variable_tracking": {"64": 250, "256": 250}},
            "chance_per_token": {"mqar": 1 / 64, "variable_tracking": 1 / 64},
            "train_seq_len": 64, "window": 16, "attention_pattern": ["swa", "full"],
            "model": "swa/full, 2 layers", "step": 3000}
  seen = _plot_lines(report, tmp_path)
  assert "step 3000" in seen["title"] and "swa/full, 2 layers" in seen["title"]
  labels = seen["labels"]
  # MQAR's two metrics coincide: one curve. Variable tracking's differ: two.
  assert "mqar: exact match = answer tokens" in labels and "mqar: answer tokens" not in labels
  assert {"variable_tracking: exact match", "variable_tracking: answer tokens"} <= set(labels)
  assert [l for l in labels if "chance" in l] == ["chance per answer token: 1/64"]  # shared
  assert seen["xticks"] == [64, 256] and 32 < seen["xlim"][0] < 64  # no empty left third
  lo, hi = evaluation.wilson_interval(0.5, 100)
  assert 0.40 < lo < 0.41 and 0.59 < hi < 0.60
  assert evaluation.wilson_interval(0.0, 50)[0] == 0.0 < evaluation.wilson_interval(0.0, 50)[1]


def test_evaluate_refuses_a_different_model_and_allows_named_fields(run_dir):
  c = tiny_config()
  c.model.attention_pattern = ("full", "full")
  with pytest.raises(workdir_lib.ConfigMismatchError,
                     match=r"model\.attention_pattern: \['swa', 'full'\] in the run"):
    evaluation.run(c, run_dir)
  c.eval.update(lengths=(64,), tasks=("mqar",), perplexity=False)
  report = evaluation.run(c, run_dir, allow_config_change=["attention_pattern"])  # same shapes
  assert report["attention_pattern"] == ["full", "full"]


def test_failed_validation_leaves_the_report_alone(run_dir):
  path = os.path.join(run_dir, "report.json")
  before = open(path).read() if os.path.exists(path) else None
  c = tiny_config()
  c.eval.num_examples = 0
  with pytest.raises(config_lib.ConfigError, match="eval.num_examples"):
    evaluation.run(c, run_dir)
  assert (open(path).read() if os.path.exists(path) else None) == before


def test_evaluate_without_checkpoint_names_the_workdir_and_creates_nothing(tmp_path):
  workdir_lib.write_config(str(tmp_path), tiny_config())
  with pytest.raises(FileNotFoundError, match="workdir: no checkpoint"):
    evaluation.run(None, str(tmp_path))
  assert os.listdir(tmp_path) == ["config.json"]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluation.run(None, str(tmp_path / "nothing_here"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    evaluation.run(None, str(tmp_path / "empty"))
  assert os.listdir(tmp_path / "empty") == []


def test_cli_help_is_fast_and_lists_flags():
  # --help must not import jax: the flags live at module level, the work in main().
  for module in ("mixtral_jax.evaluate", "mixtral_jax.train"):
    out = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('jax' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", (module, out.stderr)
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert "--allow_config_change" in out.stdout and "--workdir" in out.stdout, (out.stdout,
                                                                                  out.stderr)

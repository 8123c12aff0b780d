"""benchmarks/multi_gpu.py --smoke on 8 fake CPU devices: the N-GPU command's three parts run, its
expert-parallel check passes at f32, and its report names every target."""
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "multi_gpu.py")


def test_multi_gpu_smoke(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets its own
  proc = subprocess.run([sys.executable, os.path.abspath(SCRIPT), "--smoke", "--out", str(tmp_path)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = json.load(open(tmp_path / "multi_gpu.json"))["rows"]
  assert {r["part"] for r in rows} == {"check", "collectives", "step"}, rows
  check = next(r for r in rows if r["part"] == "check")
  assert check["ok"] and check["dtype"] == "float32" and check["worst_grad_rel_err"] < 1e-4
  steps = {(r["mesh"], r["no_exchange"]) for r in rows if r["part"] == "step"}
  assert steps == {("1 GPU", False), ("expert=8", False), ("expert=8", True)}, steps
  md = open(tmp_path / "multi_gpu.md").read()
  assert "| ragged dispatch busbw" in md and "tokens/s per GPU with expert=8" in md

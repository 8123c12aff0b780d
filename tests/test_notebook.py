"""notebooks/quickstart.ipynb runs top to bottom on CPU (a few training steps), as on Colab."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  # The kernel inherits this environment. One CPU device, as on a Colab CPU/GPU runtime (the
  # conftest's 8 fake devices would only slow the compiles down).
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
  monkeypatch.setenv("QUICKSTART_STEPS", "12")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", []))
             for i, c in enumerate(nb.cells) if c.cell_type == "code"}
  text = "\n".join(outputs.values())
  assert "12 steps" in text and "generated:" in text and "answers right:" in text
  err = float(text.split("max |kernel - reference| = ")[1].split()[0])
  assert err < 1e-4, err
  images = sum(1 for c in nb.cells for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))
  assert images >= 4  # loss curve, MSA selection, expert loads, kernel tiles

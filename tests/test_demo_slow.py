"""The README's demo command, end to end (slow: about 5 minutes on 2 CPU cores)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_is_clearly_better_than_chance(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "ccl_jax.main", "--config", os.path.join(REPO, "configs", "demo.py"),
       "--workdir", str(tmp_path / "work"), f"--config.dataset.data_dir={tmp_path / 'data'}"],
      capture_output=True, text=True, cwd=REPO, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "work" / "metrics.json") as f:
    mean = json.load(f)["metrics"]["mean"]
  assert mean["image_auroc"] > 0.8 and mean["pixel_auroc"] > 0.9, mean

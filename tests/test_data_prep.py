"""The dataset preparation command."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prepare(*args):
  return subprocess.run([sys.executable, "-m", "data_prep.prepare_dataset", *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


def test_prepares_then_reuses_and_reports_bad_input(tmp_path):
  data_dir = str(tmp_path / "data")
  first = _prepare("--dataset=synthetic", f"--data_dir={data_dir}", "--image_size=32",
                   "--classes=carpet,washer")
  assert first.returncode == 0, first.stderr[-2000:]
  assert "2 classes, 80 train / 44 test images ready" in first.stdout
  prepared = sorted(d for d in os.listdir(os.path.join(data_dir, "synthetic_ad"))
                    if not d.startswith("."))
  assert prepared == ["carpet_32", "washer_32"]
  again = _prepare("--dataset=synthetic", f"--data_dir={data_dir}", "--image_size=32",
                   "--classes=carpet,washer")
  assert again.returncode == 0 and "ready" in again.stdout
  missing = _prepare("--dataset=mvtec_ad", f"--manual_dir={tmp_path / 'nowhere'}",
                     f"--data_dir={data_dir}")
  assert missing.returncode == 1
  assert "nowhere" in missing.stderr

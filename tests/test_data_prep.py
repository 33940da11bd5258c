"""The dataset preparation command."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from ccl_jax import datasets
from ccl_jax.datasets import layouts

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
  prepared = sorted(d for d in os.listdir(os.path.join(data_dir, "synthetic"))
                    if not d.startswith("."))
  assert prepared == ["carpet_32", "washer_32"]
  again = _prepare("--dataset=synthetic", f"--data_dir={data_dir}", "--image_size=32",
                   "--classes=carpet,washer")
  assert again.returncode == 0 and "ready" in again.stdout
  missing = _prepare("--dataset=mvtec_ad", f"--manual_dir={tmp_path / 'nowhere'}",
                     f"--data_dir={data_dir}")
  assert missing.returncode == 1
  assert "nowhere" in missing.stderr


def test_reading_options_are_flags_and_masks_resize_as_the_authors_do(make_mvtec_tree,
                                                                      tmp_path):
  root = make_mvtec_tree(tmp_path / "mvtec", classes=("bottle",))
  # A speckled mask, where nearest and bilinear-then-threshold disagree.
  mask_path = root / "bottle/ground_truth/broken_large/001_mask.png"
  speckles = np.random.default_rng(0).random((48, 48)) < 0.5
  Image.fromarray(speckles.astype(np.uint8) * 255).save(mask_path)
  data_dir = tmp_path / "data"
  bad = _prepare("--dataset=mvtec_ad", f"--manual_dir={root}", f"--data_dir={data_dir}",
                 "--mask_resize=bicubic")
  assert bad.returncode == 1
  assert "dataset.mask_resize='bicubic': expected one of 'nearest', 'bilinear_threshold'" in (
      bad.stderr)
  assert not data_dir.exists()
  done = _prepare("--dataset=mvtec_ad", f"--manual_dir={root}", f"--data_dir={data_dir}",
                  "--image_size=32", "--classes=bottle", "--mask_resize=bilinear_threshold")
  assert done.returncode == 0, done.stderr[-2000:]
  assert [d for d in os.listdir(data_dir / "mvtec_ad") if not d.startswith(".")] == [
      "bottle_32_mask_resizebilinear_threshold"]
  # The masks: bilinear (PIL, antialiased), then above half of 255; not nearest.
  dataset = datasets.load("mvtec_ad", classes=("bottle",), data_dir=data_dir, image_size=32,
                          mask_resize="bilinear_threshold", verbose=False)
  record = next(dataset.test[i] for i in range(len(dataset.test))
                if dataset.test[i]["file_name"].endswith("broken_large/001.png"))
  source = Image.open(mask_path)
  bilinear = np.asarray(source.resize((32, 32), Image.Resampling.BILINEAR)) > 127
  nearest = np.asarray(source.resize((32, 32), Image.Resampling.NEAREST)) > 127
  np.testing.assert_array_equal(record["mask"], bilinear)
  assert not np.array_equal(bilinear, nearest)


def test_real_iad_error_names_the_folder_once(tmp_path):
  # The official JSONs' prefix ends with '/': the expected folder has no doubled slash.
  (tmp_path / "realiad_jsons").mkdir()
  (tmp_path / "realiad_jsons/pcb.json").write_text(json.dumps(
      {"meta": {"prefix": "pcb/", "normal_class": "OK"}, "train": [], "test": []}))
  problems = []
  assert layouts.scan_real_iad(tmp_path, "pcb", problems, resolution="1024") == []
  assert "(expected realiad_1024/pcb/)" in problems[0][1]

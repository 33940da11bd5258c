"""data_prep.photo_parts: real-photograph classes with drawn-in defects, in MVTec AD's layout."""
import hashlib

import numpy as np
import pytest

from ccl_jax.datasets import folder_layout
from data_prep import photo_parts


def _digest(root):
  h = hashlib.sha256()
  for p in sorted(root.rglob("*.png")):
    h.update(p.relative_to(root).as_posix().encode())
    h.update(p.read_bytes())
  return h.hexdigest()


def test_the_folder_dataset_reads_every_class_with_masks(tmp_path):
  classes = photo_parts.write_photo_parts(tmp_path / "parts", train=5, test_good=2,
                                          test_defective=4, size=64)
  assert classes == ("brick", "grass", "gravel", "moon", "ihc")
  for name in classes:
    problems = []
    samples = folder_layout.scan_folder(tmp_path / "parts", name, problems)
    assert problems == []
    assert [s.split for s in samples].count("train") == 5
    defective = [s for s in samples if s.label == 1]
    assert len(defective) == 4 and all(s.mask_path is not None for s in defective)
    assert {s.defect_type for s in defective} == set(photo_parts.DEFECT_KINDS)


def test_same_seed_same_bytes_and_a_used_folder_is_refused(tmp_path):
  photo_parts.write_photo_parts(tmp_path / "a", photo_set="lookalike", train=2, test_good=1,
                                test_defective=3, size=64, seed=3)
  photo_parts.write_photo_parts(tmp_path / "b", photo_set="lookalike", train=2, test_good=1,
                                test_defective=3, size=64, seed=3)
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
  with pytest.raises(ValueError, match="not empty"):
    photo_parts.write_photo_parts(tmp_path / "a", size=64)


def _overlap(a, b):
  """Whether boxes (y0, x0, y1, x1) share a pixel."""
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("layout", photo_parts.LAYOUTS)
def test_no_test_image_shares_a_pixel_with_a_training_image(layout):
  rng = np.random.default_rng(0)
  side = 32
  corners, test_boxes = photo_parts.plan_crops((300, 500), layout, side, 40, rng)
  squares = [(y, x, y + side, x + side) for y, x in corners]
  assert len(squares) == 40
  assert all(0 <= s[0] and s[2] <= 300 and 0 <= s[1] and s[3] <= 500 for s in squares)
  assert not any(_overlap(s, box) for s in squares for box in test_boxes)
  if layout == "blocks":
    # Training images never overlap one another, and test images come from all over.
    assert not any(_overlap(a, b) for i, a in enumerate(squares) for b in squares[:i])
    assert all(box[2] - box[0] == box[3] - box[1] == 2 * side for box in test_boxes)
    centres = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in test_boxes])
    assert np.ptp(centres[:, 1]) > 250 or np.ptp(centres[:, 0]) > 150
  else:
    assert len(test_boxes) == 1 and test_boxes[0][1] == int(500 * photo_parts.TRAIN_SHARE)


def test_a_photograph_too_small_for_the_training_images_is_refused():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="holds 48 training squares"):
    photo_parts.plan_crops((256, 256), "blocks", 32, 49, rng)
  with pytest.raises(ValueError, match="does not fit both parts"):
    photo_parts.plan_crops((256, 256), "halves", 128, 1, rng)


@pytest.mark.parametrize("kind", photo_parts.DEFECT_KINDS)
def test_a_defect_changes_pixels_only_inside_its_mask(kind):
  rng = np.random.default_rng(1)
  image = np.full((64, 64, 3), 128, np.uint8)
  foreign = np.zeros((64, 64, 3), np.uint8)
  out, mask = photo_parts._defect(image, kind, foreign, rng)
  changed = np.any(out != image, -1)
  # A scratch shows a colour, not a shade of the grey surface.
  assert kind != "scratch" or np.ptp(out[mask].astype(int), axis=-1).min() > 100
  assert mask.sum() > 20 and changed.sum() > 0.5 * mask.sum()
  assert not np.any(changed & ~mask)

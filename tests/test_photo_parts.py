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


def test_training_and_test_crops_come_from_disjoint_parts_of_the_photograph():
  # Each pixel holds its column, so a crop tells where it was cut from.
  width = 500
  photo = np.broadcast_to(np.arange(width, dtype=np.float32)[None, :, None] / 2,
                          (300, width, 3)).astype(np.uint8)
  rng = np.random.default_rng(0)
  split = int(width * photo_parts.TRAIN_SHARE) / 2
  train = [photo_parts._crop(photo, "train", 64, 64, rng) for _ in range(200)]
  test = [photo_parts._crop(photo, "test", 64, 64, rng) for _ in range(200)]
  assert max(c.max() for c in train) < split <= min(c.min() for c in test)
  with pytest.raises(ValueError, match="does not fit the test part"):
    photo_parts._crop(photo, "test", 256, 256, rng)


@pytest.mark.parametrize("kind", photo_parts.DEFECT_KINDS)
def test_a_defect_changes_pixels_only_inside_its_mask(kind):
  rng = np.random.default_rng(1)
  image = np.full((64, 64, 3), 128, np.uint8)
  foreign = np.zeros((64, 64, 3), np.uint8)
  out, mask = photo_parts._defect(image, kind, foreign, rng)
  changed = np.any(out != image, -1)
  assert mask.sum() > 20 and changed.sum() > 0.5 * mask.sum()
  assert not np.any(changed & ~mask)

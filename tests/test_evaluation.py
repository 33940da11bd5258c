"""The test split scored class by class: exact metrics, bounded host memory, every image
once in any layout over processes (ccl_jax/evaluation/streaming.py).

A stand-in detector (the anomaly map is the image's sum over its channels, exact in any
order) keeps these fast: what is checked is the bookkeeping around the model, not the model."""
import tracemalloc

import jax
import numpy as np
import pytest

from ccl_jax.datasets import input_pipeline
from ccl_jax.evaluation import decide, streaming
from ccl_jax.results import writing
from ccl_jax.results import metrics
from ccl_jax.runtime import inference
from ccl_jax.models.detector import Scores

SIZE = 64
BATCH = 8


class _Dataset:
  """The attributes of a loaded dataset that evaluation reads: classes of `per_class` test
  images, every third one anomalous with a brighter rectangle marked in its mask."""

  def __init__(self, num_classes: int, per_class: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.class_names = tuple(f"class{c}" for c in range(num_classes))
    self.test_class_ids = np.repeat(np.arange(num_classes), per_class)
    self.test = []
    for i, c in enumerate(self.test_class_ids):
      image = rng.integers(0, 120, (SIZE, SIZE, 3), dtype=np.uint8)
      mask = np.zeros((SIZE, SIZE), np.uint8)
      label = int(i % 3 == 0)
      if label:
        y, x = rng.integers(0, SIZE - 16, 2)
        mask[y:y + 12, x:x + 12] = 1
        image[mask == 1] += rng.integers(0, 100, dtype=np.uint8)
      self.test.append({"image": image, "mask": mask, "label": label, "class_id": int(c),
                        "file_name": f"class{c}/test/{i:04d}.png"})
    self.train = self.test[:1]


class _MeanDetector:
  """Anomaly map: the image's channel sum; image score: the map's maximum."""

  @staticmethod
  @jax.jit
  def _maps(images):
    return images.astype(np.float32).sum(axis=-1)

  def score(self, images, group_ids):
    del group_ids
    maps = self._maps(images)
    return Scores(maps, maps.max(axis=(1, 2)))


def _map(image):
  return image.astype(np.float32).sum(axis=-1)


def _evaluate(dataset, **kwargs):
  return decide.evaluate_test_set(
      _MeanDetector(), dataset, decide.one_group(dataset),
      global_batch_size=BATCH, batch_sharding=inference.batch_sharding(), **kwargs)


def test_metrics_equal_those_of_the_whole_split_at_once():
  dataset = _Dataset(num_classes=3, per_class=21)  # batches straddle the classes
  summary, outputs = _evaluate(dataset)
  maps = np.stack([_map(r["image"]) for r in dataset.test])
  ids = dataset.test_class_ids
  expected = metrics.summarize({name: {
      "labels": np.array([r["label"] for r in dataset.test])[ids == c],
      "scores": maps[ids == c].max(axis=(1, 2)),
      "masks": np.stack([r["mask"] for r in dataset.test])[ids == c],
      "maps": maps[ids == c]} for c, name in enumerate(dataset.class_names)})
  assert summary == expected
  np.testing.assert_array_equal(outputs["score"], maps.max(axis=(1, 2)))


def _peak_bytes(dataset) -> int:
  tracemalloc.start()
  try:
    _evaluate(dataset)
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_tripling_the_classes_leaves_the_evaluation_memory_flat():
  """With 48 test images per class, 6 classes instead of 2 raise the peak of the host
  memory the evaluation allocates (numpy reports to tracemalloc) by less than 20 %:
  only a class's maps are held at a time. Holding every map, as one array of the whole
  split, would more than double it."""
  _evaluate(_Dataset(num_classes=1, per_class=BATCH))  # compiles outside the measurement
  two, six = (_peak_bytes(_Dataset(num_classes, per_class=48)) for num_classes in (2, 6))
  maps_of_the_split = 6 * 48 * SIZE * SIZE * 4
  assert six < 1.2 * two, (two, six)
  assert six < maps_of_the_split, (six, maps_of_the_split)


def test_views_hold_the_maps_the_figures_show():
  dataset = _Dataset(num_classes=2, per_class=20)
  _, outputs = _evaluate(dataset, heatmaps_per_class=2)
  views = outputs["views"]
  figures = writing.heatmap_figures(dataset, outputs, per_class=2)
  assert [name for name, _, _ in figures] == ["class0"] * 3 + ["class1"] * 3
  for c in range(2):
    rows = np.flatnonzero(dataset.test_class_ids == c)
    maps = np.stack([_map(dataset.test[r]["image"]) for r in rows])
    assert views.ranges[c] == (float(maps.min()), float(maps.max()))
  for position, kept in views.maps.items():
    np.testing.assert_array_equal(kept, _map(dataset.test[position]["image"]))
    np.testing.assert_array_equal(views.masks[position], dataset.test[position]["mask"])
  # Two anomalous and one normal heatmap and up to 6 gallery images per class: no more.
  assert len(views.maps) <= 2 * (3 + 6)


def test_classes_are_dealt_by_size():
  assert streaming.class_owners([10, 40, 30, 20], 2).tolist() == [0, 0, 1, 1]
  assert streaming.class_owners([5, 5, 5], 1).tolist() == [0, 0, 0]
  assert streaming.class_owners([7], 3).tolist() == [0]


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_class_layout_gives_each_process_only_its_classes(process_count):
  class_ids = np.repeat([0, 1, 2, 3, 4], [9, 3, 14, 0, 6])
  owners = streaming.class_owners(np.bincount(class_ids, minlength=5), process_count)
  layout = streaming.class_layout(class_ids, owners, 8, process_count)
  local = 8 // process_count
  real = layout[layout >= 0]
  assert sorted(real.tolist()) == list(range(class_ids.size))  # each image exactly once
  for p in range(process_count):
    rows = layout[:, p * local:(p + 1) * local].ravel()
    assert set(owners[class_ids[rows[rows >= 0]]]) <= {p}
    # In test-split order, the padding after the real rows.
    assert rows[rows >= 0].tolist() == sorted(rows[rows >= 0].tolist())
    assert np.all(rows[np.argmax(rows < 0):] < 0) or np.all(rows >= 0)
  if process_count == 1:
    np.testing.assert_array_equal(layout, input_pipeline.eval_layout(class_ids.size, 8))

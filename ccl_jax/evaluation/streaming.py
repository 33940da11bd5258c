"""The test split scored class by class, in host memory bounded by the largest class.

Every test image is scored exactly once (padded, masked batches, as `ccl_jax.runtime.inference`).
Each class belongs to one process (`class_owners` deals the classes out by image count), and
the eval layout (`class_layout`) puts a class's images only on its owner's rows of each
global batch, so the class's anomaly maps and masks never leave the owner. The owner fills a
class's maps as its batches arrive and computes the class's exact metrics
(`metrics.class_summary`) as soon as its last image is in, then drops them. What is kept:
the image scores and labels of every image on every process (as `inference.run_inference`
returns them), and for the figures the maps of the few images they show and each class's
map range. The classes' results are then exchanged, so every process ends with the same
metrics. With one process every class is its own and the layout is the test split in
order, the batches `run_inference` would form.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from ccl_jax.results import metrics
from ccl_jax.runtime import inference


@dataclasses.dataclass(frozen=True)
class Views:
  """What the figures need of the anomaly maps: the maps and masks of a few test images
  (by position in the test split) and each class's map range (its colour scale)."""
  maps: dict[int, np.ndarray]
  masks: dict[int, np.ndarray]
  ranges: dict[int, tuple[float, float]]


# (positions of one class's images, their scores, their labels) -> the positions whose
# maps the figures show.
KeepRows = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def class_owners(class_sizes: Sequence[int], process_count: int) -> np.ndarray:
  """The process that scores each class: largest class first, each to the process with
  the fewest images so far (ties: the lower process index)."""
  load = np.zeros(process_count, np.int64)
  owners = np.zeros(len(class_sizes), np.int64)
  for c in sorted(range(len(class_sizes)), key=lambda c: -int(class_sizes[c])):
    owners[c] = int(np.argmin(load))
    load[owners[c]] += class_sizes[c]
  return owners


def class_layout(class_ids: np.ndarray, owners: np.ndarray, global_batch_size: int,
                 process_count: int) -> np.ndarray:
  """Eval layout [num_batches, G] (`input_pipeline.eval_batches`) whose process-p rows of
  every batch hold only images of the classes p owns, in test-split order, -1 after them."""
  local = global_batch_size // process_count
  own = [np.flatnonzero(owners[class_ids] == p) for p in range(process_count)]
  num_batches = max(-(-len(positions) // local) for positions in own)
  layout = np.full((num_batches, process_count, local), -1, np.int64)
  for p, positions in enumerate(own):
    column = np.full(num_batches * local, -1, np.int64)
    column[:len(positions)] = positions
    layout[:, p] = column.reshape(num_batches, local)
  return layout.reshape(num_batches, global_batch_size)


@dataclasses.dataclass
class _ClassResult:
  row: dict[str, float]
  skipped: dict[str, str]
  views: Views


class _OwnClasses:
  """The maps and masks of this process's classes as their batches arrive; each class's
  metrics as soon as it is complete."""

  def __init__(self, dataset, positions_of: list[np.ndarray], owned: np.ndarray,
               per_image: inference.PerImage, keep_rows: KeepRows | None):
    self.dataset = dataset
    self.positions_of = positions_of
    self.per_image = per_image
    self.keep_rows = keep_rows
    self.class_ids = np.asarray(dataset.test_class_ids)
    self.offset = np.zeros(len(self.class_ids), np.int64)  # position -> row in its class
    for positions in positions_of:
      self.offset[positions] = np.arange(len(positions))
    self.open: dict[int, list] = {}  # class -> [maps, masks, images filled]
    self.results: dict[int, _ClassResult] = {}
    for c in np.flatnonzero(owned):
      if not len(positions_of[c]):
        self._finish(int(c), np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0), np.uint8))

  def add(self, index: np.ndarray, valid: np.ndarray, maps: np.ndarray,
          masks: np.ndarray) -> None:
    index, maps, masks = index[valid], maps[valid], masks[valid]
    classes = self.class_ids[index]
    for c in np.unique(classes).tolist():
      if c not in self.open:
        n = len(self.positions_of[c])
        self.open[c] = [np.empty((n, *maps.shape[1:]), maps.dtype),
                        np.empty((n, *masks.shape[1:]), masks.dtype), 0]
      entry = self.open[c]
      rows = classes == c
      entry[0][self.offset[index[rows]]] = maps[rows]
      entry[1][self.offset[index[rows]]] = masks[rows]
      entry[2] += int(rows.sum())
      if entry[2] == len(self.positions_of[c]):
        del self.open[c]
        self._finish(c, entry[0], entry[1])

  def _finish(self, c: int, maps: np.ndarray, masks: np.ndarray) -> None:
    positions = self.positions_of[c]
    labels, scores = (self.per_image.fields[name][positions] if len(positions)
                      else np.zeros(0) for name in ("label", "score"))
    row, skipped = metrics.class_summary(
        self.dataset.class_names[c],
        {"labels": labels, "scores": scores, "masks": masks, "maps": maps})
    views = Views({}, {}, {})
    if self.keep_rows is not None and len(positions):
      views.ranges[c] = (float(np.min(maps)), float(np.max(maps)))
      for position in self.keep_rows(positions, scores, labels):
        views.maps[int(position)] = maps[self.offset[position]].copy()
        views.masks[int(position)] = masks[self.offset[position]].copy()
    self.results[c] = _ClassResult(row, skipped, views)


def score_test_split(score_fn, dataset, group_ids: np.ndarray, *, global_batch_size: int,
                     batch_sharding, worker_count: int = 0, keep_rows: KeepRows | None = None
                     ) -> tuple[dict, dict[str, np.ndarray], Views | None]:
  """Metrics per class and their mean (`metrics.summarize`'s result) over the test split,
  each image scored by `score_fn(images, group_id)` -> {'anomaly_map', 'score'} in group
  `group_ids[i]`; the per-image 'score' and 'label' of every image; and, with `keep_rows`,
  the `Views` of the images it picks per class (else None)."""
  class_ids = np.asarray(dataset.test_class_ids)
  num_classes = len(dataset.class_names)
  order = np.argsort(class_ids, kind="stable")
  sizes = np.bincount(class_ids, minlength=num_classes)
  positions_of = np.split(order, np.cumsum(sizes)[:-1])
  owners = class_owners(sizes, jax.process_count())
  per_image = inference.PerImage(len(class_ids))
  own = _OwnClasses(dataset, positions_of, owners == jax.process_index(), per_image,
                    keep_rows)
  if len(class_ids):
    for shared, local in inference.scored_batches(
        score_fn, dataset.test, np.arange(len(class_ids)), outputs=("score",),
        batch_fields=("label",), local_outputs=("anomaly_map",),
        per_image_inputs={"group_id": group_ids}, global_batch_size=global_batch_size,
        batch_sharding=batch_sharding, worker_count=worker_count,
        layout=class_layout(class_ids, owners, global_batch_size, jax.process_count())):
      # The scores first: a class completed by this batch needs them.
      per_image.add(shared.pop("index"), shared.pop("valid"), shared)
      own.add(local["index"], local["valid"], local["anomaly_map"], local["mask"])
    outputs = per_image.result()
  else:
    outputs = {"score": np.zeros(0, np.float32), "label": np.zeros(0, np.int32)}
  if own.open:
    raise RuntimeError(f"Classes {sorted(own.open)} never received all their test images.")
  results: dict[int, _ClassResult] = {}
  for part in inference.all_processes(own.results):
    results.update(part)
  names = dataset.class_names
  summary = metrics.summary_of({names[c]: results[c].row for c in range(num_classes)},
                               {names[c]: results[c].skipped for c in range(num_classes)})
  if keep_rows is None:
    return summary, outputs, None
  views = Views({}, {}, {})
  for result in results.values():
    views.maps.update(result.views.maps)
    views.masks.update(result.views.masks)
    views.ranges.update(result.views.ranges)
  return summary, outputs, views

"""Which data a run reads: the selected dataset(s) and the held-out normal images.

`load_selected` turns the dataset settings into one `AnomalyDataset` (one dataset, or a
mixture in one class-id space); `training_split` separates the normal training images the
model learns from and the held-out ones (validation loss, thresholds).
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
from jax.experimental import multihost_utils

from ccl_jax.datasets.loader import AnomalyDataset, load, load_mixture


# What is read of a run's settings, as structural types: `ccl_jax.config.settings` (above this
# package) provides them as DataSettings and RunSettings.
class DataChoice(Protocol):
  """Which data to read (config block `dataset`)."""
  names: tuple[str, ...]  # one dataset, or a mixture
  manual_dir: str
  data_dir: str
  classes: str | tuple[str, ...]

  def reading_options(self, name: str) -> dict[str, Any]:
    """The options of `load` for dataset `name`."""


class _LabelChoice(Protocol):
  labels_at_training: bool


class HoldOutChoice(Protocol):
  """How the normal training images are split (run-level keys)."""
  dataset: _LabelChoice
  validation_fraction: float
  seed: int
  validation_min_images: int


def load_selected(data: DataChoice, *, image_size: int, is_main: bool) -> AnomalyDataset:
  """One dataset, or a mixture when `data.name` lists several ('mvtec_ad,visa' or
  'all_in_all'); a mixture takes one comma-separated manual_dir per dataset, in order, and
  classes as 'all' or qualified names ('mvtec_ad/bottle,visa/pcb1').

  Process 0 prepares missing data; the others wait for it and then only read.
  """
  names = list(data.names)
  data_dir = os.path.expanduser(data.data_dir)
  options = data.reading_options
  if len(names) == 1:
    def read():
      return load(names[0], classes=data.classes, manual_dir=data.manual_dir or None,
                  data_dir=data_dir, image_size=image_size, **options(names[0]))
  else:
    # Empty entries stay: '' asks the synthetic dataset to generate itself.
    manual_dirs = [m.strip() for m in str(data.manual_dir).split(",")]
    if len(manual_dirs) != len(names):
      raise ValueError(f"dataset.name lists {len(names)} datasets ({', '.join(names)}) but "
                       f"dataset.manual_dir has {len(manual_dirs)} entries "
                       f"({data.manual_dir!r}); give one per dataset, "
                       "comma-separated, in the same order.")
    per_dataset = {n: "all" for n in names}
    if data.classes != "all":
      # A mixture selects classes by qualified name, 'dataset/class'.
      per_dataset = {n: [] for n in names}
      for qualified in data.classes:
        prefix, _, name = qualified.partition("/")
        if prefix not in per_dataset or not name:
          raise ValueError(f"dataset.classes entry {qualified!r}: for a mixture write "
                           f"'<dataset>/<class>' with <dataset> one of {names}.")
        per_dataset[prefix].append(name)
    parts = [{"name": n, "manual_dir": m or None, "classes": per_dataset[n], **options(n)}
             for n, m in zip(names, manual_dirs) if per_dataset[n]]

    def read():
      return load_mixture(parts, data_dir=data_dir, image_size=image_size)
  if is_main:
    dataset = read()
  multihost_utils.sync_global_devices("ccl_jax dataset prepared")
  if not is_main:
    dataset = read()
  return dataset


def load_view_source(data: DataChoice, dataset: AnomalyDataset, *, size: int,
                     is_main: bool):
  """The training records of `dataset` prepared at `size`, index for index: what the
  augmented view is cut from (`augmented_view_source_size`). Preparing reads the same raw
  files in the same order; a source that does not line up is refused."""
  larger = load_selected(data, image_size=size, is_main=is_main)
  ends = {0, len(dataset.train) - 1} if len(dataset.train) else set()
  same = (len(larger.train) == len(dataset.train)
          and np.array_equal(larger.train_class_ids, dataset.train_class_ids)
          and all(larger.train[i]["file_name"] == dataset.train[i]["file_name"] for i in ends))
  if not same:
    raise ValueError(f"The training images prepared at augmented_view_source_size={size} do "
                     f"not match those at the run's image size ({len(larger.train)} vs "
                     f"{len(dataset.train)} records); delete the stale prepared data under "
                     f"{data.data_dir} and rerun.")
  return larger.train


def training_split(run_settings: HoldOutChoice,
                   dataset: AnomalyDataset) -> tuple[np.ndarray, np.ndarray]:
  """Training and held-out normal images. The hold-out (validation loss, thresholds) is
  stratified by class only when class labels are used at training."""
  split_ids = (dataset.train_class_ids if run_settings.dataset.labels_at_training
               else np.zeros_like(dataset.train_class_ids))
  return holdout_split(split_ids, run_settings.validation_fraction, run_settings.seed,
                       min_images=run_settings.validation_min_images)


def holdout_split(class_ids, fraction: float, seed: int, *,
                  min_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Stratified, deterministic train/validation split of training images.

  The validation part is a held-out set of NORMAL training images used for
  early stopping on the validation loss.

  For each class with ``n_c`` images, ``max(round(fraction * n_c), min_images)``
  (round half up) images go to validation, capped so that at least one stays
  in training; a class with fewer than 2 images keeps all of them for
  training. The choice inside a class depends only on ``(seed, class id)``.
  The floor exists for the thresholds: a share of a small class leaves too
  few normal scores to estimate a tail from (5 % of 60 images is 3).

  Args:
    class_ids: int array [n], the class of each source position.
    fraction: share held out, in [0, 1).
    seed: non-negative int.
    min_images: floor of the held-out count per class, >= 0.

  Returns:
    ``(train_indices, validation_indices)``: sorted int64 positions into
    ``class_ids`` (i.e. source indices), disjoint, covering ``range(n)``.
  """
  class_ids = np.asarray(class_ids)
  if class_ids.ndim != 1:
    raise ValueError(f"class_ids must be 1-D, got shape {class_ids.shape}")
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"fraction must be in [0, 1), got {fraction}")
  if min_images < 0:
    raise ValueError(f"min_images must be >= 0, got {min_images}")
  val_parts = []
  for c in np.unique(class_ids):
    members = np.flatnonzero(class_ids == c)
    n_c = members.size
    if n_c < 2:
      continue
    n_val = min(max(int(np.floor(fraction * n_c + 0.5)), min_images), n_c - 1)
    if n_val <= 0:
      continue
    rng = np.random.default_rng([int(seed), int(c) & 0xFFFFFFFF])
    val_parts.append(rng.choice(members, size=n_val, replace=False))
  is_val = np.zeros(class_ids.size, dtype=bool)
  if val_parts:
    is_val[np.concatenate(val_parts)] = True
  return (np.flatnonzero(~is_val).astype(np.int64),
          np.flatnonzero(is_val).astype(np.int64))

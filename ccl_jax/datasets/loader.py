"""The dataset entry point of the training program: :func:`load`.

``load`` prepares (once) one TFDS config per requested class, opens each with
``as_data_source()`` (array_record; no TensorFlow needed) and concatenates
them into :class:`RecordSource` objects with random access. Records::

    image        uint8 [S, S, 3]  (MANTA views='stacked': [5, S, S, 3])
    mask         uint8 [S, S], values {0, 1}  (stacked: [5, S, S])
    class_id     int32, the GLOBAL id = position in AnomalyDataset.class_names
    class_name   str
    label        int32, 0 good / 1 anomalous
    defect_type  str ('good' for normal images)
    file_name    str, path relative to the raw dataset folder (MANTA:
                 plus '#view<k>'; Real-IAD: names object folder and view,
                 see ccl_jax.datasets.realiad_view)
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import operator
import pathlib
import time
import warnings
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from ccl_jax.datasets import synthetic, totals
from ccl_jax.datasets.builders import (
    BUILDERS, _check_image_size, check_num_workers)
from ccl_jax.datasets.common import DatasetError, check_manual_dir, fingerprint

__all__ = ["AnomalyDataset", "RecordSource", "load",
           "load_mixture"]

SYNTHETIC_RAW_DIRNAME = "synthetic_raw"


def _to_str(x) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):  # 0-d object/bytes array
    return _to_str(x.item())
  return str(x)


class RecordSource:
  """Concatenation of per-class TFDS data sources, normalising records.

  ``parts`` is a sequence of ``(data_source, global_class_id)`` or
  ``(data_source, global_class_id, class_name)`` (the name then replaces
  the stored one: mixtures use qualified names). Supports ``len()`` and
  integer indexing (negative indices too); picklable, so grain worker
  processes can use it.
  """

  def __init__(self, parts: Sequence[tuple]):
    self._parts = [(p[0], int(p[1]), p[2] if len(p) > 2 else None)
                   for p in parts]
    self._ends = np.cumsum([len(p[0]) for p in self._parts]).tolist()

  @property
  def parts(self) -> list[tuple[Any, int, str | None]]:
    """``(data_source, global_class_id, class_name or None)`` each."""
    return list(self._parts)

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index) -> dict[str, Any]:
    try:
      i = operator.index(index)
    except TypeError:
      raise TypeError("RecordSource indices must be integers, got "
                      f"{type(index).__name__}") from None
    n = len(self)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"index {index} out of range for RecordSource of "
                       f"length {n}")
    part = bisect.bisect_right(self._ends, i)
    start = self._ends[part - 1] if part else 0
    src, gid, name = self._parts[part]
    return _normalise(src[i - start], gid, name)

  def class_ids(self) -> np.ndarray:
    """Global class id of every record, without decoding anything."""
    return np.concatenate(
        [np.full(len(src), gid, np.int32) for src, gid, _ in self._parts]
        or [np.zeros(0, np.int32)])

  def __repr__(self):
    return (f"RecordSource(len={len(self)}, parts="
            f"{[(len(s), g) for s, g, _ in self._parts]})")


def _normalise(record: dict[str, Any], global_id: int,
               class_name: str | None = None) -> dict[str, Any]:
  image = np.asarray(record["image"], dtype=np.uint8)
  mask = np.asarray(record["mask"])
  if mask.ndim in (3, 4):  # [S, S, 1], or [n, S, S, 1] (stacked views)
    mask = mask[..., 0]
  return {
      "image": image,
      "mask": (mask > 0).astype(np.uint8),
      "class_id": np.int32(global_id),
      "class_name": (class_name if class_name is not None
                     else _to_str(record["class_name"])),
      "label": np.int32(record["label"]),
      "defect_type": _to_str(record["defect_type"]),
      "file_name": _to_str(record["file_name"]),
  }


@dataclasses.dataclass(frozen=True)
class AnomalyDataset:
  class_names: tuple[str, ...]  # selected classes; global id = position
  train: RecordSource
  test: RecordSource
  train_class_ids: np.ndarray   # int32 [len(train)]
  test_class_ids: np.ndarray    # int32 [len(test)]


def is_prepared(builder) -> bool:
  """Like ``builder.is_prepared()`` without its warnings for absent dirs."""
  path = pathlib.Path(builder.data_dir)
  return ((path / "dataset_info.json").is_file() and
          (path / "features.json").is_file())


def _select_classes(builder_cls, classes, manual_dir=None
                    ) -> tuple[str, ...]:
  known = builder_cls.list_classes(manual_dir)
  if isinstance(classes, str):
    if classes == "all":
      if not known:
        raise DatasetError(
            f"{builder_cls.TITLE}: classes='all' needs a manual_dir "
            "holding the classes"
            + (f" (none found in {manual_dir})" if manual_dir else "")
            + "; or list the class names.",
            hint=builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS)
      return tuple(known)
    classes = [classes]
  classes = list(classes)
  if not classes:
    raise DatasetError(f"{builder_cls.TITLE}: no classes selected; known "
                       f"classes: {', '.join(known or ())}")
  unknown = ([] if known is None
             else [c for c in classes if c not in known])
  if unknown:
    raise DatasetError(
        f"{builder_cls.TITLE}: unknown class name(s) "
        f"{', '.join(map(repr, unknown))}; known classes: "
        f"{', '.join(known)}", [(c, "unknown class") for c in unknown])
  dups = sorted({c for c in classes if classes.count(c) > 1})
  if dups:
    raise DatasetError(
        f"{builder_cls.TITLE}: class name(s) listed more than once: "
        f"{', '.join(map(repr, dups))}", [(c, "duplicate") for c in dups])
  return tuple(classes)


def _check_source_matches(builder, manual_dir: pathlib.Path | None):
  """Refuses a prepared class whose raw files differ from manual_dir's."""
  if manual_dir is None or not manual_dir.is_dir():
    return
  stored = builder.info.metadata.get("source_fingerprint")
  problems: list = []
  cfg = builder.builder_config
  samples = builder.scan_class(manual_dir, cfg.class_name, problems,
                               **builder.reading_options(cfg.option_values))
  if problems or stored is None:
    return  # raw files unusable or gone: the prepared data stands alone
  if fingerprint(samples) != stored:
    raise DatasetError(
        f"{builder.data_dir} was prepared from different files than those "
        f"now in {manual_dir / builder.builder_config.class_name} "
        f"(prepared from {builder.info.metadata.get('source_dir')}). "
        "Delete that directory to prepare it again, or use another "
        "data_dir.", [(builder.data_dir, "stale prepared dataset")])


@contextlib.contextmanager
def _tfds_progress_bars(enable: bool):
  """TFDS's own progress bars on or off, restored afterwards."""
  was = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(enable)
  try:
    yield
  finally:
    tfds.display_progress_bar(was)


def load(name: str, *, classes="all", manual_dir=None, data_dir, image_size,
         verbose: bool = True, num_workers: int | None = None,
         **options) -> AnomalyDataset:
  """Prepares (if needed) and opens an anomaly-detection dataset.

  Args:
    name: one of ``BUILDERS``: 'mvtec_ad', 'synthetic', 'visa', 'btad',
      'real_iad', 'manta', 'folder' (your own images, any class names).
    classes: 'all' or a sequence of class names; the order defines the
      global class ids.
    manual_dir: the raw dataset as distributed (see each builder's
      ``MANUAL_DOWNLOAD_INSTRUCTIONS``). Needed only while some class is
      not prepared yet (and for 'manta' with classes='all'). For
      'synthetic', None or '' generates the raw files under
      ``<data_dir>/synthetic_raw`` on first use.
    data_dir: TFDS data directory (prepared data goes to
      ``<data_dir>/<builder>/<config>/<version>``, config
      ``<class>_<size>[_<option><value>...]``).
    image_size: side S of the square images, or None to keep the original
      size (records may then differ in size).
    verbose: print one line and show a progress bar per class being
      prepared, then a table of the images per class and split. (Where
      all classes of MVTec AD, VisA, BTAD or Real-IAD are selected, the
      totals are compared with the published ones and a mismatch is
      warned about, whatever ``verbose``: see ``totals.check_totals``.)
    num_workers: threads decoding / resizing / encoding the images of a
      class while preparing it (None: min(8, CPU count); 1: sequential).
      The prepared data does not depend on it.
    **options: the dataset's reading options (``BUILDERS[name].OPTIONS``),
      e.g. ``load('real_iad', ..., resolution='512', views='C1')`` or
      ``load('manta', ..., views='stacked')``, and every dataset's
      ``mask_resize`` ('nearest' | 'bilinear_threshold'); each option value
      gets its own prepared config.
  """
  if name not in BUILDERS:
    raise DatasetError(f"unknown dataset {name!r}; known datasets: "
                       f"{', '.join(BUILDERS)}", [(name, "unknown")])
  builder_cls = BUILDERS[name]
  if manual_dir:
    manual_dir = pathlib.Path(manual_dir).expanduser()
  class_names = _select_classes(builder_cls, classes, manual_dir or None)
  try:
    builder_cls.check_class_names(class_names)
  except DatasetError:
    if manual_dir:
      # Report refused names together with every other problem of the folder.
      builder_cls.scan_classes(manual_dir, class_names, verify=True,
                               options=options)
    raise
  image_size = _check_image_size(image_size)
  data_dir = pathlib.Path(data_dir).expanduser().absolute()
  num_workers = check_num_workers(num_workers)

  builders = [builder_cls(config=builder_cls.config_for(c, image_size,
                                                        **options),
                          data_dir=str(data_dir)) for c in class_names]
  missing = [b for b in builders if not is_prepared(b)]

  if name == "synthetic" and not manual_dir:
    if missing:
      manual_dir = synthetic.generate(data_dir / SYNTHETIC_RAW_DIRNAME)
    elif (data_dir / SYNTHETIC_RAW_DIRNAME).is_dir():
      manual_dir = data_dir / SYNTHETIC_RAW_DIRNAME
  manual_path = (pathlib.Path(manual_dir).expanduser().absolute()
                 if manual_dir else None)

  for b in builders:
    if all(b is not m for m in missing):
      _check_source_matches(b, manual_path)

  if missing:
    todo = [b.builder_config.class_name for b in missing]
    instructions = builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS
    manual_path = check_manual_dir(manual_dir, title=builder_cls.TITLE,
                                   instructions=instructions)
    # Every class to prepare is validated before anything is written.
    builder_cls.scan_classes(manual_path, todo, verify=True,
                             options=options)
    for k, b in enumerate(missing):
      t0 = time.time()
      if verbose:
        print(f"[ccl_jax.datasets] preparing {b.name}/"
              f"{b.builder_config.name} ({k + 1}/{len(missing)}) from "
              f"{manual_path}", flush=True)
      # pylint: disable=protected-access
      b._prevalidated = True
      b._num_workers = num_workers
      b._progress = verbose
      with _tfds_progress_bars(False):  # ours name class and total
        b.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=str(manual_path), try_download_gcs=False))
      if verbose:
        print(f"[ccl_jax.datasets] prepared {b.data_dir} in "
              f"{time.time() - t0:.1f}s", flush=True)

  train_parts, test_parts = [], []
  for gid, b in enumerate(builders):
    sources = b.as_data_source()
    train_parts.append((sources["train"], gid))
    # Absent when the class has no test images (see the builders).
    test_parts.append((sources.get("test", ()), gid))
  _report(name, builders, train_parts, test_parts, verbose)
  train, test = RecordSource(train_parts), RecordSource(test_parts)
  return AnomalyDataset(class_names=class_names, train=train, test=test,
                        train_class_ids=train.class_ids(),
                        test_class_ids=test.class_ids())


def _report(name, builders, train_parts, test_parts, verbose: bool):
  """Prints the images per class and split; warns where all classes of a
  dataset with published totals are selected and the totals differ."""
  rows = {}
  for b, (train_src, _), (test_src, _) in zip(builders, train_parts,
                                              test_parts):
    stored = b.info.metadata.get("counts") or {}
    test_counts = stored.get("test") or {}
    rows[b.builder_config.class_name] = {
        "train": len(train_src), "test": len(test_src),
        # recorded while preparing (None: prepared by an older version)
        "test_good": test_counts.get("good"),
        "test_anomalous": test_counts.get("anomalous")}
  if verbose and builders:
    cfg = builders[0].builder_config
    size = f"{cfg.image_size}px" if cfg.image_size else "original size"
    opts = "".join(f", {k}={v}" for k, v in cfg.options)
    print(totals.format_counts(f"{builders[0].TITLE} ({size}{opts})",
                               rows), flush=True)
  options = dict(builders[0].builder_config.options) if builders else {}
  problems = totals.check_totals(name, rows, options)
  expected = totals.expected_totals(name, rows, options)
  if verbose and expected and not problems:
    print("[ccl_jax.datasets] the totals match the published ones ("
          + ", ".join(f"{k} {v}" for k, v in expected.items()) + ")",
          flush=True)
  for message in problems:
    warnings.warn(message, stacklevel=3)


def load_mixture(parts: Sequence[dict], *, data_dir, image_size,
                 verbose: bool = True, num_workers: int | None = None
                 ) -> AnomalyDataset:
  """Several datasets as one, in a single global class-id space.

  Args:
    parts: one dict per dataset: ``name`` (as for :func:`load`), and
      optionally ``classes`` (default 'all'), ``manual_dir`` and the
      dataset's reading options, e.g.
      ``[{"name": "mvtec_ad", "manual_dir": m},
      {"name": "visa", "classes": ["pcb1", "pcb2"], "manual_dir": v}]``.
    data_dir, image_size, verbose, num_workers: as for :func:`load` (one
      image size for all, so that records can be batched together).

  Returns:
    An :class:`AnomalyDataset` whose ``class_names`` are qualified
    ``'<dataset>/<class>'`` names, in the order of ``parts`` then of each
    part's classes; a record's ``class_id`` is its position there and its
    ``class_name`` the qualified name.
  """
  if isinstance(parts, dict) or not len(parts):
    raise DatasetError("load_mixture: parts must be a non-empty sequence "
                       "of dicts with at least a 'name'")
  names: list[str] = []
  train_parts, test_parts = [], []
  for k, spec in enumerate(parts):
    spec = dict(spec)
    if "name" not in spec:
      raise DatasetError(f"load_mixture: part {k} has no 'name'",
                         [(str(spec), "no name")])
    name = spec.pop("name")
    spec.setdefault("num_workers", num_workers)
    ds = load(name, data_dir=data_dir, image_size=image_size,
              verbose=verbose, **spec)
    offset = len(names)
    names += [f"{name}/{c}" for c in ds.class_names]
    for out, src in ((train_parts, ds.train), (test_parts, ds.test)):
      out += [(s, offset + gid, f"{name}/{ds.class_names[gid]}")
              for s, gid, _ in src.parts]
  dups = sorted({n for n in names if names.count(n) > 1})
  if dups:
    raise DatasetError("load_mixture: class(es) listed more than once: "
                       + ", ".join(dups), [(d, "duplicate") for d in dups])
  train, test = RecordSource(train_parts), RecordSource(test_parts)
  return AnomalyDataset(class_names=tuple(names), train=train, test=test,
                        train_class_ids=train.class_ids(),
                        test_class_ids=test.class_ids())

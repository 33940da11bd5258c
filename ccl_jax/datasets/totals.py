"""What ``load`` read: counts per class and split, checked against the
published totals of the datasets.

``load`` prints :func:`format_counts` (when ``verbose``) and warns with the
messages of :func:`check_totals` (always) once the selected classes are
prepared and opened.
"""

from __future__ import annotations

from typing import Mapping

from ccl_jax.datasets import layouts
from ccl_jax.datasets.builders import MVTEC_AD_CLASSES

__all__ = ["KNOWN_TOTALS", "check_totals", "expected_totals",
           "format_counts"]

#: load() name -> (title, all class names, {split: number of images}).
#: Published totals of the whole dataset (all classes), as stated in the
#: datasets' papers and restated in the CCL paper, Sec. 4.1:
#:  - MVTec AD: Bergmann et al., "MVTec AD -- A Comprehensive Real-World
#:    Dataset for Unsupervised Anomaly Detection", CVPR 2019 (Table 1):
#:    3629 training, 1725 test images.
#:  - VisA: Zou et al., "SPot-the-Difference Self-Supervised Pre-training for
#:    Anomaly Detection and Segmentation", ECCV 2022: 10,821 images, split by
#:    the distributed split_csv/1cls.csv (the split read here) into 8659
#:    training, 2162 test images.
#:  - BTAD: Mishra et al., "VT-ADL: A Vision Transformer Network for Image
#:    Anomaly Detection and Localization", ISIE 2021: 2540 images, 1799
#:    training, 741 test.
#:  - Real-IAD: Wang et al., "Real-IAD: A Real-World Multi-View Dataset for
#:    Benchmarking Versatile Industrial Anomaly Detection", CVPR 2024:
#:    151,050 images, split by realiad_jsons into 36,465 training and
#:    114,585 test images (all five views; the same at every resolution).
#:  - MANTA, synthetic: not checked (MANTA's per-split totals are not
#:    reliably known; the synthetic set's size is a parameter).
KNOWN_TOTALS: dict[str, tuple[str, tuple[str, ...], dict[str, int]]] = {
    "mvtec_ad": ("MVTec AD", MVTEC_AD_CLASSES,
                 {"train": 3629, "test": 1725}),
    "visa": ("VisA", layouts.VISA_CLASSES, {"train": 8659, "test": 2162}),
    "btad": ("BTAD", layouts.BTAD_CLASSES, {"train": 1799, "test": 741}),
    "real_iad": ("Real-IAD", layouts.REAL_IAD_CLASSES,
                 {"train": 36465, "test": 114585}),
}


def expected_totals(name: str, class_names, options=None
                    ) -> dict[str, int] | None:
  """The published {split: number of images} that ``class_names`` (with
  the reading ``options``) should add up to; None where there is nothing
  to compare: no known totals, a subset of the classes, or Real-IAD with
  one view only."""
  if name not in KNOWN_TOTALS:
    return None
  if name == "real_iad" and dict(options or {}).get("views", "all") != "all":
    return None
  _, classes, expected = KNOWN_TOTALS[name]
  if set(class_names) != set(classes):
    return None
  return dict(expected)


def check_totals(name: str, counts: Mapping[str, Mapping[str, int]],
                 options: Mapping[str, str] | None = None) -> list[str]:
  """Mismatches between what was read and the published totals.

  Args:
    name: the ``load`` name ('mvtec_ad', 'visa', 'btad', 'real_iad';
      others are never checked).
    counts: class name -> {'train': n, 'test': n} (further keys ignored).
    options: the dataset's non-default reading options; Real-IAD is
      checked only with all views (``views`` 'all').

  Returns:
    One message per mismatching split (naming the dataset, the split, the
    expected and the found number); empty when everything matches, the
    dataset has no known totals, or not all of its classes are in
    ``counts`` (a subset cannot be compared).
  """
  expected = expected_totals(name, counts, options)
  if expected is None:
    return []
  title, classes, _ = KNOWN_TOTALS[name]
  problems = []
  for split, want in expected.items():
    found = sum(int(c.get(split, 0)) for c in counts.values())
    if found != want:
      problems.append(
          f"{title}: {split} split has {found} images, expected {want} "
          f"(published total over all {len(classes)} classes; "
          f"{found - want:+d}). The raw dataset may be incomplete or "
          "a different version.")
  return problems


def format_counts(title: str, rows: Mapping[str, Mapping[str, int | None]]
                  ) -> str:
  """A table: one row per class (train, test, test good, test anomalous)
  and a total row. ``None`` (unknown) is printed as '?'."""
  header = ("class", "train", "test", "good", "anomalous")
  body = []
  totals: list[int | None] = [0, 0, 0, 0]
  for cls, c in rows.items():
    vals = [c.get("train"), c.get("test"), c.get("test_good"),
            c.get("test_anomalous")]
    totals = [None if t is None or v is None else t + v
              for t, v in zip(totals, vals)]
    body.append((cls, *vals))
  body.append(("total", *totals))
  cells = [header] + [tuple("?" if v is None else str(v) for v in r)
                      for r in body]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

  def fmt(r):
    return "  ".join((r[0].ljust(widths[0]),) + tuple(
        v.rjust(w) for v, w in zip(r[1:], widths[1:])))

  lines = [f"[ccl_jax.datasets] {title}: images per class and split "
           "(good / anomalous: test split)", "  " + fmt(cells[0])]
  lines += ["  " + fmt(r) for r in cells[1:-1]]
  lines += ["  " + "-" * len(fmt(cells[0])), "  " + fmt(cells[-1])]
  return "\n".join(lines)

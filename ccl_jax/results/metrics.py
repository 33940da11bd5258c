"""Anomaly-detection metrics: image/pixel AUROC, AP, F1-max and AUPRO.

Everything here runs on the host with numpy/scipy. All metrics are exact (no
score binning) and are computed in memory roughly proportional to the input,
so a VisA-size test set (2,162 images at 256x256, ~141 M pixels) needs a few
GiB rather than the tens of GiB that flattening into float64 and calling
scikit-learn would. Scores keep their own dtype (float16/32/64 or integer):
every step below only compares scores, so no float64 copy of the pixels is
ever made.

Exact forms
-----------
Scores are split into positives (anomalous, P of them) and negatives (normal,
N of them) and each side is sorted. "Predicted anomalous at threshold t" means
``score >= t``; TP(t) = #positives >= t and FP(t) = #negatives >= t.

* AUROC is the Mann-Whitney statistic
  ``P(s_pos > s_neg) + 1/2 P(s_pos == s_neg)``, counted with
  ``np.searchsorted`` of the positive scores in the sorted negatives. It
  equals the trapezoidal area under the ROC curve that
  ``sklearn.metrics.roc_auc_score`` reports.
* AP is ``sum_t (dTP(t) / P) * TP(t) / (TP(t) + FP(t))`` over the distinct
  positive score values t: the step-wise, non-interpolated form of
  ``sklearn.metrics.average_precision_score``. Thresholds that only
  negatives sit at add no recall, so they contribute nothing and are skipped.
* F1-max is ``max_t 2 TP / (P + TP + FP)`` (= 2PR / (P + R)). Lowering the
  threshold through a value held only by negatives adds false positives and
  no true positives, so the maximum is attained at a positive score value.
* AUPRO is the area under the per-region-overlap (PRO) vs false-positive-rate
  curve over FPR in [0, fpr_limit], divided by fpr_limit. Regions are the
  8-connected components of each ground-truth mask (``scipy.ndimage.label``
  with a 3x3 ones structure), pooled over all images. PRO(t) is the mean over
  regions of the fraction of the region's pixels with score >= t; FPR(t) is
  the fraction of normal pixels with score >= t. The curve has one point per
  distinct score value and starts at (0, 0); pixels tied at a value move both
  coordinates at once (a diagonal segment). It is integrated with the
  trapezoid rule, the point at FPR = fpr_limit being linearly interpolated on
  the segment that crosses it. This is the exact "sort-and-cumsum" form (the
  one the official MVTec AD evaluation script uses). Binned forms, such as
  RD4AD's ``compute_pro`` (200 evenly spaced thresholds, FPR rescaled by its
  largest value below the limit) or ADEval's histogram accumulators used by
  ADer, approximate this curve and give slightly different numbers.

  Only thresholds down to the one where FPR first reaches fpr_limit affect the
  area, so only the top ~fpr_limit share of the negatives (found with
  ``np.partition``) and the region pixels scoring at least as high are sorted.
  Between two consecutive distinct positive values the curve is horizontal,
  so each positive value t contributes two points: (#neg > t / N, PRO before
  t) and (#neg >= t / N, PRO(t)); this traces exactly the same polyline as
  one point per distinct score.

Undefined metrics
-----------------
Every metric needs both classes. A single-class input raises
:class:`UndefinedMetricError` (a ``ValueError``); :func:`summarize` turns it
into NaN for the affected class and metrics.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import numpy.typing as npt
from scipy import ndimage

# Metric keys of `summarize`, in table order; `mad` is the mean of the others.
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap",
           "image_f1_max", "pixel_f1_max", "mad")
_IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
_PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
_REQUIRED_KEYS = ("labels", "scores", "masks", "maps")

# Elements processed per step in the chunked loops; bounds the temporaries
# (a handful of int64 arrays of this length) independently of the input size.
_CHUNK = 1 << 20

# 8-connectivity for ground-truth regions, as in the MVTec AD protocol.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


class UndefinedMetricError(ValueError):
  """A metric is undefined because the ground truth holds only one class."""


# ----------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------


def _chunks(a: np.ndarray) -> Iterator[np.ndarray]:
  """Yields views of `a` along axis 0 holding about `_CHUNK` elements each.

  Slicing along the first axis never copies, unlike ``reshape(-1)`` on a
  non-contiguous array.
  """
  if a.ndim == 0:
    yield a.reshape(1)
    return
  step = max(1, _CHUNK // max(1, math.prod(a.shape[1:])))
  for start in range(0, a.shape[0], step):
    yield a[start:start + step]


def _require_real(name: str, a: np.ndarray) -> None:
  if a.dtype.kind not in "biuf":
    raise ValueError(
        f"{name} must be a real numeric or bool array; got dtype "
        f"{a.dtype}")


def _require_finite(name: str, a: np.ndarray) -> None:
  # min/max propagate NaN and expose +-Inf without allocating a mask.
  if a.dtype.kind == "f" and not (np.isfinite(a.min())
                                  and np.isfinite(a.max())):
    raise ValueError(f"{name} contains NaN or Inf; it must be finite")


def _as_scores(name: str, a: np.ndarray) -> np.ndarray:
  _require_real(name, a)
  _require_finite(name, a)
  # Sorting and searchsorted on bool arrays are awkward; uint8 orders the
  # same way and the view costs nothing.
  return a.view(np.uint8) if a.dtype == bool else a


def _as_binary(name: str, labels: np.ndarray) -> np.ndarray:
  """Checks that `labels` holds only 0/1 (or bool) and returns it as bool."""
  if labels.dtype == bool:
    return labels
  _require_real(name, labels)
  for chunk in _chunks(labels):
    bad = (chunk != 0) & (chunk != 1)
    if bad.any():
      raise ValueError(
          f"{name} must be binary (bool, or only the values 0 and 1); "
          f"found the value {chunk[bad][0].item()!r}. For masks stored "
          f"as 0/255, pass `masks != 0`")
  return labels != 0


def _require_both_classes(is_pos: np.ndarray, message: str) -> None:
  n_pos = int(np.count_nonzero(is_pos))
  if n_pos == 0 or n_pos == is_pos.size:
    raise UndefinedMetricError(
        f"{message}; got {n_pos} anomalous out of {is_pos.size}")


def _check_fpr_limit(fpr_limit: float) -> float:
  fpr_limit = float(fpr_limit)
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
  return fpr_limit


def _array_pair(first_name: str, first: npt.ArrayLike, second_name: str,
                second: npt.ArrayLike, *, mismatch: str, empty: str,
                rank: tuple[int, str] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Both inputs as arrays of one shape, holding at least one element.

  Each caller words its errors for its own layout (and tests pin the
  wording), so the messages come in as format strings over the arrays `a`
  and `b`, completing "<first_name> and <second_name> ". `rank`, when given,
  is the required number of dimensions and what completes "<name> " when an
  input has another.
  """
  a, b = np.asarray(first), np.asarray(second)
  if rank is not None:
    ndim, rule = rank
    for name, x in ((first_name, a), (second_name, b)):
      if x.ndim != ndim:
        raise ValueError(f"{name} {rule}; got shape {x.shape}")
  if a.shape != b.shape:
    raise ValueError(f"{first_name} and {second_name} " +
                     mismatch.format(a=a, b=b))
  if a.size == 0:
    raise ValueError(f"{first_name} and {second_name} " +
                     empty.format(a=a, b=b))
  return a, b


def _labels_and_scores(labels: np.ndarray, scores: np.ndarray,
                       one_class_message: str
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(is_positive, scores) from checked binary labels and real scores."""
  scores = _as_scores("scores", scores)
  is_pos = _as_binary("labels", labels)
  _require_both_classes(is_pos, one_class_message)
  return is_pos, scores


def _image_inputs(labels: npt.ArrayLike,
                  scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  labels, scores = _array_pair(
      "labels", labels, "scores", scores,
      rank=(1, "must be 1-D with shape [N]"),
      mismatch="must have the same length; got {a.shape[0]} labels and "
      "{b.shape[0]} scores",
      empty="are empty; need at least 2 images")
  return _labels_and_scores(
      labels, scores, "image metrics need at least one anomalous (label 1) "
      "and one normal (label 0) image in labels")


def _pixel_inputs(masks: npt.ArrayLike,
                  maps: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  masks, maps = _array_pair(
      "masks", masks, "maps", maps, rank=(3, "must have shape [N, H, W]"),
      mismatch="must have the same shape [N, H, W]; got masks {a.shape} and "
      "maps {b.shape}",
      empty="are empty (shape {b.shape}); need pixels")
  maps = _as_scores("maps", maps)
  _require_real("masks", masks)
  _require_finite("masks", masks)
  # Masks come as bool, {0, 1} or {0, 255}; any non-zero pixel is anomalous.
  is_anom = masks if masks.dtype == bool else masks != 0
  _require_both_classes(
      is_anom,
      "pixel metrics need at least one anomalous and one normal pixel in "
      "masks")
  return is_anom, maps


def _generic_inputs(labels: npt.ArrayLike, scores: npt.ArrayLike,
                    metric: str) -> tuple[np.ndarray, np.ndarray]:
  labels, scores = _array_pair(
      "labels", labels, "scores", scores,
      mismatch="must have the same shape; got labels {a.shape} and scores "
      "{b.shape}",
      empty="are empty")
  return _labels_and_scores(
      labels, scores, f"{metric} needs at least one anomalous (1) and one "
      f"normal (0) entry in labels")


# ----------------------------------------------------------------------------
# Metric cores
# ----------------------------------------------------------------------------


def _split_sorted(is_pos: np.ndarray,
                  scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Positive and negative scores, each sorted ascending.

  Boolean indexing already copies, so sorting those copies in place keeps
  the footprint at one extra score array in total.
  """
  pos = scores[is_pos]
  pos.sort()
  neg = scores[~is_pos]
  neg.sort()
  return pos, neg


def _ranking_metrics(pos: np.ndarray,
                     neg: np.ndarray) -> tuple[float, float, float]:
  """(AUROC, AP, F1-max) from ascending-sorted positive/negative scores.

  Works on the distinct positive values in chunks so that the int64
  temporaries stay bounded even with tens of millions of positive pixels.
  """
  n_pos, n_neg = pos.size, neg.size
  # Twice the Mann-Whitney U, kept as an exact integer; it is at most
  # 2 * n_pos * n_neg, within int64 for up to ~4e9 pixels.
  u2 = 0
  ap = 0.0
  f1 = 0.0
  for start in range(0, n_pos, _CHUNK):
    block = pos[start:start + _CHUNK]
    is_first = np.empty(block.size, dtype=bool)
    # A run of equal values may straddle the chunk boundary.
    is_first[0] = start == 0 or block[0] != pos[start - 1]
    np.not_equal(block[1:], block[:-1], out=is_first[1:])
    first = np.flatnonzero(is_first)
    if first.size == 0:
      # The whole chunk continues a run counted in an earlier chunk.
      continue
    values = block[first]
    first += start
    count = np.searchsorted(pos, values, side="right") - first
    tp = n_pos - first
    neg_below = np.searchsorted(neg, values, side="left")
    neg_at_or_below = np.searchsorted(neg, values, side="right")
    u2 += int(np.dot(count, neg_below + neg_at_or_below))
    fp = n_neg - neg_below
    ap += float(np.dot(count, tp / (tp + fp)))
    f1 = max(f1, float(np.max(2.0 * tp / (n_pos + tp + fp))))
  return u2 / (2 * n_pos * n_neg), ap / n_pos, f1


def _top_negatives(neg: np.ndarray, fpr_limit: float,
                   is_sorted: bool) -> np.ndarray:
  """Sorted negatives scoring >= q, where FPR(q) already exceeds fpr_limit.

  q is the k-th largest negative with k = floor(fpr_limit * N) + 1 > limit*N
  (capped at N), so FPR(q) > fpr_limit even if the product rounds down.
  Any smaller q would be equally correct, only slower. `neg` is reordered
  in place when it is not sorted.
  """
  n = neg.size
  k = min(n, math.floor(fpr_limit * n) + 1)
  if is_sorted:
    q = neg[n - k]
    return neg[np.searchsorted(neg, q, side="left"):]
  neg.partition(n - k)
  q = neg[n - k]
  # Values equal to q may also sit left of the partition point.
  top = neg[neg >= q]
  top.sort()
  return top


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
  """Trapezoid area under (x, y) for x in [0, limit], divided by limit.

  x is non-decreasing, starts below `limit` and ends at or above it.
  """
  j = int(np.searchsorted(x, limit, side="left"))  # first x >= limit
  area = float(np.sum(np.diff(x[:j]) * (y[1:j] + y[:j - 1]))) / 2.0
  x0, y0, x1, y1 = x[j - 1], y[j - 1], x[j], y[j]
  y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
  area += (limit - x0) * (y0 + y_limit) / 2.0
  return area / limit


def _aupro(is_anom: np.ndarray, maps: np.ndarray, top_neg: np.ndarray,
           n_neg: int, fpr_limit: float) -> float:
  """AUPRO given the sorted negatives >= q (see `_top_negatives`)."""
  q = top_neg[0]
  scores, weights = [], []
  n_regions = 0
  # Labelling image by image keeps the int32 label maps small and stops
  # regions from merging across image borders.
  for mask, score_map in zip(is_anom, maps):
    regions, count = ndimage.label(mask, structure=_REGION_STRUCTURE)
    if count == 0:
      continue
    n_regions += count
    inv_size = np.zeros(count + 1)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    inv_size[1:] = 1.0 / sizes[1:]
    keep = mask & (score_map >= q)
    scores.append(score_map[keep])
    weights.append(inv_size[regions[keep]])
  scores = np.concatenate(scores)
  if scores.size == 0:
    # No region pixel reaches q: PRO stays 0 until FPR is past the limit.
    return 0.0
  weights = np.concatenate(weights)

  # Order within ties is irrelevant: only the last index of each run is kept.
  order = np.argsort(scores)[::-1]
  scores = scores[order]
  pro = np.cumsum(weights[order]) / n_regions
  del order, weights
  last_of_value = np.flatnonzero(scores[1:] != scores[:-1])
  last_of_value = np.append(last_of_value, scores.size - 1)
  values = scores[last_of_value]
  pro = pro[last_of_value]

  n_top = top_neg.size
  neg_above = n_top - np.searchsorted(top_neg, values, side="right")
  neg_at_or_above = n_top - np.searchsorted(top_neg, values, side="left")
  n_points = 2 * values.size + 2
  x = np.empty(n_points)
  y = np.empty(n_points)
  x[0] = y[0] = 0.0
  x[1:-1:2] = neg_above / n_neg
  x[2:-1:2] = neg_at_or_above / n_neg
  y[1:-1:2] = np.concatenate(([0.0], pro[:-1]))
  y[2:-1:2] = pro
  # Below the smallest kept positive value only negatives join until FPR
  # has passed the limit, so the curve runs flat from there.
  x[-1] = 1.0
  y[-1] = pro[-1]
  return _area_up_to(x, y, fpr_limit)


def _pixel_metrics(masks: npt.ArrayLike, maps: npt.ArrayLike,
                   fpr_limit: float) -> dict[str, float]:
  """All four pixel metrics from a single split and sort."""
  fpr_limit = _check_fpr_limit(fpr_limit)
  is_anom, maps = _pixel_inputs(masks, maps)
  pos, neg = _split_sorted(is_anom, maps)
  auroc, ap, f1 = _ranking_metrics(pos, neg)
  del pos
  top_neg = _top_negatives(neg, fpr_limit, is_sorted=True)
  pro = _aupro(is_anom, maps, top_neg, neg.size, fpr_limit)
  return {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_f1_max": f1,
          "aupro": pro}


def _image_metrics(labels: npt.ArrayLike,
                   scores: npt.ArrayLike) -> dict[str, float]:
  is_pos, scores = _image_inputs(labels, scores)
  auroc, ap, f1 = _ranking_metrics(*_split_sorted(is_pos, scores))
  return {"image_auroc": auroc, "image_ap": ap, "image_f1_max": f1}


# ----------------------------------------------------------------------------
# Public metrics
# ----------------------------------------------------------------------------


def image_auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
  """Image-level AUROC; labels [N] in {0, 1}, scores [N] (ties count 1/2)."""
  return _image_metrics(labels, scores)["image_auroc"]


def pixel_auroc(masks: npt.ArrayLike, maps: npt.ArrayLike) -> float:
  """Pixel-level AUROC; masks (non-zero = anomalous) and maps [N, H, W]."""
  is_anom, maps = _pixel_inputs(masks, maps)
  return _ranking_metrics(*_split_sorted(is_anom, maps))[0]


def average_precision(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
  """Average precision, equal to `sklearn.metrics.average_precision_score`.

  Takes image-level [N] arrays or pixel arrays of any (matching) shape.
  Labels must be bool or 0/1; pass ``masks != 0`` for 0/255 masks.
  """
  is_pos, scores = _generic_inputs(labels, scores, "average_precision")
  return _ranking_metrics(*_split_sorted(is_pos, scores))[1]


def f1_max(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
  """Max over thresholds of 2PR / (P + R); inputs as `average_precision`."""
  is_pos, scores = _generic_inputs(labels, scores, "f1_max")
  return _ranking_metrics(*_split_sorted(is_pos, scores))[2]


def aupro(masks: npt.ArrayLike, maps: npt.ArrayLike,
          fpr_limit: float = 0.3) -> float:
  """Exact normalised area under the PRO curve for FPR in [0, fpr_limit].

  masks [N, H, W] (non-zero = anomalous), maps [N, H, W]. See the module
  docstring for the exact definition.
  """
  fpr_limit = _check_fpr_limit(fpr_limit)
  is_anom, maps = _pixel_inputs(masks, maps)
  neg = maps[~is_anom]
  n_neg = neg.size
  # Partition, not a full sort: only the top share of negatives matters.
  top_neg = _top_negatives(neg, fpr_limit, is_sorted=False)
  del neg
  return _aupro(is_anom, maps, top_neg, n_neg, fpr_limit)


# ----------------------------------------------------------------------------
# Benchmark summary
# ----------------------------------------------------------------------------


def summarize(per_class: Mapping[str, Mapping[str, npt.ArrayLike]],
              fpr_limit: float = 0.3) -> dict[str, dict]:
  """All benchmark metrics per class and their mean over classes.

  Args:
    per_class: for each class name, a mapping with ``labels`` [N] (0/1),
      ``scores`` [N], ``masks`` [N, H, W] (non-zero = anomalous) and
      ``maps`` [N, H, W].
    fpr_limit: AUPRO integration limit.

  Returns:
    ``{"per_class": {cls: {metric: float}}, "mean": {metric: float}}`` with
    the metrics of `METRICS` as fractions in [0, 1]. ``mad`` is the mean of
    the other seven (ADer's mAD). When some metric is undefined for some
    class, a third entry ``"skipped": {cls: {metric: reason}}`` says which
    and why, in words meant for the person reading the results.

  A metric that is undefined for a class (image metrics when its test set
  lacks anomalous or normal images, pixel metrics when its masks are all
  normal or all anomalous) is NaN for that class, with a RuntimeWarning
  naming the class and metrics; the class's ``mad`` is then the mean of its
  defined metrics (NaN if none is). The ``mean`` row averages each metric,
  ``mad`` included, over the classes where it is not NaN, so with missing
  metrics ``mean["mad"]`` need not equal the mean of the other mean values.
  A class without test images (empty arrays) has every metric undefined.
  Any other bad input raises ValueError.
  """
  if not per_class:
    raise ValueError("per_class is empty; need at least one class")
  rows: dict[str, dict[str, float]] = {}
  skipped: dict[str, dict[str, str]] = {}
  for name, data in per_class.items():
    rows[name], skipped[name] = class_summary(name, data, fpr_limit)
  return summary_of(rows, skipped)


def class_summary(name: str, data: Mapping[str, npt.ArrayLike],
                  fpr_limit: float = 0.3) -> tuple[dict[str, float], dict[str, str]]:
  """One class's row of `summarize` (its metrics and ``mad``) and, for each metric that is
  undefined for it, the reason (empty when every metric is defined); `data` as one entry
  of `summarize`'s `per_class`."""
  missing = [key for key in _REQUIRED_KEYS if key not in data]
  if missing:
    raise ValueError(
        f"per_class[{name!r}] lacks {missing}; each class needs the "
        f"keys {list(_REQUIRED_KEYS)}")
  labels, masks = np.asarray(data["labels"]), np.asarray(data["masks"])
  if labels.ndim == 1 and masks.ndim == 3 and len(labels) != len(masks):
    raise ValueError(
        f"per_class[{name!r}]: labels has {len(labels)} images but "
        f"masks has {len(masks)}; both come from the same test set")
  if labels.size == 0:
    # A class of normal images only may have no test split at all.
    warnings.warn(f"class {name!r}: no test images, so no metric; left out of the "
                  "mean", RuntimeWarning, stacklevel=3)
    return (dict.fromkeys(METRICS, math.nan),
            dict.fromkeys(METRICS[:-1], "no test images"))
  values: dict[str, float] = {}
  skipped: dict[str, str] = {}
  for metrics, compute in (
          (_IMAGE_METRICS,
           functools.partial(_image_metrics, labels, data["scores"])),
          (_PIXEL_METRICS,
           functools.partial(_pixel_metrics, masks, data["maps"],
                             fpr_limit))):
    try:
      values.update(compute())
    except UndefinedMetricError as err:
      values.update(dict.fromkeys(metrics, math.nan))
      reason = (_image_skip_reason(labels) if metrics is _IMAGE_METRICS
                else _pixel_skip_reason(labels, masks))
      skipped.update(dict.fromkeys(metrics, reason))
      warnings.warn(
          f"class {name!r}: {', '.join(metrics)} undefined ({err}); "
          f"recorded as NaN and left out of the mean",
          RuntimeWarning, stacklevel=3)
  row = {key: values[key] for key in METRICS[:-1]}
  row["mad"] = _nanmean(list(values.values()))
  return row, skipped


def summary_of(rows: Mapping[str, Mapping[str, float]],
               skipped: Mapping[str, Mapping[str, str]]) -> dict[str, dict]:
  """`summarize`'s result from the classes' `class_summary` rows and reasons, in the order
  of `rows`."""
  mean = {key: _nanmean([row[key] for row in rows.values()])
          for key in METRICS}
  summary = {"per_class": {name: dict(row) for name, row in rows.items()}, "mean": mean}
  reasons = {name: dict(skipped[name]) for name in rows if skipped.get(name)}
  if reasons:
    summary["skipped"] = reasons
  return summary


def _image_skip_reason(labels: np.ndarray) -> str:
  n_anomalous = int(np.count_nonzero(labels))
  n_normal = labels.size - n_anomalous
  return (f"needs both normal and anomalous test images; the class has {n_normal} "
          f"normal and {n_anomalous} anomalous")


def _pixel_skip_reason(labels: np.ndarray, masks: np.ndarray) -> str:
  n_anomalous = int(np.count_nonzero(labels))
  if n_anomalous == 0:
    return "needs anomalous test images with masks; the class has none"
  if not np.any(masks):
    return (f"needs defect masks; none of the {n_anomalous} anomalous test images has "
            "a marked pixel (no masks given)")
  return "needs both normal and anomalous pixels; every mask pixel is anomalous"


def _nanmean(values: list[float]) -> float:
  # np.nanmean warns on all-NaN input; here that case is expected and
  # already reported by `summarize`.
  defined = [v for v in values if not math.isnan(v)]
  return math.fsum(defined) / len(defined) if defined else math.nan


def format_table(summary: Mapping[str, Mapping]) -> str:
  """Markdown table of a `summarize` result, in percent with one decimal.

  One row per class plus a final ``mean`` row; NaN shows as ``n/a``.
  """
  def cells(row: Mapping[str, float]) -> str:
    return " | ".join("n/a" if math.isnan(row[key]) else
                      f"{100.0 * row[key]:.1f}" for key in METRICS)

  lines = ["| class | " + " | ".join(METRICS) + " |",
           "|:---|" + "---:|" * len(METRICS)]
  for name, row in summary["per_class"].items():
    # A literal "|" would split the cell.
    escaped = str(name).replace("|", "\\|")
    lines.append(f"| {escaped} | {cells(row)} |")
  lines.append(f"| mean | {cells(summary['mean'])} |")
  return "\n".join(lines)


def format_skipped(summary: Mapping[str, Mapping]) -> str:
  """The metrics `summarize` could not compute, one line per class and reason
  (empty when none was skipped); says that means leave those classes out."""
  skipped = summary.get("skipped") or {}
  if not skipped:
    return ""
  lines = ["Skipped metrics (n/a above; each mean is over the classes where the "
           "metric exists):", ""]
  for name, reasons in skipped.items():
    by_reason: dict[str, list[str]] = {}
    for metric, reason in reasons.items():
      by_reason.setdefault(reason, []).append(metric)
    for reason, names in by_reason.items():
      lines.append(f"- {name}: {', '.join(names)}: {reason}")
  return "\n".join(lines)

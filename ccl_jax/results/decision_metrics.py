"""Decision metrics at given thresholds: precision, recall, F1, false-alarm rate and
threshold efficiency (F1 at the thresholds over the best F1 any single threshold reaches),
per class and overall. The thresholds come from `ccl_jax.decisions.thresholds`."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ccl_jax.decisions.thresholds import as_group_ids, as_scores
from ccl_jax.results import metrics

RATE_METRICS = ("precision", "recall", "f1", "false_alarm_rate", "threshold_efficiency")
_NO_ANOMALOUS = ("no anomalous test images: precision, recall and F1 measure how defects "
                 "are found; the false-alarm rate covers this class")
_NO_NORMAL = "no normal test images, so no false alarm could be made"


def _best_f1(is_anomalous: np.ndarray, scores: np.ndarray) -> float:
  """F1 at the best cut of `scores` (some anomalous); with anomalous images only, flagging
  all is exact, so the best is 1."""
  if is_anomalous.all():
    return 1.0
  return metrics.f1_max(is_anomalous, scores)


def _rates(is_anomalous: np.ndarray, flagged: np.ndarray, thresholds: np.ndarray,
           scores: np.ndarray) -> dict:
  tp = int(np.count_nonzero(flagged & is_anomalous))
  fp = int(np.count_nonzero(flagged & ~is_anomalous))
  fn = int(np.count_nonzero(~flagged & is_anomalous))
  tn = int(np.count_nonzero(~flagged & ~is_anomalous))
  has_anomalous = tp + fn > 0
  f1 = 2 * tp / (2 * tp + fp + fn) if has_anomalous else math.nan
  f1_max = _best_f1(is_anomalous, scores) if has_anomalous else math.nan
  return {
      "precision": (tp / (tp + fp) if tp + fp else 1.0) if has_anomalous else math.nan,
      "recall": tp / (tp + fn) if has_anomalous else math.nan,
      "f1": f1,
      "false_alarm_rate": fp / (fp + tn) if fp + tn else math.nan,
      "f1_max": f1_max,
      # f1_max >= 1 / (n_normal + 1) > 0 whenever anomalies exist.
      "threshold_efficiency": f1 / f1_max if has_anomalous else math.nan,
      "threshold_mean": float(thresholds.mean()),
      "n_normal": fp + tn, "n_anomalous": tp + fn,
      "tp": tp, "fp": fp, "fn": fn, "tn": tn,
  }


def decision_metrics(scores: np.ndarray, labels: np.ndarray, thresholds_per_image: np.ndarray,
                     class_ids: np.ndarray, class_names: Sequence[str], *,
                     support_per_image: np.ndarray | None = None) -> dict:
  """Precision, recall, F1, false-alarm rate and threshold efficiency at given per-image
  thresholds.

  Args:
    scores: [N] image scores of the evaluated (test) images.
    labels: [N] 1 = anomalous, 0 = normal (bool or 0/1).
    thresholds_per_image: [N] threshold applied to each image (e.g.
      ``Thresholds.per_image(route(...))``, or the agnostic one everywhere).
    class_ids: [N] true class index of each image in [0, C), for reporting.
    class_names: the C class names.
    support_per_image: [N] optional; how many normal scores set each image's
      threshold (``Thresholds.num_normal`` of its group). A class row then
      holds ``threshold_support``, the median over its images.

  Returns:
    ``{'per_class': {name: row}, 'mean': {metric: float},
    'spread': {metric: {'std', 'min', 'max'}}, 'overall': row}`` where a row
    holds precision, recall, f1, false_alarm_rate, f1_max (F1 at the best
    cut of the row's scores), threshold_efficiency (f1 / f1_max),
    threshold_mean, n_normal, n_anomalous and the counts tp, fp, fn, tn; mean
    and spread cover the rates and the efficiency over the classes where each
    is defined (classes without images are left out of per_class). When a
    rate is undefined for some class (NaN, see the module docstring)
    ``'skipped': {name: {metric: reason}}`` says why.
    ``overall`` pools all images. Image i is flagged iff
    ``scores[i] > thresholds_per_image[i]``.
  """
  scores = as_scores("scores", scores)
  n = scores.size
  if n == 0:
    raise ValueError("scores is empty; need at least one image")
  labels = np.asarray(labels)
  if labels.shape != (n,) or labels.dtype.kind not in "biuf" or not np.isin(labels, (0, 1)).all():
    raise ValueError(f"labels must be [N] = ({n},) of 0/1 or bool; got shape {labels.shape}")
  thresholds = as_scores("thresholds_per_image", thresholds_per_image)
  if thresholds.shape != (n,):
    raise ValueError(
        f"thresholds_per_image must have shape [N] = ({n},); got {thresholds.shape}")
  if isinstance(class_names, str):
    raise ValueError("class_names must be a sequence of strings, not one string")
  class_names = tuple(class_names)
  if not class_names or len(set(class_names)) != len(class_names):
    raise ValueError(f"class_names must be non-empty and distinct; got {class_names!r}")
  class_ids = as_group_ids("class_ids", class_ids, len(class_names))
  if class_ids.shape != (n,):
    raise ValueError(f"class_ids must have shape [N] = ({n},); got {class_ids.shape}")

  if support_per_image is not None:
    support_per_image = np.asarray(support_per_image)
    if support_per_image.shape != (n,) or support_per_image.dtype.kind not in "iu":
      raise ValueError(f"support_per_image must be [N] = ({n},) integers; got shape "
                       f"{support_per_image.shape}, dtype {support_per_image.dtype}")

  is_anomalous = labels.astype(bool)
  flagged = scores > thresholds
  per_class = {}
  for c, name in enumerate(class_names):
    member = class_ids == c
    if member.any():
      per_class[name] = _rates(is_anomalous[member], flagged[member], thresholds[member],
                               scores[member])
      if support_per_image is not None:
        per_class[name]["threshold_support"] = int(np.median(support_per_image[member]))
  defined = {m: np.array([row[m] for row in per_class.values() if not math.isnan(row[m])])
             for m in RATE_METRICS}
  result = {
      "per_class": per_class,
      "mean": {m: float(v.mean()) if v.size else math.nan for m, v in defined.items()},
      "spread": {m: ({"std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
                     if v.size else dict.fromkeys(("std", "min", "max"), math.nan))
                 for m, v in defined.items()},
      "overall": _rates(is_anomalous, flagged, thresholds, scores),
  }
  skipped = {name: {m: _NO_NORMAL if m == "false_alarm_rate" else _NO_ANOMALOUS
                    for m in RATE_METRICS if math.isnan(row[m])}
             for name, row in per_class.items()}
  skipped = {name: reasons for name, reasons in skipped.items() if reasons}
  if skipped:
    result["skipped"] = skipped
  return result


# ----------------------------------------------------------------------------
# Persistence
# ----------------------------------------------------------------------------

"""Tests for ccl_jax.results.metrics against independent references.

References are scikit-learn (AUROC, AP, PR curve), plain-numpy brute force
over every distinct threshold (F1-max, AUPRO) and hand-computed curves.
"""

import math
import tracemalloc
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (average_precision_score, precision_recall_curve,
                             roc_auc_score)

from ccl_jax.results import metrics

TOL = 1e-9


# ----------------------------------------------------------------------------
# Data and brute-force references
# ----------------------------------------------------------------------------


def _image_data(seed, n=400, ties=True):
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < 0.3).astype(np.int64)
  scores = rng.random(n) + 0.4 * labels
  if ties:
    scores = np.round(scores, 1)
  return labels, scores


def _pixel_data(seed, n=4, h=16, w=16, ties=True, dtype=np.float32):
  """Masks with rectangles plus scattered pixels (many touch diagonally)."""
  rng = np.random.default_rng(seed)
  masks = rng.random((n, h, w)) < 0.06
  for i in range(n):
    for _ in range(2):
      r, c = rng.integers(0, h - 4), rng.integers(0, w - 4)
      masks[i, r:r + rng.integers(1, 5), c:c + rng.integers(1, 5)] = True
  maps = rng.random((n, h, w)) + 0.5 * masks
  if ties:
    maps = np.round(maps, 1)
  return masks, maps.astype(dtype)


def _f1_max_reference(labels, scores):
  labels = np.asarray(labels).ravel() != 0
  scores = np.asarray(scores, dtype=np.float64).ravel()
  best = 0.0
  for t in np.unique(scores):
    predicted = scores >= t
    tp = np.sum(predicted & labels)
    fp = np.sum(predicted & ~labels)
    if tp == 0:
      continue
    precision = tp / (tp + fp)
    recall = tp / labels.sum()
    best = max(best, 2 * precision * recall / (precision + recall))
  return best


def _aupro_reference(masks, maps, fpr_limit):
  """One curve point per distinct score, loops over labelled regions."""
  maps = np.asarray(maps, dtype=np.float64)
  structure = np.ones((3, 3), dtype=int)
  regions = []
  for i in range(len(masks)):
    labelled, count = ndimage.label(masks[i] != 0, structure=structure)
    regions += [(i, labelled == r) for r in range(1, count + 1)]
  normal = maps[np.asarray(masks) == 0]
  fprs, pros = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    fprs.append(np.mean(normal >= t))
    pros.append(np.mean([np.mean(maps[i][region] >= t)
                         for i, region in regions]))
  area = 0.0
  for k in range(1, len(fprs)):
    x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
    if x1 >= fpr_limit:
      y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
      area += (fpr_limit - x0) * (y0 + y_limit) / 2
      break
    area += (x1 - x0) * (y0 + y1) / 2
  return area / fpr_limit


# ----------------------------------------------------------------------------
# AUROC, AP, F1-max
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_image_metrics_match_sklearn(seed, ties):
  labels, scores = _image_data(seed, ties=ties)
  assert metrics.image_auroc(labels, scores) == pytest.approx(
      roc_auc_score(labels, scores), abs=TOL)
  assert metrics.average_precision(labels, scores) == pytest.approx(
      average_precision_score(labels, scores), abs=TOL)


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_pixel_metrics_match_sklearn(ties, dtype):
  masks, maps = _pixel_data(2, n=3, h=32, w=32, ties=ties, dtype=dtype)
  flat_labels, flat_maps = masks.ravel(), maps.astype(np.float64).ravel()
  assert metrics.pixel_auroc(masks, maps) == pytest.approx(
      roc_auc_score(flat_labels, flat_maps), abs=TOL)
  assert metrics.average_precision(masks, maps) == pytest.approx(
      average_precision_score(flat_labels, flat_maps), abs=TOL)


def test_ties_across_chunk_boundaries(monkeypatch):
  # A tiny chunk makes runs of equal scores straddle chunk boundaries.
  monkeypatch.setattr(metrics, "_CHUNK", 7)
  labels, scores = _image_data(3, n=300, ties=True)
  assert metrics.image_auroc(labels, scores) == pytest.approx(
      roc_auc_score(labels, scores), abs=TOL)
  assert metrics.average_precision(labels, scores) == pytest.approx(
      average_precision_score(labels, scores), abs=TOL)
  assert metrics.f1_max(labels, scores) == pytest.approx(
      _f1_max_reference(labels, scores), abs=TOL)


def test_perfect_and_inverted_scores():
  labels = np.array([0, 0, 1, 1])
  assert metrics.image_auroc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.image_auroc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
  assert metrics.image_auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
  assert metrics.average_precision(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.f1_max(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
  # All tied: the only threshold flags everything, P = 1/2, R = 1.
  assert metrics.f1_max(labels, [0.5] * 4) == pytest.approx(2 / 3)


def test_pixel_masks_any_nonzero_is_anomalous():
  masks, maps = _pixel_data(4)
  as_255 = masks.astype(np.uint8) * 255
  assert (metrics.pixel_auroc(as_255, maps)
          == metrics.pixel_auroc(masks, maps))
  assert metrics.aupro(as_255, maps) == metrics.aupro(masks, maps)


@pytest.mark.parametrize("ties", [True, False])
def test_f1_max_against_brute_force_and_sklearn(ties):
  for labels, scores in (_image_data(5, ties=ties),
                         _pixel_data(6, ties=ties)):
    expected = _f1_max_reference(labels, scores)
    assert metrics.f1_max(labels, scores) == pytest.approx(expected,
                                                           abs=TOL)
    precision, recall, _ = precision_recall_curve(
        np.ravel(labels), np.ravel(scores).astype(np.float64))
    with np.errstate(invalid="ignore"):
      f1 = 2 * precision * recall / (precision + recall)
    assert np.nanmax(f1) == pytest.approx(expected, abs=TOL)


# ----------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------


def _hand_case():
  # One 4x4 image, one region (top-left 2x2) scoring 0.9, 0.8, 0.5, 0.2;
  # normal pixels: one 0.7, one 0.5, ten 0.1 (N = 12).
  masks = np.zeros((1, 4, 4), dtype=bool)
  masks[0, :2, :2] = True
  maps = np.full((1, 4, 4), 0.1)
  maps[0, :2, :2] = [[0.9, 0.8], [0.5, 0.2]]
  maps[0, 3, 2:] = [0.7, 0.5]
  return masks, maps


@pytest.mark.parametrize("fpr_limit, expected", [
    # Curve (FPR, PRO) over thresholds 0.9, 0.8, 0.7, 0.5 (tie), 0.2, 0.1:
    # (0,0) (0,1/4) (0,1/2) (1/12,1/2) (2/12,3/4) (2/12,1) (1,1).
    # Limit 0.3: 1/2 * 1/12 + (1/2+3/4)/2 * 1/12 + 1 * (0.3 - 2/12)
    #   = 1/24 + 5/96 + 2/15 = 109/480; divided by 0.3 -> 109/144.
    (0.3, 109 / 144),
    # Limit 0.125 lies mid-way on the tie segment (1/12,1/2)-(2/12,3/4), so
    # PRO there is 5/8: 1/24 + (1/2+5/8)/2 * 1/24 = 25/384; / 0.125 -> 25/48.
    (0.125, 25 / 48),
    # Limit 1: 1/24 + 5/96 + 1 * 10/12 = 89/96.
    (1.0, 89 / 96),
])
def test_aupro_hand_computed(fpr_limit, expected):
  masks, maps = _hand_case()
  assert metrics.aupro(masks, maps, fpr_limit) == pytest.approx(expected,
                                                                abs=TOL)


def test_aupro_diagonal_neighbours_form_one_region():
  # (0,0) touches (1,1) only diagonally: with 8-connectivity the four mask
  # pixels are one region, so PRO at threshold 0.9 is 1/4 (two regions
  # would give (1 + 0) / 2). Normal pixels all score 0.5, so FPR jumps
  # from 0 to 1 and the PRO curve is flat at 1/4 over [0, 0.3].
  masks = np.zeros((1, 4, 4), dtype=bool)
  masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = masks[0, 2, 1] = True
  maps = np.where(masks, 0.1, 0.5)
  maps[0, 0, 0] = 0.9
  assert metrics.aupro(masks, maps) == pytest.approx(0.25, abs=TOL)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 0.01, 0.5, 1.0])
@pytest.mark.parametrize("ties", [True, False])
def test_aupro_against_brute_force(fpr_limit, ties):
  masks, maps = _pixel_data(7, n=4, h=16, w=16, ties=ties)
  expected = _aupro_reference(masks, maps, fpr_limit)
  assert metrics.aupro(masks, maps, fpr_limit) == pytest.approx(expected,
                                                                abs=TOL)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_aupro_other_dtypes(dtype):
  masks, maps = _pixel_data(8, ties=False, dtype=dtype)
  assert metrics.aupro(masks, maps) == pytest.approx(
      _aupro_reference(masks, maps, 0.3), abs=TOL)


def test_aupro_no_region_pixel_above_limit_threshold():
  # Every region pixel scores below all normal pixels: PRO stays 0 until
  # FPR = 1, so the area over [0, 0.3] is 0.
  masks, _ = _pixel_data(9)
  maps = np.where(masks, 0.0, 1.0 + np.arange(masks.size).reshape(
      masks.shape) / masks.size)
  assert metrics.aupro(masks, maps) == 0.0


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


GOOD_MASKS, GOOD_MAPS = _hand_case()


@pytest.mark.parametrize("call, match", [
    (lambda: metrics.image_auroc([[0, 1]], [[0.1, 0.2]]),
     r"labels must be 1-D with shape \[N\]; got shape \(1, 2\)"),
    (lambda: metrics.image_auroc([0, 1], [[0.1, 0.2]]),
     r"scores must be 1-D"),
    (lambda: metrics.image_auroc([0, 1, 1], [0.1, 0.2, 0.3, 0.4]),
     r"same length; got 3 labels and 4 scores"),
    (lambda: metrics.average_precision([0, 1, 1], [0.1, 0.2]),
     r"same shape; got labels \(3,\) and scores \(2,\)"),
    (lambda: metrics.pixel_auroc(GOOD_MASKS[0], GOOD_MAPS[0]),
     r"masks must have shape \[N, H, W\]; got shape \(4, 4\)"),
    (lambda: metrics.aupro(GOOD_MASKS, GOOD_MAPS[..., :3]),
     r"same shape \[N, H, W\]; got masks \(1, 4, 4\) and maps \(1, 4, 3\)"),
    (lambda: metrics.image_auroc([0, 1], [0.1, np.nan]),
     r"scores contains NaN or Inf"),
    (lambda: metrics.f1_max([0, 1], [np.inf, 0.1]),
     r"scores contains NaN or Inf"),
    (lambda: metrics.aupro(GOOD_MASKS, np.where(GOOD_MASKS, np.inf, 0.0)),
     r"maps contains NaN or Inf"),
    (lambda: metrics.pixel_auroc(GOOD_MASKS,
                                 np.where(GOOD_MASKS, np.nan, 0.0)),
     r"maps contains NaN or Inf"),
    (lambda: metrics.image_auroc([0, 1, 2], [0.1, 0.2, 0.3]),
     r"labels must be binary .* found the value 2"),
    (lambda: metrics.average_precision([0.0, 0.5], [0.1, 0.2]),
     r"labels must be binary"),
    (lambda: metrics.average_precision(GOOD_MASKS.astype(np.uint8) * 255,
                                       GOOD_MAPS),
     r"labels must be binary .* pass `masks != 0`"),
    (lambda: metrics.image_auroc([0, 0, 0], [0.1, 0.2, 0.3]),
     r"image metrics need at least one anomalous .* and one normal"),
    (lambda: metrics.image_auroc([1, 1], [0.1, 0.2]),
     r"image metrics need at least one anomalous"),
    (lambda: metrics.pixel_auroc(np.zeros((2, 4, 4)), np.ones((2, 4, 4))),
     r"pixel metrics need at least one anomalous and one normal pixel"),
    (lambda: metrics.aupro(np.ones((2, 4, 4)), np.ones((2, 4, 4))),
     r"pixel metrics need at least one anomalous and one normal pixel"),
    (lambda: metrics.f1_max([0, 0], [0.1, 0.2]),
     r"f1_max needs at least one anomalous"),
    (lambda: metrics.image_auroc([], []), r"empty"),
    (lambda: metrics.average_precision(np.zeros((0, 4)), np.zeros((0, 4))),
     r"empty"),
    (lambda: metrics.aupro(np.zeros((0, 4, 4)), np.zeros((0, 4, 4))),
     r"masks and maps are empty"),
    (lambda: metrics.aupro(GOOD_MASKS, GOOD_MAPS, fpr_limit=0.0),
     r"fpr_limit must be in \(0, 1\]"),
    (lambda: metrics.aupro(GOOD_MASKS, GOOD_MAPS, fpr_limit=1.5),
     r"fpr_limit must be in \(0, 1\]"),
    (lambda: metrics.aupro(GOOD_MASKS, GOOD_MAPS, fpr_limit=math.nan),
     r"fpr_limit must be in \(0, 1\]"),
    (lambda: metrics.pixel_auroc(GOOD_MASKS, GOOD_MAPS.astype(complex)),
     r"maps must be a real numeric or bool array"),
    (lambda: metrics.image_auroc(["a", "b"], [0.1, 0.2]),
     r"labels must be a real numeric or bool array"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_undefined_metric_error_is_a_value_error():
  with pytest.raises(metrics.UndefinedMetricError):
    metrics.pixel_auroc(np.zeros((1, 2, 2)), np.ones((1, 2, 2)))
  assert issubclass(metrics.UndefinedMetricError, ValueError)


# ----------------------------------------------------------------------------
# summarize / format_table
# ----------------------------------------------------------------------------


def _class_data(seed, n=12):
  rng = np.random.default_rng(seed)
  masks, maps = _pixel_data(seed, n=n, h=16, w=16)
  labels = masks.any(axis=(1, 2)).astype(np.int64)
  # Clear some images so both image classes occur.
  labels[: n // 3] = 0
  masks[: n // 3] = False
  scores = maps.max(axis=(1, 2)) + 0.1 * rng.random(n)
  return {"labels": labels, "scores": scores, "masks": masks, "maps": maps}


def test_summarize_values_keys_and_mean():
  per_class = {"bottle": _class_data(10), "cable": _class_data(11)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    summary = metrics.summarize(per_class)
  assert set(summary) == {"per_class", "mean"}
  assert list(summary["per_class"]) == ["bottle", "cable"]
  for name, data in per_class.items():
    row = summary["per_class"][name]
    assert tuple(row) == metrics.METRICS == (
        "image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap",
        "image_f1_max", "pixel_f1_max", "mad")
    expected = {
        "image_auroc": metrics.image_auroc(data["labels"], data["scores"]),
        "pixel_auroc": metrics.pixel_auroc(data["masks"], data["maps"]),
        "aupro": metrics.aupro(data["masks"], data["maps"]),
        "image_ap": metrics.average_precision(data["labels"],
                                              data["scores"]),
        "pixel_ap": metrics.average_precision(data["masks"],
                                              data["maps"]),
        "image_f1_max": metrics.f1_max(data["labels"], data["scores"]),
        "pixel_f1_max": metrics.f1_max(data["masks"], data["maps"]),
    }
    for key, value in expected.items():
      assert row[key] == pytest.approx(value, abs=TOL)
      assert 0.0 <= row[key] <= 1.0
    assert row["mad"] == pytest.approx(np.mean(list(expected.values())),
                                       abs=TOL)
  for key in metrics.METRICS:
    assert summary["mean"][key] == pytest.approx(
        np.mean([summary["per_class"][c][key] for c in per_class]),
        abs=TOL)


def test_summarize_nan_for_undefined_metrics():
  all_normal = _class_data(12)
  all_normal["labels"] = np.zeros_like(all_normal["labels"])
  all_normal["masks"] = np.zeros_like(all_normal["masks"])
  no_normal_image = _class_data(13)
  no_normal_image["labels"] = np.ones_like(no_normal_image["labels"])
  per_class = {"good": _class_data(14), "all_normal": all_normal,
               "no_normal_image": no_normal_image}
  with pytest.warns(RuntimeWarning) as record:
    summary = metrics.summarize(per_class)
  messages = [str(w.message) for w in record]
  assert any("'all_normal'" in m and "image_auroc" in m for m in messages)
  assert any("'all_normal'" in m and "aupro" in m for m in messages)
  assert any("'no_normal_image'" in m and "image_f1_max" in m
             for m in messages)
  assert not any("'good'" in m for m in messages)

  rows = summary["per_class"]
  assert all(math.isnan(v) for v in rows["all_normal"].values())
  partial = rows["no_normal_image"]
  for key in ("image_auroc", "image_ap", "image_f1_max"):
    assert math.isnan(partial[key])
  pixel = [partial[k] for k in
           ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")]
  assert not any(math.isnan(v) for v in pixel)
  assert partial["mad"] == pytest.approx(np.mean(pixel), abs=TOL)

  for key in metrics.METRICS:
    defined = [row[key] for row in rows.values()
               if not math.isnan(row[key])]
    assert summary["mean"][key] == pytest.approx(np.mean(defined), abs=TOL)
  assert summary["mean"]["image_auroc"] == rows["good"]["image_auroc"]


def test_summarize_bad_input():
  with pytest.raises(ValueError, match="per_class is empty"):
    metrics.summarize({})
  data = _class_data(15)
  with pytest.raises(ValueError, match=r"'x'\] lacks \['maps'\]"):
    metrics.summarize({"x": {k: v for k, v in data.items()
                             if k != "maps"}})
  with pytest.raises(ValueError, match="labels has 11 images but masks "
                                       "has 12"):
    metrics.summarize({"x": dict(data, labels=data["labels"][:11],
                                 scores=data["scores"][:11])})
  # Bad input in a class with undefined metrics must not turn into NaN.
  broken = dict(data, labels=np.zeros(12), maps=np.full((12, 16, 16),
                                                        np.nan))
  with pytest.raises(ValueError, match="maps contains NaN"):
    with warnings.catch_warnings():
      # The (legitimately) undefined image metrics still warn first.
      warnings.simplefilter("ignore", RuntimeWarning)
      metrics.summarize({"x": broken})


def test_format_table():
  all_normal = _class_data(16)
  all_normal["labels"] = np.zeros_like(all_normal["labels"])
  all_normal["masks"] = np.zeros_like(all_normal["masks"])
  with pytest.warns(RuntimeWarning):
    summary = metrics.summarize({"bottle": _class_data(17),
                                 "pcb|1": all_normal})
  table = metrics.format_table(summary)
  lines = table.splitlines()
  assert len(lines) == 2 + 2 + 1
  assert all(key in lines[0] for key in metrics.METRICS)
  assert lines[2].startswith("| bottle |")
  assert lines[3].startswith("| pcb\\|1 |") and "n/a" in lines[3]
  assert lines[4].startswith("| mean |")
  value = summary["per_class"]["bottle"]["image_auroc"]
  assert f" {100 * value:.1f} " in lines[2]
  assert all(line.count("|") - line.count("\\|") == len(metrics.METRICS) + 2
             for line in lines)


# ----------------------------------------------------------------------------
# Memory bound
# ----------------------------------------------------------------------------


def test_pixel_metrics_memory_stays_proportional_to_input():
  # ~16.8 M pixels. numpy reports its buffers to tracemalloc, so the traced
  # peak covers every temporary the metrics allocate.
  rng = np.random.default_rng(18)
  n, h, w = 64, 512, 512
  masks = np.zeros((n, h, w), dtype=bool)
  for i in range(n // 4, n):  # the first quarter stays normal
    for _ in range(3):
      r, c = rng.integers(0, h - 64, size=2)
      masks[i, r:r + rng.integers(4, 64), c:c + rng.integers(4, 64)] = 1
  maps = rng.random((n, h, w), dtype=np.float32)
  maps += masks
  input_bytes = masks.nbytes + maps.nbytes

  per_class = {"x": {"labels": masks.any(axis=(1, 2)),
                     "scores": maps.max(axis=(1, 2)),
                     "masks": masks, "maps": maps}}
  calls = {"pixel_auroc": lambda: metrics.pixel_auroc(masks, maps),
           "aupro": lambda: metrics.aupro(masks, maps),
           "summarize": lambda: metrics.summarize(per_class)}
  # Splitting costs ~1x the input (float32 maps + bool masks); a float64 or
  # int64 copy of all pixels would add >= 1.6x, which the 2x bound catches.
  for name, call in calls.items():
    tracemalloc.start()
    try:
      baseline = tracemalloc.get_traced_memory()[0]
      call()
      peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
      tracemalloc.stop()
    assert peak < 2 * input_bytes, (name, peak / input_bytes)

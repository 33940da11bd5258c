"""Tests for ccl_jax.decisions.thresholds: rules, per-group estimation, decision metrics, decision.json."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ccl_jax.decisions import thresholds
from ccl_jax.results.decision_metrics import decision_metrics


# ----------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------


def test_quantile_rule_is_the_conformal_order_statistic():
  rng = np.random.default_rng(0)
  scores = rng.permutation(np.arange(1.0, 40.0))  # 1..39, n = 39
  # k = ceil(40 * 0.95) = 38 exactly (float rounding must not give 39).
  assert thresholds.threshold_from_normal_scores(scores, alpha=0.05) == 38.0
  # n = 10, alpha = 0.2: k = ceil(11 * 0.8) = ceil(8.8) = 9.
  ten = rng.permutation(np.arange(1.0, 11.0)) * 0.5
  assert thresholds.threshold_from_normal_scores(ten, rule="quantile", alpha=0.2) == 4.5
  # n = 10, alpha = 0.05: k = 11 > n, so the max.
  assert thresholds.threshold_from_normal_scores(ten) == 5.0
  # The small-sample correction sits above the uncorrected empirical quantile.
  assert thresholds.threshold_from_normal_scores(ten, alpha=0.2) > np.quantile(ten, 0.8)


def test_quantile_rule_meets_its_false_alarm_guarantee():
  # Uniform scores: the exact false-alarm rate of threshold t is 1 - t.
  rng = np.random.default_rng(1)
  n, alpha = 24, 0.2  # k = ceil(25 * 0.8) = 20, expected rate 1 - 20/25 = 0.2
  rates = [1.0 - thresholds.threshold_from_normal_scores(rng.random(n), alpha=alpha)
           for _ in range(4000)]
  assert np.mean(rates) == pytest.approx(0.2, abs=0.01)
  # The uncorrected quantile misses the target on the same kind of sample.
  plain = [1.0 - np.quantile(rng.random(n), 1 - alpha) for _ in range(4000)]
  assert np.mean(plain) > 0.21


def test_mean_std_and_max_rules():
  scores = np.array([4.0, 1.0, 3.0, 2.0])
  expected = 2.5 + 2.0 * math.sqrt(5.0 / 3.0)  # sample std (ddof=1) of 1..4
  assert thresholds.threshold_from_normal_scores(scores, rule="mean_std", k=2.0) == \
      pytest.approx(expected, rel=1e-12)
  assert thresholds.threshold_from_normal_scores(scores, rule="mean_std") == \
      pytest.approx(2.5 + 3.0 * math.sqrt(5.0 / 3.0), rel=1e-12)
  assert thresholds.threshold_from_normal_scores(scores, rule="max") == 4.0
  np.testing.assert_array_equal(scores, [4.0, 1.0, 3.0, 2.0])  # input not reordered


@pytest.mark.parametrize("kwargs, message", [
    (dict(scores=np.array([1.0]), rule="median"), "rule must be one of"),
    (dict(scores=np.array([1.0]), rule="max", alpha=0.1), r"takes parameters \[\]"),
    (dict(scores=np.array([1.0]), alpha=1.5), r"alpha in \(0, 1\)"),
    (dict(scores=np.array([1.0]), rule="mean_std"), "at least 2 normal scores"),
    (dict(scores=np.array([]), rule="max"), "at least 1 normal scores"),
    (dict(scores=np.array([1.0, np.nan])), "NaN"),
    (dict(scores=np.ones((2, 2))), r"1-D array \[N\]"),
])
def test_rule_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    thresholds.threshold_from_normal_scores(**kwargs)


# ----------------------------------------------------------------------------
# Per-group estimation
# ----------------------------------------------------------------------------


def test_estimate_thresholds_per_group_and_agnostic():
  scores = np.array([1.0, 5.0, 2.0, 10.0, 20.0, 3.0])
  group_ids = np.array([0, 0, 0, 1, 1, 0])
  result = thresholds.estimate_thresholds(scores, group_ids, 3, rule="max")
  # Group 2 has no normal scores and takes the pooled (agnostic) threshold.
  np.testing.assert_array_equal(result.per_group, [5.0, 20.0, 20.0])
  assert result.agnostic == 20.0
  assert result.num_normal == (4, 2, 0)
  assert result.rule == "max" and result.params == {}
  np.testing.assert_array_equal(result.per_image(np.array([1, 0, 0, 2])), [20, 5, 5, 20])

  default = thresholds.estimate_thresholds(scores, group_ids, 3)
  assert default.rule == thresholds.DEFAULT_RULE == "quantile"
  assert default.params == {"alpha": 0.05}

  # mean_std needs 2 scores: the 1-score group falls back to the agnostic value.
  result = thresholds.estimate_thresholds(scores, np.array([0, 0, 0, 0, 0, 1]), 2,
                                          rule="mean_std", k=1.0)
  pooled = scores.mean() + scores.std(ddof=1)
  first = scores[:5].mean() + scores[:5].std(ddof=1)
  np.testing.assert_allclose(result.per_group, [first, pooled], rtol=1e-12)
  assert result.params == {"k": 1.0}


def test_group_threshold_uses_only_its_own_normal_scores():
  rng = np.random.default_rng(3)
  scores = rng.random(60)
  group_ids = rng.integers(0, 3, 60)
  base = thresholds.estimate_thresholds(scores, group_ids, 3, alpha=0.1)
  changed = scores.copy()
  changed[group_ids == 2] += 100.0
  other = thresholds.estimate_thresholds(changed, group_ids, 3, alpha=0.1)
  np.testing.assert_array_equal(base.per_group[:2], other.per_group[:2])
  assert other.per_group[2] > base.per_group[2] + 99
  # Order of the images does not matter.
  order = rng.permutation(60)
  assert thresholds.estimate_thresholds(scores[order], group_ids[order], 3, alpha=0.1) == base


def test_test_scores_never_change_thresholds():
  rng = np.random.default_rng(4)
  normal_heldout = rng.random(30)
  heldout_groups = rng.integers(0, 2, 30)
  estimated = thresholds.estimate_thresholds(normal_heldout, heldout_groups, 2)
  snapshot = estimated.to_json()
  test_groups = rng.integers(0, 2, 40)
  labels = rng.integers(0, 2, 40)
  for shift in (0.0, 5.0, -5.0):
    test_scores = rng.random(40) + shift * labels
    per_image = estimated.per_image(test_groups)
    np.testing.assert_array_equal(per_image, estimated.per_group[test_groups])
    decision_metrics(test_scores, labels, per_image, test_groups, ["a", "b"])
  assert estimated.to_json() == snapshot
  with pytest.raises(ValueError):
    estimated.per_group[0] = 0.0  # read-only: nothing downstream can move it


@pytest.mark.parametrize("args, message", [
    ((np.ones(3), np.array([0, 1]), 2), "same shape as normal_scores"),
    ((np.ones(3), np.array([0, 1, 2]), 2), r"group_ids must lie in \[0, 2\)"),
    ((np.ones(3), np.array([0.0, 1.0, 1.0]), 2), "group_ids must be a 1-D integer"),
    ((np.ones(3), np.zeros(3, int), 0), "num_groups must be an integer >= 1"),
    ((np.array([]), np.array([], int), 1), "at least 1 normal scores in total"),
])
def test_estimate_thresholds_errors(args, message):
  with pytest.raises(ValueError, match=message):
    thresholds.estimate_thresholds(*args)


# ----------------------------------------------------------------------------
# Decision metrics
# ----------------------------------------------------------------------------


def test_decision_metrics_hand_computed():
  scores = np.array([0.1, 0.6, 0.9, 0.5, 0.2, 0.3, 0.8])
  labels = np.array([0, 0, 1, 1, 0, 0, 1])
  # Class a at 0.5 (0.5 itself is a tie: not flagged), class b at 0.25.
  per_image = np.array([0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
  class_ids = np.array([0, 0, 0, 0, 1, 1, 1])
  result = decision_metrics(scores, labels, per_image, class_ids, ["a", "b"])
  a, b = result["per_class"]["a"], result["per_class"]["b"]
  # a: flagged 0.6 (FP), 0.9 (TP); 0.5 (FN, tie), 0.1 (TN).
  assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (1, 1, 1, 1)
  assert a["precision"] == 0.5 and a["recall"] == 0.5 and a["f1"] == 0.5
  assert a["false_alarm_rate"] == 0.5 and a["threshold_mean"] == 0.5
  assert (a["n_normal"], a["n_anomalous"]) == (2, 2)
  # b: flagged 0.3 (FP), 0.8 (TP); 0.2 (TN).
  assert b["precision"] == 0.5 and b["recall"] == 1.0
  assert b["f1"] == pytest.approx(2 / 3) and b["false_alarm_rate"] == 0.5
  assert result["mean"]["recall"] == 0.75
  assert result["mean"]["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
  assert result["spread"]["recall"] == {"std": 0.25, "min": 0.5, "max": 1.0}
  overall = result["overall"]
  assert (overall["tp"], overall["fp"], overall["fn"], overall["tn"]) == (2, 2, 1, 2)
  assert overall["precision"] == 0.5 and overall["recall"] == pytest.approx(2 / 3)
  assert overall["f1"] == pytest.approx(4 / 7) and overall["false_alarm_rate"] == 0.5


def test_decision_metrics_leave_undefined_rates_out():
  scores = np.array([0.1, 0.2, 0.9, 0.1, 0.4, 0.9])
  labels = np.array([0, 0, 0, 0, 1, 1])
  per_image = np.full(6, 0.5)
  # quiet: normals only, none flagged; noisy: normals only, one flagged;
  # only_bad: anomalies only, one missed; empty: no images.
  class_ids = np.array([0, 0, 1, 1, 2, 2])
  names = ["quiet", "noisy", "only_bad", "empty"]
  result = decision_metrics(scores, labels, per_image, class_ids, names)
  assert list(result["per_class"]) == ["quiet", "noisy", "only_bad"]
  quiet, noisy, bad = (result["per_class"][n] for n in names[:3])
  for row in (quiet, noisy):
    assert all(math.isnan(row[m]) for m in ("precision", "recall", "f1"))
  assert (quiet["false_alarm_rate"], noisy["false_alarm_rate"]) == (0.0, 0.5)
  assert (bad["precision"], bad["recall"], bad["f1"]) == (1.0, 0.5, pytest.approx(2 / 3))
  assert math.isnan(bad["false_alarm_rate"])
  # Each mean is over the classes where the rate exists, not padded with 1.0 or 0.0.
  assert result["mean"]["recall"] == 0.5 and result["mean"]["false_alarm_rate"] == 0.25
  assert result["spread"]["recall"] == {"std": 0.0, "min": 0.5, "max": 0.5}
  assert set(result["skipped"]) == {"quiet", "noisy", "only_bad"}
  assert set(result["skipped"]["noisy"]) == {"precision", "recall", "f1",
                                             "threshold_efficiency"}
  assert "no anomalous test images" in result["skipped"]["noisy"]["f1"]
  assert list(result["skipped"]["only_bad"]) == ["false_alarm_rate"]
  # The pooled row has both kinds of image, so every rate is defined there.
  assert not any(math.isnan(result["overall"][m]) for m in ("precision", "f1"))
  # Nothing flagged while anomalies exist: precision vacuous 1, recall and F1 0.
  missed = decision_metrics(np.array([0.1, 0.2]), np.array([0, 1]),
                                       np.ones(2), np.zeros(2, int), ["x"])
  row = missed["per_class"]["x"]
  assert (row["precision"], row["recall"], row["f1"]) == (1.0, 0.0, 0.0)
  assert "skipped" not in missed


def test_decision_metrics_of_normal_images_only_have_no_mean_f1():
  result = decision_metrics(np.array([0.1, 0.9]), np.zeros(2, int), np.full(2, 0.5),
                                       np.array([0, 1]), ["a", "b"])
  assert math.isnan(result["mean"]["f1"]) and math.isnan(result["spread"]["f1"]["std"])
  assert result["mean"]["false_alarm_rate"] == 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=np.array([0, 2, 1])), "labels must be"),
    (dict(thresholds_per_image=np.ones(2)), r"thresholds_per_image must have shape \[N\]"),
    (dict(class_ids=np.array([0, 1, 2])), r"class_ids must lie in \[0, 2\)"),
    (dict(class_names=["a", "a"]), "distinct"),
    (dict(scores=np.array([0.1, np.nan, 0.3])), "scores contains NaN"),
])
def test_decision_metrics_errors(kwargs, message):
  args = dict(scores=np.array([0.1, 0.2, 0.3]), labels=np.array([0, 1, 1]),
              thresholds_per_image=np.ones(3), class_ids=np.array([0, 1, 1]),
              class_names=["a", "b"])
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    decision_metrics(**args)

"""Class-wise decision thresholds from scores of unseen normal images.

A ranking metric (AUROC, AP) needs no threshold, but a deployed detector must
say "anomalous" or "normal", and in a multi-class model one global threshold
is poor because score scales differ between classes (the HierCore abstract's
"class-wise decision criteria"). Here each group of
``ccl_jax.decisions.grouping`` gets its own threshold, estimated only from the scores of
NORMAL training images routed to it, each scored by a model that did not see it:
a validation hold-out (CCL/RD), or HierCore's leave-one-out / cross-fitted scores
(``ccl_jax.hiercore``). Anomalous images and test images are never used: the
estimators only see the scores passed to them.

Rules (``RULES``; n = number of normal scores, s_(1) <= ... <= s_(n) sorted):

* ``quantile`` (default, ``alpha`` = 0.05): the split-conformal order
  statistic s_(k) with k = ceil((n + 1)(1 - alpha)); if k > n, s_(n) (the
  max). For a new normal image exchangeable with the held-out ones,
  P(score > s_(k)) <= 1 - k / (n + 1) <= alpha, whatever the score
  distribution. This is the small-sample correction: the plain empirical
  (1 - alpha) quantile (``np.quantile``) sits below s_(k) and its expected
  false-alarm rate exceeds alpha for small n. When n < 1 / alpha - 1 (n < 19
  at alpha = 0.05) no order statistic can guarantee alpha and the rule gives
  the max, whose guarantee is 1 / (n + 1).
* ``lognormal`` (``alpha`` = 0.05): the one-sided Gaussian prediction bound
  of the log scores, exp(m + t_{n-1, 1-alpha} * s * sqrt(1 + 1/n)) with m, s
  the mean and sample std (ddof = 1) of log s_i; needs n >= 2 and positive
  scores. If the log scores of a group's normal images are Gaussian, a new
  normal image exceeds it with probability exactly alpha, averaged over
  hold-out draws, at ANY n: where ``quantile`` can only return the max of a
  few scores (whose false-alarm rate is 1 / (n + 1) and whose value is as
  noisy as the largest of n draws), this bound uses every score. Image scores
  are positive maxima of anomaly maps, often right-skewed; the log removes
  part of the skew, but Gaussian logs are an assumption (Shapiro-Wilk
  rejects it for about half the classes of docs/thresholds.md's set, raw or
  log). Where it fails the realised false-alarm rate can differ from alpha;
  ``metrics.json`` reports it.
* ``mean_std`` (``k`` = 3.0): mean + k * std with the sample std (ddof = 1);
  needs n >= 2. Assumes roughly Gaussian scores; image scores are maxima of
  anomaly maps, i.e. right-skewed, so the implied false-alarm rate is
  unreliable, and with 5-30 images the std itself is noisy.
* ``max``: s_(n). Zero false alarms on the held-out set; its expected
  false-alarm rate is 1 / (n + 1), but it keeps rising with n and follows any
  single outlier in the held-out normals.

Default: ``quantile`` with alpha = 0.05. Held-out sets are small (often 5-30
images per class); there the rule equals ``max`` up to n = 18, which is the
best a distribution-free rule can do, and from n = 19 on it stops chasing the
single largest normal score and targets a stated false-alarm rate with a
finite-sample guarantee instead of a Gaussian assumption. ``mean_std`` is
kept for comparison only.

Small groups: the agnostic threshold (rule applied to all normal scores
pooled) is always computed. A group with fewer normal scores than the rule
needs (0 for every rule, 1 for ``lognormal`` and ``mean_std``) takes the agnostic threshold;
``Thresholds.num_normal`` records each group's count so this is visible.

Decisions: an image is flagged anomalous iff ``score > threshold`` (strict).
A score equal to the threshold is normal, so the held-out normal image that
defines a ``max`` or ``quantile`` threshold is not itself a false alarm, which
is what the conformal bound above assumes. (``ccl_jax.results.metrics`` sweeps
thresholds with ``>=``; that only matters for ranking curves, not here.)

Decision metrics, per true class and pooled: with TP/FP/FN/TN counted at the
per-image thresholds, precision = TP / (TP + FP), recall = TP / (TP + FN),
F1 = 2 TP / (2 TP + FP + FN) and false-alarm rate = FP / (FP + TN). A class
without anomalous test images (normal images only) has no precision, recall
or F1, and one without normal test images no false-alarm rate: these are NaN
and ``skipped[class][metric]`` says why. (A 1.0 or 0.0 by convention would
be counted in the means as if the class had been tested.) With anomalous
images present but nothing flagged, precision is 1.0 (no false alarm was
made), so F1 = 2PR/(P + R) still holds. Threshold efficiency = F1 / F1-max,
where F1-max is the F1 at the best cut of the same images' scores
(`metrics.f1_max`; 1.0 with anomalous images only, where flagging all is
exact): how much of what the ranking allows the estimated threshold delivers,
1.0 at the best threshold; undefined where F1 is. Each class also reports
its counts. The mean and spread (population std, min, max) of each metric are
taken over the classes where it is defined (NaN when it is defined for none).

``ccl_jax.runs.run_dir`` stores groups + thresholds + a meta dict as a run's
decision.json, and validates it key by key when reading it back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import scipy.stats

RULES = ("quantile", "lognormal", "mean_std", "max")
DEFAULT_RULE = "quantile"
# Each rule's parameters and their defaults; nothing else is accepted.
RULE_DEFAULTS: dict[str, dict[str, float]] = {
    "quantile": {"alpha": 0.05},
    "lognormal": {"alpha": 0.05},
    "mean_std": {"k": 3.0},
    "max": {},
}
# Fewest normal scores each rule is defined for.
_MIN_SCORES = {"quantile": 1, "lognormal": 2, "mean_std": 2, "max": 1}
# (n + 1)(1 - alpha) is often an integer in exact arithmetic (n = 39,
# alpha = 0.05); float rounding must not push ceil() one order statistic up.
_CEIL_SLACK = 1e-9


# ----------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------


def _resolve_params(rule: str, params: dict[str, Any]) -> dict[str, float]:
  """The rule's full parameter dict (defaults filled in), validated."""
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
  unknown = sorted(set(params) - set(RULE_DEFAULTS[rule]))
  if unknown:
    raise ValueError(
        f"rule {rule!r} takes parameters {sorted(RULE_DEFAULTS[rule])}; got unknown {unknown}")
  resolved = {**RULE_DEFAULTS[rule], **params}
  for name, value in resolved.items():
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
      raise ValueError(f"rule {rule!r} parameter {name!r} must be a number; got {value!r}")
    resolved[name] = float(value)
  if rule in ("quantile", "lognormal") and not 0.0 < resolved["alpha"] < 1.0:
    raise ValueError(f"rule {rule!r} needs alpha in (0, 1); got {resolved['alpha']}")
  if rule == "mean_std" and not (math.isfinite(resolved["k"]) and resolved["k"] >= 0.0):
    raise ValueError(f"rule 'mean_std' needs a finite k >= 0; got {resolved['k']}")
  return resolved


def as_scores(name: str, scores: Any) -> np.ndarray:
  array = np.asarray(scores)
  if array.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array [N]; got shape {array.shape}")
  if array.dtype.kind not in "iuf":
    raise ValueError(f"{name} must hold real numbers; got dtype {array.dtype}")
  array = array.astype(np.float64)
  if not np.isfinite(array).all():
    raise ValueError(f"{name} contains NaN or Inf; scores must be finite")
  return array


def _apply_rule(scores: np.ndarray, rule: str, params: dict[str, float]) -> float:
  n = scores.size
  if rule == "max":
    return float(scores.max())
  if rule == "mean_std":
    return float(scores.mean() + params["k"] * scores.std(ddof=1))
  if rule == "lognormal":
    if np.any(scores <= 0):
      raise ValueError(f"rule 'lognormal' needs positive scores; got minimum {scores.min()}")
    logs = np.log(scores)
    spread = scipy.stats.t.ppf(1.0 - params["alpha"], n - 1) * math.sqrt(1.0 + 1.0 / n)
    return float(np.exp(logs.mean() + spread * logs.std(ddof=1)))
  k = math.ceil((n + 1) * (1.0 - params["alpha"]) - _CEIL_SLACK)
  # np.sort copies, so the caller's array is never reordered.
  return float(np.sort(scores)[min(k, n) - 1])


def threshold_from_normal_scores(scores: np.ndarray, *, rule: str = DEFAULT_RULE,
                                 **rule_params: float) -> float:
  """One threshold from the scores of normal held-out images.

  Args:
    scores: [n] image scores of NORMAL held-out images only.
    rule: one of `RULES` (see the module docstring).
    **rule_params: ``alpha`` for ``quantile``, ``k`` for ``mean_std``.

  Returns:
    The threshold; an image is anomalous iff its score is strictly above it.
  """
  params = _resolve_params(rule, rule_params)
  scores = as_scores("scores", scores)
  if scores.size < _MIN_SCORES[rule]:
    raise ValueError(
        f"rule {rule!r} needs at least {_MIN_SCORES[rule]} normal scores; got {scores.size}")
  return _apply_rule(scores, rule, params)


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Per-group and class-agnostic thresholds.

  Attributes:
    per_group: [G] float64; group g's threshold (the agnostic one where the
      group had too few normal scores, see `num_normal`).
    agnostic: the rule applied to all normal scores pooled.
    rule: the rule's name, one of `RULES`.
    params: the rule's parameters, defaults filled in.
    num_normal: [G] number of normal scores each group's estimate used; empty
      when unknown (constructed by hand).
  """

  per_group: np.ndarray
  agnostic: float
  rule: str
  params: dict
  num_normal: tuple[int, ...] = ()

  def __post_init__(self):
    per_group = np.asarray(self.per_group)
    if per_group.ndim != 1 or per_group.size == 0 or per_group.dtype.kind not in "iuf":
      raise ValueError(
          f"Thresholds.per_group must be a non-empty 1-D real array [G]; got shape "
          f"{per_group.shape}, dtype {per_group.dtype}")
    per_group = per_group.astype(np.float64)
    if not np.isfinite(per_group).all():
      raise ValueError("Thresholds.per_group contains NaN or Inf")
    if (isinstance(self.agnostic, bool) or not isinstance(self.agnostic, (int, float, np.number))
        or not math.isfinite(self.agnostic)):
      raise ValueError(f"Thresholds.agnostic must be a finite number; got {self.agnostic!r}")
    if not isinstance(self.params, dict):
      raise ValueError(f"Thresholds.params must be a dict; got {self.params!r}")
    params = _resolve_params(self.rule, self.params)
    num_normal = tuple(self.num_normal)
    if num_normal and (len(num_normal) != per_group.size or not all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0
        for c in num_normal)):
      raise ValueError(
          f"Thresholds.num_normal must be empty or {per_group.size} counts >= 0; "
          f"got {num_normal!r}")
    per_group.flags.writeable = False
    object.__setattr__(self, "per_group", per_group)
    object.__setattr__(self, "agnostic", float(self.agnostic))
    object.__setattr__(self, "params", params)
    object.__setattr__(self, "num_normal", tuple(int(c) for c in num_normal))

  # The generated __eq__ would compare arrays with `==` and fail on truth value.
  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Thresholds):
      return NotImplemented
    return (np.array_equal(self.per_group, other.per_group) and self.agnostic == other.agnostic
            and self.rule == other.rule and self.params == other.params
            and self.num_normal == other.num_normal)

  def per_image(self, group_ids: np.ndarray) -> np.ndarray:
    """[M] float64 threshold of each image from its routed group index."""
    group_ids = as_group_ids("group_ids", group_ids, self.per_group.size)
    return self.per_group[group_ids]

  def to_json(self) -> dict:
    return {"per_group": self.per_group.tolist(), "agnostic": self.agnostic,
            "rule": self.rule, "params": dict(self.params), "num_normal": list(self.num_normal)}

  @classmethod
  def from_json(cls, d: dict) -> Thresholds:
    """Inverse of `to_json`; raises ValueError naming the offending key."""
    if not isinstance(d, dict):
      raise ValueError(f"thresholds must be a JSON object; got {type(d).__name__}")
    keys = ("per_group", "agnostic", "rule", "params", "num_normal")
    for key in keys:
      if key not in d:
        raise ValueError(f"missing key {key!r} (expected keys {', '.join(keys)})")
    per_group, rule, params, num_normal = d["per_group"], d["rule"], d["params"], d["num_normal"]
    if not isinstance(per_group, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in per_group):
      raise ValueError(f"key 'per_group' must be a list of numbers; got {per_group!r}")
    if not isinstance(rule, str):
      raise ValueError(f"key 'rule' must be a string, one of {RULES}; got {rule!r}")
    if not isinstance(params, dict):
      raise ValueError(f"key 'params' must be an object; got {params!r}")
    if not isinstance(num_normal, list):
      raise ValueError(f"key 'num_normal' must be a list of counts; got {num_normal!r}")
    try:
      return cls(np.asarray(per_group, np.float64), d["agnostic"], rule, params,
                 tuple(num_normal))
    except ValueError as err:
      raise ValueError(f"invalid thresholds: {err}") from None


def as_group_ids(name: str, ids: Any, num_groups: int) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
    raise ValueError(
        f"{name} must be a 1-D integer array [N]; got shape {ids.shape}, dtype {ids.dtype}")
  ids = ids.astype(np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= num_groups):
    raise ValueError(
        f"{name} must lie in [0, {num_groups}); got values in [{ids.min()}, {ids.max()}]")
  return ids


def estimate_thresholds(normal_scores: np.ndarray, group_ids: np.ndarray, num_groups: int, *,
                        rule: str = DEFAULT_RULE, **rule_params: float) -> Thresholds:
  """Per-group and agnostic thresholds from NORMAL held-out training images.

  Args:
    normal_scores: [N] scores of normal held-out training images (never test
      images, never anomalous ones).
    group_ids: [N] group index of each image (``grouping.route``, or the
      class id when labels are used).
    num_groups: G, the number of groups.
    rule: one of `RULES`.
    **rule_params: the rule's parameters.

  Returns:
    `Thresholds`; groups with too few scores for the rule get the agnostic
    threshold (see the module docstring).
  """
  params = _resolve_params(rule, rule_params)
  if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
      or num_groups < 1:
    raise ValueError(f"num_groups must be an integer >= 1; got {num_groups!r}")
  scores = as_scores("normal_scores", normal_scores)
  group_ids = as_group_ids("group_ids", group_ids, int(num_groups))
  if group_ids.shape != scores.shape:
    raise ValueError(
        f"group_ids must have the same shape as normal_scores {scores.shape}; "
        f"got {group_ids.shape}")
  if scores.size < _MIN_SCORES[rule]:
    raise ValueError(
        f"rule {rule!r} needs at least {_MIN_SCORES[rule]} normal scores in total; "
        f"got {scores.size}")
  threshold = functools.partial(threshold_from_normal_scores, rule=rule, **params)
  agnostic = threshold(scores)
  counts = np.bincount(group_ids, minlength=num_groups)
  per_group = np.array([threshold(scores[group_ids == g]) if counts[g] >= _MIN_SCORES[rule]
                        else agnostic for g in range(num_groups)])
  return Thresholds(per_group, agnostic, rule, params, tuple(int(c) for c in counts))

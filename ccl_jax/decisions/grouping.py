"""Image-level embeddings -> groups: the routing behind every model's class-wise thresholds.

HierCore (Multi-class Image Anomaly Detection for Practical Applications, 2025,
abstract) keeps one memory bank
per group of similar training images and estimates one decision threshold per
group, so that a multi-class model gets class-wise thresholds even when no
class labels exist. This module builds those groups and routes new images to
them. Only the abstract is available, so every choice below is ours:

Embedding. Every model routes with the same image-level embedding (spatial
mean of the frozen encoder's deepest map, ``ccl_jax.models.detector.Router.embed``). Rows are
L2-normalised before anything else: pretrained features differ mostly in
direction between object classes, while their norm moves with brightness and
texture energy inside a class, so cosine geometry is the one to cluster in.

Groups from labels. When class labels are given there is one group per class,
named after the class, and the assignment is the label itself.

Groups without labels. k-means (scikit-learn, k-means++ init, ``n_init``
restarts, ``random_state=seed``) on the unit-norm rows, followed by spherical
k-means refinement: centroids are re-computed as the renormalised mean of
their members and members re-assigned to the nearest centroid by cosine until
nothing changes. Plain k-means on unit vectors assigns by Euclidean distance
to the *unnormalised* mean, which can disagree with cosine routing near a
boundary; after refinement the returned training assignment equals
``route(groups, embeddings)``, so the images a group's memory bank and
threshold are built from are exactly the ones routing would send there. A
refinement step that would empty a group is not taken (the previous,
non-degenerate state is kept); only then, or after ``_MAX_REFINE_STEPS``,
can the assignment differ from routing.

Number of groups (``choose_num_groups``). For every k in 2..max_groups
(capped at N - 1 and at the number of distinct rows) k-means is fitted and
scored with the mean silhouette coefficient (Euclidean on the unit rows, i.e.
chordal distance, monotone in cosine distance). The k with the largest
silhouette wins; ties go to the smaller k. Silhouette is undefined for k = 1,
so the one-class case has its own rule: if the best silhouette is below
``min_silhouette`` (default 0.25, Kaufman & Rousseeuw's "no substantial
structure" bound) the data are taken as one group. Fewer than 3 images or
fewer than 2 distinct embeddings also give one group. Silhouette costs
O(N^2); above ``_SILHOUETTE_SAMPLE`` images it is computed on a seeded random
subset. The search costs (max_groups - 1) k-means fits of ``_N_INIT``
restarts each (3,000 images of dimension 2,048: 27 s for k = 2..5 on two
busy CPU cores, so a few minutes for max_groups = 20); pass ``num_groups`` to
skip it. Silhouette
was preferred over the elbow rule (needs a hand-tuned knee
detector) and BIC (assumes Gaussian clusters in D ~ 2048 dimensions with few
images per class). ``num_groups`` overrides the choice.

Routing (``route``). Nearest centroid by cosine similarity (dot product of
unit rows with the unit centroids); ties go to the lower group index.

Everything is deterministic given ``seed`` (k-means and the silhouette subset
are the only random steps). Bad input raises ValueError naming the argument
and the expected form.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score, v_measure_score

DEFAULT_MAX_GROUPS = 20
DEFAULT_MIN_SILHOUETTE = 0.25
# k-means restarts per k; k-means++ with 10 restarts is scikit-learn's
# classic default and keeps the chosen k stable across seeds.
_N_INIT = 10
# Silhouette needs all pairwise distances; beyond this many images a seeded
# subset keeps memory at ~_SILHOUETTE_SAMPLE^2 floats.
_SILHOUETTE_SAMPLE = 4000
# Spherical refinement converges in a handful of steps on real data; the cap
# only bounds pathological oscillation.
_MAX_REFINE_STEPS = 100
# Centroids are stored as float32; renormalised float32 rows are within this.
_UNIT_NORM_TOL = 1e-3


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------


def _as_embeddings(name: str, embeddings: Any, *, allow_empty: bool = False) -> np.ndarray:
  """Checks `embeddings` is a finite real [N, D] array; returns it as float64."""
  array = np.asarray(embeddings)
  if array.ndim != 2:
    raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {array.shape}")
  if array.dtype.kind not in "iuf":
    raise ValueError(f"{name} must hold real numbers; got dtype {array.dtype}")
  if array.shape[1] == 0 or (array.shape[0] == 0 and not allow_empty):
    raise ValueError(f"{name} must be non-empty [N, D]; got shape {array.shape}")
  array = array.astype(np.float64)
  if not np.isfinite(array).all():
    row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
    raise ValueError(f"{name} contains NaN or Inf (first in row {row}); it must be finite")
  return array


def _unit_rows(name: str, array: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm; a zero row has no direction and is an error."""
  norms = np.linalg.norm(array, axis=1, keepdims=True)
  if array.shape[0] and not (norms > 0).all():
    row = int(np.flatnonzero(norms[:, 0] == 0)[0])
    raise ValueError(f"{name} row {row} is all zeros; it has no direction to route by")
  return array / norms


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
  return int(value)


# ----------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Groups:
  """Upper level of the hierarchy.

  Attributes:
    centroids: [G, D] float32, unit-norm rows: the renormalised mean of the
      members' unit-norm embeddings.
    names: G distinct names: class names when built from labels, else
      ``group_0``, ``group_1``, ...
    from_labels: whether the groups are the classes of given labels.
  """

  centroids: np.ndarray
  names: tuple[str, ...]
  from_labels: bool

  def __post_init__(self):
    centroids = _as_embeddings("Groups.centroids", self.centroids)
    norms = np.linalg.norm(centroids, axis=1)
    if np.any(np.abs(norms - 1.0) > _UNIT_NORM_TOL):
      raise ValueError(
          f"Groups.centroids rows must have unit L2 norm; got norms in "
          f"[{norms.min():.6g}, {norms.max():.6g}]")
    names = tuple(self.names)
    if len(names) != centroids.shape[0] or not all(isinstance(n, str) for n in names):
      raise ValueError(
          f"Groups.names must be {centroids.shape[0]} strings (one per centroid row); "
          f"got {names!r}")
    if len(set(names)) != len(names):
      raise ValueError(f"Groups.names must be distinct; got {names!r}")
    if not isinstance(self.from_labels, (bool, np.bool_)):
      raise ValueError(f"Groups.from_labels must be a bool; got {self.from_labels!r}")
    # Frozen: the normalised fields are written once, here.
    object.__setattr__(self, "centroids", np.ascontiguousarray(centroids, np.float32))
    object.__setattr__(self, "names", names)
    object.__setattr__(self, "from_labels", bool(self.from_labels))

  # The generated __eq__ would compare arrays with `==` and fail on truth value.
  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Groups):
      return NotImplemented
    return (self.names == other.names and self.from_labels == other.from_labels
            and np.array_equal(self.centroids, other.centroids))

  @property
  def num_groups(self) -> int:
    return len(self.names)

  def index_of(self, class_name: str) -> int:
    """Index of the group named `class_name`."""
    try:
      return self.names.index(class_name)
    except ValueError:
      raise ValueError(
          f"unknown group/class name {class_name!r}; known names: {list(self.names)}") from None

  def to_json(self) -> dict:
    """JSON-ready dict; float32 centroids survive the float64 text round trip exactly."""
    return {"names": list(self.names), "from_labels": self.from_labels,
            "centroids": self.centroids.astype(np.float64).tolist()}

  @classmethod
  def from_json(cls, d: dict) -> Groups:
    """Inverse of `to_json`; raises ValueError naming the offending key."""
    if not isinstance(d, dict):
      raise ValueError(f"groups must be a JSON object; got {type(d).__name__}")
    for key in ("names", "from_labels", "centroids"):
      if key not in d:
        raise ValueError(f"missing key {key!r} (expected keys names, from_labels, centroids)")
    names, from_labels, centroids = d["names"], d["from_labels"], d["centroids"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise ValueError(f"key 'names' must be a list of strings; got {names!r}")
    if not isinstance(from_labels, bool):
      raise ValueError(f"key 'from_labels' must be true or false; got {from_labels!r}")
    if (not isinstance(centroids, list) or not centroids
        or not all(isinstance(row, list) for row in centroids)
        or len({len(row) for row in centroids}) != 1
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for row in centroids for v in row)):
      raise ValueError(
          "key 'centroids' must be a non-empty list of equal-length lists of numbers [G][D]")
    try:
      return cls(np.asarray(centroids, np.float64), tuple(names), from_labels)
    except ValueError as err:
      raise ValueError(f"invalid groups: {err}") from None


# ----------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------


def _kmeans_labels(unit: np.ndarray, k: int, seed: int) -> np.ndarray:
  return KMeans(n_clusters=k, n_init=_N_INIT, random_state=seed).fit(unit).labels_


def _centroids(unit: np.ndarray, assignment: np.ndarray, k: int) -> np.ndarray:
  """[k, D] renormalised mean of each group's unit rows; every group must have members."""
  sums = np.zeros((k, unit.shape[1]))
  np.add.at(sums, assignment, unit)
  norms = np.linalg.norm(sums, axis=1, keepdims=True)
  if not (norms > 0).all():
    group = int(np.flatnonzero(norms[:, 0] == 0)[0])
    raise ValueError(
        f"group {group}'s member embeddings cancel out (mean is zero); no centroid direction")
  return sums / norms


def _nearest(unit: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  return np.argmax(unit @ centroids.T, axis=1).astype(np.int32)


def _spherical_refine(unit: np.ndarray, assignment: np.ndarray, k: int) -> np.ndarray:
  for _ in range(_MAX_REFINE_STEPS):
    update = _nearest(unit, _centroids(unit, assignment, k))
    if np.array_equal(update, assignment) or np.unique(update).size < k:
      break
    assignment = update
  return assignment


def _select_k(unit: np.ndarray, max_groups: int, seed: int,
              min_silhouette: float) -> tuple[int, np.ndarray]:
  """(k, k-means labels for that k) by the silhouette criterion; labels are 0s for k = 1."""
  n = unit.shape[0]
  one_group = (1, np.zeros(n, np.int32))
  # Silhouette needs 2 <= k <= N - 1, and k-means more than k distinct points.
  k_max = min(max_groups, n - 1, np.unique(unit, axis=0).shape[0])
  if k_max < 2:
    return one_group
  sample = _SILHOUETTE_SAMPLE if n > _SILHOUETTE_SAMPLE else None
  best, best_score = one_group, -math.inf
  for k in range(2, k_max + 1):
    labels = _kmeans_labels(unit, k, seed)
    score = silhouette_score(unit, labels, sample_size=sample, random_state=seed)
    if score > best_score:
      best, best_score = (k, labels), score
  return best if best_score >= min_silhouette else one_group


def choose_num_groups(embeddings: np.ndarray, *, max_groups: int = DEFAULT_MAX_GROUPS,
                      seed: int = 0, min_silhouette: float = DEFAULT_MIN_SILHOUETTE) -> int:
  """Number of groups by the silhouette criterion (see the module docstring).

  Args:
    embeddings: [N, D] image-level embeddings (any norm; rows are normalised).
    max_groups: largest k tried.
    seed: k-means and silhouette-subset seed.
    min_silhouette: best silhouette below this means "one group".

  Returns:
    k in [1, max_groups].
  """
  unit = _unit_rows("embeddings", _as_embeddings("embeddings", embeddings))
  return _select_k(unit, *_check_selection(max_groups, seed, min_silhouette))[0]


def _check_selection(max_groups: Any, seed: Any, min_silhouette: Any) -> tuple[int, int, float]:
  min_silhouette = float(min_silhouette)
  if not -1.0 <= min_silhouette <= 1.0:
    raise ValueError(f"min_silhouette must be in [-1, 1]; got {min_silhouette}")
  return _check_int("max_groups", max_groups, 1), _check_int("seed", seed, 0), min_silhouette


def fit_groups(embeddings: np.ndarray, *, labels: np.ndarray | None = None,
               class_names: Sequence[str] | None = None, num_groups: int | None = None,
               max_groups: int = DEFAULT_MAX_GROUPS, seed: int = 0,
               min_silhouette: float = DEFAULT_MIN_SILHOUETTE) -> tuple[Groups, np.ndarray]:
  """Groups from training embeddings, by class label or by clustering.

  Args:
    embeddings: [N, D] image-level embeddings of the training images.
    labels: optional [N] integer class ids in [0, C). Gives one group per
      class; every class must have at least one image.
    class_names: the C class names for `labels` (default ``class_0``, ...).
      Only valid together with `labels`.
    num_groups: without labels, the number of clusters (1..N) instead of the
      automatic choice; with labels it must equal C if given.
    max_groups, seed, min_silhouette: see `choose_num_groups`.

  Returns:
    (groups, assignment) with assignment [N] int32 group indices. Without
    labels, assignment equals ``route(groups, embeddings)``.
  """
  unit = _unit_rows("embeddings", _as_embeddings("embeddings", embeddings))
  n = unit.shape[0]
  if labels is not None:
    return _groups_from_labels(unit, labels, class_names, num_groups)
  if class_names is not None:
    raise ValueError("class_names was given without labels; pass labels [N] as well")
  max_groups, seed, min_silhouette = _check_selection(max_groups, seed, min_silhouette)
  if num_groups is None:
    k, kmeans_labels = _select_k(unit, max_groups, seed, min_silhouette)
  else:
    k = _check_int("num_groups", num_groups, 1)
    if k > n:
      raise ValueError(f"num_groups must be <= the number of embeddings ({n}); got {k}")
    kmeans_labels = _kmeans_labels(unit, k, seed) if k > 1 else np.zeros(n, np.int32)
  assignment = kmeans_labels.astype(np.int32)
  if k > 1:
    assignment = _spherical_refine(unit, assignment, k)
  names = tuple(f"group_{i}" for i in range(k))
  return Groups(_centroids(unit, assignment, k), names, False), assignment


def _groups_from_labels(unit: np.ndarray, labels: Any, class_names: Sequence[str] | None,
                        num_groups: int | None) -> tuple[Groups, np.ndarray]:
  labels = np.asarray(labels)
  if labels.shape != (unit.shape[0],):
    raise ValueError(
        f"labels must have shape [N] = ({unit.shape[0]},) to match embeddings; "
        f"got {labels.shape}")
  if labels.dtype.kind not in "iu":
    raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}")
  if class_names is None:
    num_classes = int(labels.max()) + 1 if labels.min() >= 0 else 0
    class_names = [f"class_{i}" for i in range(num_classes)]
  elif isinstance(class_names, str):
    raise ValueError("class_names must be a sequence of strings, not one string")
  class_names = tuple(class_names)
  num_classes = len(class_names)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
        f"labels must lie in [0, {num_classes}) (one per class name); "
        f"got values in [{labels.min()}, {labels.max()}]")
  if num_groups is not None and num_groups != num_classes:
    raise ValueError(
        f"num_groups must equal the number of classes ({num_classes}) when labels are "
        f"given; got {num_groups}")
  empty = [class_names[i] for i in np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)]
  if empty:
    raise ValueError(f"classes {empty} have no embeddings in labels; every class needs one")
  assignment = labels.astype(np.int32)
  return Groups(_centroids(unit, assignment, num_classes), class_names, True), assignment


def route(groups: Groups, embeddings: np.ndarray) -> np.ndarray:
  """[M] int32 index of the nearest centroid by cosine similarity (ties: lower index)."""
  unit = _unit_rows("embeddings", _as_embeddings("embeddings", embeddings, allow_empty=True))
  dim = groups.centroids.shape[1]
  if unit.shape[1] != dim:
    raise ValueError(
        f"embeddings must have shape [M, {dim}] (the groups' embedding dim); "
        f"got {unit.shape}")
  return _nearest(unit, groups.centroids.astype(np.float64))


def pseudo_classes(embeddings: np.ndarray, true_class_ids: np.ndarray, *, num_classes: int,
                   seed: int) -> tuple[np.ndarray, float]:
  """K-means pseudo-classes of training images (paper Table 3: classes unknown at
  training) and their V-measure against the true classes. The paper clusters ImageNet
  ResNet-18 average-pooled features; here the same routing embeddings as the groups."""
  if num_classes < 2 or num_classes > len(embeddings):
    raise ValueError(f"dataset.num_pseudo_classes={num_classes} must be between 2 and the "
                     f"number of training images ({len(embeddings)}).")
  clusters = KMeans(num_classes, n_init=10, random_state=seed).fit_predict(
      np.asarray(embeddings).astype(np.float64))
  v_measure = v_measure_score(true_class_ids, clusters)
  return clusters.astype(np.int32), float(v_measure)

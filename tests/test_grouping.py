"""Tests for ccl_jax.decisions.grouping: label groups, clustering, automatic k and routing."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import v_measure_score

from ccl_jax.decisions import grouping


def _blobs(k: int, per_class: int = 25, dim: int = 32, spread: float = 0.15, seed: int = 0):
  """Well separated blobs in the positive orthant (like pooled ReLU features).

  Each class has its own random positive direction; embeddings are that
  direction times a random norm (norm carries no class information) plus
  noise. Returns (embeddings [k * per_class, dim], labels, shuffled).
  """
  rng = np.random.default_rng(seed)
  centres = rng.random((k, dim)) ** 4
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  labels = np.repeat(np.arange(k), per_class)
  noise = spread * rng.standard_normal((labels.size, dim)) / np.sqrt(dim)
  scale = rng.uniform(0.5, 3.0, size=(labels.size, 1))
  embeddings = scale * (centres[labels] + noise)
  order = rng.permutation(labels.size)
  return embeddings[order].astype(np.float32), labels[order]


def _is_permutation_match(assignment: np.ndarray, labels: np.ndarray) -> bool:
  contingency = np.zeros((labels.max() + 1, assignment.max() + 1), int)
  np.add.at(contingency, (labels, assignment), 1)
  return (contingency.shape[0] == contingency.shape[1]
          and ((contingency > 0).sum(axis=0) == 1).all()
          and ((contingency > 0).sum(axis=1) == 1).all())


@pytest.mark.parametrize("k", [2, 3, 6])
def test_choose_num_groups_finds_true_k(k):
  embeddings, _ = _blobs(k, seed=k)
  assert grouping.choose_num_groups(embeddings, max_groups=k + 3) == k


def test_choose_num_groups_single_class_is_one():
  rng = np.random.default_rng(1)
  direction = rng.random(32)
  embeddings = direction + 0.3 * rng.standard_normal((60, 32))
  assert grouping.choose_num_groups(embeddings, max_groups=6) == 1


def test_choose_num_groups_degenerate_inputs_are_one():
  assert grouping.choose_num_groups(np.ones((2, 4))) == 1
  # Identical directions at different norms: one distinct unit row.
  assert grouping.choose_num_groups(np.arange(1, 11)[:, None] * np.ones((10, 4))) == 1
  assert grouping.choose_num_groups(_blobs(3)[0], max_groups=1) == 1


def test_fit_groups_without_labels_recovers_classes():
  embeddings, labels = _blobs(4, seed=3)
  groups, assignment = grouping.fit_groups(embeddings, max_groups=6)
  assert not groups.from_labels
  assert groups.names == ("group_0", "group_1", "group_2", "group_3")
  assert assignment.dtype == np.int32 and assignment.shape == labels.shape
  assert _is_permutation_match(assignment, labels)
  assert v_measure_score(labels, assignment) == pytest.approx(1.0)
  np.testing.assert_allclose(np.linalg.norm(groups.centroids, axis=1), 1.0, atol=1e-6)
  # Training assignment is what routing would do, and new images of a class
  # go to that class's group.
  np.testing.assert_array_equal(grouping.route(groups, embeddings), assignment)
  fresh, fresh_labels = _blobs(4, seed=3, per_class=5)
  assert _is_permutation_match(grouping.route(groups, fresh), fresh_labels)


def test_assignment_is_route_consistent_where_plain_kmeans_is_not():
  # A tight and a wide cluster: plain k-means assigns by distance to the
  # unnormalised mean and disagrees with cosine routing near the boundary.
  rng = np.random.default_rng(2)
  embeddings = np.vstack([[1.0, 0, 0, 0] + 0.1 * rng.standard_normal((40, 4)),
                          [0, 1.0, 0, 0] + 1.2 * rng.standard_normal((40, 4))])
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  plain = KMeans(n_clusters=2, n_init=10, random_state=0).fit(unit).labels_
  plain_groups = grouping.Groups(grouping._centroids(unit, plain, 2), ("a", "b"), False)
  assert (grouping.route(plain_groups, embeddings) != plain).any()
  groups, assignment = grouping.fit_groups(embeddings, num_groups=2, seed=0)
  np.testing.assert_array_equal(grouping.route(groups, embeddings), assignment)
  assert np.unique(assignment).size == 2


def test_fit_groups_is_deterministic_given_seed():
  embeddings, _ = _blobs(3, spread=2.0, seed=5)
  first = grouping.fit_groups(embeddings, num_groups=4, seed=11)
  second = grouping.fit_groups(embeddings, num_groups=4, seed=11)
  assert first[0] == second[0]
  np.testing.assert_array_equal(first[1], second[1])


def test_num_groups_override_and_one_group():
  embeddings, _ = _blobs(3, seed=2)
  groups, assignment = grouping.fit_groups(embeddings, num_groups=5)
  assert groups.num_groups == 5 and np.unique(assignment).size == 5
  groups, assignment = grouping.fit_groups(embeddings, num_groups=1)
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  mean = unit.mean(axis=0)
  np.testing.assert_allclose(groups.centroids[0], mean / np.linalg.norm(mean), atol=1e-6)
  assert (assignment == 0).all()


def test_labels_path_gives_one_group_per_class():
  embeddings = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
  labels = np.array([0, 1, 0, 1])
  groups, assignment = grouping.fit_groups(embeddings, labels=labels,
                                           class_names=["bottle", "cable"])
  assert groups.from_labels and groups.names == ("bottle", "cable")
  np.testing.assert_array_equal(assignment, labels)
  # bottle: mean of (1, 0) and (1, 1)/sqrt(2), renormalised; cable: (0, 1).
  bottle = np.array([1 + 2 ** -0.5, 2 ** -0.5])
  np.testing.assert_allclose(groups.centroids[0], bottle / np.linalg.norm(bottle), atol=1e-6)
  np.testing.assert_allclose(groups.centroids[1], [0.0, 1.0], atol=1e-7)
  assert groups.index_of("cable") == 1
  with pytest.raises(ValueError, match="bottle"):
    groups.index_of("screw")
  # Labels, not clustering, decide: even separable blobs keep their labels.
  blobs, blob_labels = _blobs(3)
  groups, assignment = grouping.fit_groups(blobs, labels=blob_labels % 2)
  assert groups.names == ("class_0", "class_1")
  np.testing.assert_array_equal(assignment, blob_labels % 2)


def test_route_agrees_with_brute_force():
  rng = np.random.default_rng(4)
  centroids = rng.standard_normal((7, 16))
  centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
  groups = grouping.Groups(centroids, tuple(f"g{i}" for i in range(7)), False)
  queries = rng.standard_normal((200, 16)) * rng.uniform(0.1, 10, size=(200, 1))
  expected = []
  for q in queries:
    cosines = [float(q @ c) / (np.linalg.norm(q) * np.linalg.norm(c))
               for c in groups.centroids.astype(np.float64)]
    expected.append(int(np.argmax(cosines)))
  routed = grouping.route(groups, queries)
  assert routed.dtype == np.int32
  np.testing.assert_array_equal(routed, expected)
  assert grouping.route(groups, np.zeros((0, 16))).shape == (0,)


def test_json_round_trip_and_validation():
  groups, _ = grouping.fit_groups(_blobs(3)[0], num_groups=3)
  restored = grouping.Groups.from_json(groups.to_json())
  assert restored == groups
  np.testing.assert_array_equal(restored.centroids, groups.centroids)
  broken = groups.to_json()
  del broken["centroids"]
  with pytest.raises(ValueError, match="'centroids'"):
    grouping.Groups.from_json(broken)
  broken = groups.to_json()
  broken["names"] = ["a", "b"]
  with pytest.raises(ValueError, match="names"):
    grouping.Groups.from_json(broken)
  broken = groups.to_json()
  broken["centroids"][0] = [2.0] * len(broken["centroids"][0])
  with pytest.raises(ValueError, match="unit L2 norm"):
    grouping.Groups.from_json(broken)


@pytest.mark.parametrize("kwargs, message", [
    (dict(embeddings=np.ones(5)), r"embeddings must be a 2-D array \[N, D\]"),
    (dict(embeddings=np.array([[1.0, np.nan], [1.0, 0.0]])), "NaN or Inf .*row 0"),
    (dict(embeddings=np.array([[1.0, 0.0], [0.0, 0.0]])), "row 1 is all zeros"),
    (dict(embeddings=np.eye(3), labels=np.array([0, 1])), r"labels must have shape \[N\]"),
    (dict(embeddings=np.eye(3), labels=np.array([0, 1, 2]), class_names=["a", "b"]),
     r"labels must lie in \[0, 2\)"),
    (dict(embeddings=np.eye(3), labels=np.array([0, -1, 0])), r"labels must lie in"),
    (dict(embeddings=np.eye(3), labels=np.array([0, 0, 0]), class_names=["a", "b"]),
     r"classes \['b'\] have no embeddings"),
    (dict(embeddings=np.eye(3), labels=np.array([0.0, 1.0, 1.0])), "integer class ids"),
    (dict(embeddings=np.eye(3), class_names=["a"]), "class_names was given without labels"),
    (dict(embeddings=np.eye(3), num_groups=4), r"num_groups must be <= the number of .* \(3\)"),
    (dict(embeddings=np.eye(3), num_groups=0), "num_groups must be an integer >= 1"),
    (dict(embeddings=np.eye(3), labels=np.array([0, 1, 1]), num_groups=3),
     "num_groups must equal the number of classes"),
])
def test_fit_groups_rejects_bad_input(kwargs, message):
  with pytest.raises(ValueError, match=message):
    grouping.fit_groups(**kwargs)


def test_route_and_groups_reject_bad_input():
  groups = grouping.Groups(np.eye(3), ("a", "b", "c"), False)
  with pytest.raises(ValueError, match=r"embeddings must have shape \[M, 3\]"):
    grouping.route(groups, np.ones((2, 4)))
  with pytest.raises(ValueError, match="NaN"):
    grouping.route(groups, np.array([[np.inf, 0.0, 0.0]]))
  with pytest.raises(ValueError, match="distinct"):
    grouping.Groups(np.eye(2), ("a", "a"), False)
  with pytest.raises(ValueError, match="2 strings"):
    grouping.Groups(np.eye(2), ("a",), False)
  with pytest.raises(ValueError, match="max_groups must be an integer >= 1"):
    grouping.choose_num_groups(np.eye(3), max_groups=0)

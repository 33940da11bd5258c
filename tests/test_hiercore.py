"""Tests of ccl_jax.hiercore: greedy/streaming coresets, patch features, bank, scoring."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from jax.sharding import NamedSharding, PartitionSpec

from ccl_jax import hiercore, models
from ccl_jax.models import anomaly_maps
from ccl_jax.runtime import inference
from ccl_jax.models.frozen import encode
from ccl_jax.hiercore import features as features_lib
from ccl_jax.training import fit_hiercore
from ccl_jax.hiercore.detector import HierCoreDetector


def _pairwise(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  return np.sqrt(np.maximum(np.sum((x[:, None] - x[None]) ** 2, -1), 0.0))


def _brute_force_greedy(x: np.ndarray, k: int, start: int = 0) -> list[int]:
  """Farthest-point traversal straight from the definition, on the full distance matrix."""
  distances = _pairwise(x)
  chosen = [start]
  while len(chosen) < k:
    to_set = distances[:, chosen].min(axis=1)
    to_set[chosen] = -1.0
    chosen.append(int(np.argmax(to_set)))
  return chosen


def _radius(points: np.ndarray, centres: np.ndarray) -> float:
  return hiercore.covering_radius(points, centres)


@pytest.mark.parametrize("start", [0, 17])
def test_greedy_coreset_matches_brute_force(start):
  x = np.random.default_rng(0).normal(size=(150, 6)).astype(np.float32)
  got = hiercore.greedy_coreset(x, 12, projection_dim=None, start_index=start)
  want = _brute_force_greedy(x, 12, start)
  np.testing.assert_array_equal(got, want)
  assert _radius(x, x[got]) == pytest.approx(_radius(x, x[want]))


def test_greedy_coreset_is_within_twice_the_optimum():
  x = np.random.default_rng(1).normal(size=(14, 3)).astype(np.float32)
  distances = _pairwise(x)
  optimum = min(distances[:, list(c)].min(axis=1).max()
                for c in itertools.combinations(range(len(x)), 3))
  got = hiercore.greedy_coreset(x, 3, projection_dim=None)
  assert _radius(x, x[got]) <= 2 * optimum + 1e-6


def test_greedy_coreset_projected_finds_every_cluster():
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(10, 256)) * 10.0
  x = (centres[rng.integers(0, 10, 2000)] + rng.normal(size=(2000, 256))).astype(np.float32)
  labels = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
  got = hiercore.greedy_coreset(x, 10, projection_dim=32, seed=3)
  assert sorted(labels[got]) == list(range(10))


def test_greedy_coreset_indices_distinct_with_duplicate_points():
  x = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # 4 distinct points, 3 copies each
  got = hiercore.greedy_coreset(x, 7, projection_dim=None)
  assert len(set(got.tolist())) == 7
  assert len({tuple(r) for r in x[got[:4]]}) == 4  # the first 4 picks cover every point
  with pytest.raises(ValueError, match="num_samples"):
    hiercore.greedy_coreset(x, 13)


def test_streaming_coreset_radius_within_documented_bound():
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(1800, 5)) * rng.uniform(0.2, 2.0, size=(1800, 1))).astype(np.float32)
  k, chunk = 40, 300
  stream = hiercore.StreamingCoreset(k, chunk, 5, projection_dim=None)
  for start in range(0, len(x), 130):  # chunks not aligned with the additions
    stream.add(x[start:start + 130])
  coreset = stream.result()
  assert coreset.shape == (k, 5)
  assert stream.num_reductions == len(x) // chunk
  assert _radius(coreset, x) == pytest.approx(0.0, abs=1e-5)  # coreset rows are input points
  streamed = _radius(x, coreset)
  full = _radius(x, x[hiercore.greedy_coreset(x, k, projection_dim=None)])
  assert streamed <= stream.radius_bound + 1e-4  # the data-dependent certificate
  assert stream.radius_bound <= 2 * stream.num_reductions * full  # the worst-case bound
  assert streamed > full * 0.999  # greedy on everything is what streaming approximates


def test_streaming_coreset_keeps_everything_when_it_fits():
  x = np.random.default_rng(5).normal(size=(30, 4)).astype(np.float32)
  stream = hiercore.StreamingCoreset(50, 8, 4, projection_dim=None)
  stream.add(x)
  np.testing.assert_array_equal(stream.result(), x)
  assert stream.radius_bound == 0.0


def test_streaming_coreset_traces_each_point_to_its_source():
  x = np.random.default_rng(7).normal(size=(500, 4)).astype(np.float32)
  stream = hiercore.StreamingCoreset(60, 90, 4, projection_dim=None)
  for start in range(0, len(x), 70):
    stream.add(x[start:start + 70], np.arange(start, min(start + 70, len(x))))
  coreset = stream.result()
  assert stream.num_reductions > 1 and len(set(stream.sources.tolist())) == 60
  np.testing.assert_array_equal(coreset, x[stream.sources])
  with pytest.raises(ValueError, match="one per point"):
    stream.add(x[:3], np.arange(2))


def _bank(rng, counts, size, channels):
  features = rng.normal(size=(len(counts), size, channels)).astype(np.float32)
  valid = np.arange(size)[None, :] < np.asarray(counts)[:, None]
  features[~valid] = 1e-3  # padding near the queries' origin: it must be masked out
  return hiercore.MemoryBank.create(features, np.asarray(counts, np.int32))


def test_score_matches_brute_force_numpy():
  rng = np.random.default_rng(6)
  bank = _bank(rng, [23, 9, 17], 23, 6)
  patches = rng.normal(size=(4, 5, 5, 6)).astype(np.float32) * 0.5
  group_ids = np.array([2, 0, 1, 2], np.int32)
  scored = jax.jit(lambda b, p, g: hiercore.score(b, p, g, image_size=20, memory_chunk=7))(
      bank, patches, group_ids)
  want_distances = np.stack([
      np.sqrt(((patches[i].reshape(-1, 1, 6).astype(np.float64)
                - bank.group(g)[None].astype(np.float64)) ** 2).sum(-1)).min(1).reshape(5, 5)
      for i, g in enumerate(group_ids)])
  np.testing.assert_allclose(
      hiercore.nearest_distances(bank, patches, group_ids, memory_chunk=7), want_distances,
      rtol=1e-4, atol=1e-5)
  up = anomaly_maps.upsample_matrix(5, 20)
  want_maps = np.stack([scipy.ndimage.gaussian_filter(up @ d @ up.T, sigma=4, mode="reflect")
                        for d in want_distances])
  np.testing.assert_allclose(scored["anomaly_map"], want_maps, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(scored["score"], want_maps.max(axis=(1, 2)), rtol=1e-4)


class _Records:
  """Training records: group 0 smooth blobs, group 1 high-frequency stripes."""

  def __init__(self, groups, size, seed):
    self.groups, self.size, self.seed = np.asarray(groups), size, seed

  def __len__(self):
    return len(self.groups)

  def __getitem__(self, i):
    rng = np.random.default_rng([self.seed, i])
    yy, xx = np.mgrid[:self.size, :self.size] / self.size
    if self.groups[i] == 0:
      phase = rng.uniform(0, 2 * np.pi, 3)
      image = 0.5 + 0.4 * np.sin(2 * np.pi * (xx + yy)[..., None] + phase)
    else:
      period = rng.integers(3, 5)
      image = ((np.arange(self.size)[None, :, None] // period) % 2).repeat(self.size, 0)
      image = image * rng.uniform(0.6, 1.0, 3) + rng.normal(0, 0.05, (self.size, self.size, 3))
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return {"image": image, "mask": np.zeros((self.size, self.size), np.uint8), "label": 0,
            "class_id": int(self.groups[i])}


@functools.lru_cache(maxsize=None)
def _encoder(name: str):
  """An encoder with random variables: He-normal kernels, identity BatchNorm statistics.

  Built from the shapes alone: `weights.encoder_variables(..., 'none')` runs `init` op by op,
  which takes 15-30 s per encoder on a busy 2-core machine.
  """
  encoder = models.build_encoder(name)
  shapes = jax.eval_shape(encoder.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if path[-1].key == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), jnp.float32)
    return jnp.full(leaf.shape, 1.0 if path[-1].key in ("scale", "var") else 0.0, jnp.float32)

  return encoder, jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def resnet18():
  return _encoder("resnet18")


def test_build_memory_bank_and_routing(resnet18):
  encoder, variables = resnet18
  patch_fn = hiercore.make_patch_fn(encoder, variables)
  groups = np.array([0, 1] * 7 + [1])  # interleaved: the build must regroup them
  train = _Records(groups, 48, seed=0)
  sharding = NamedSharding(inference.data_mesh(), PartitionSpec("data"))
  bank = hiercore.build_memory_bank(
      patch_fn, train, np.arange(len(groups)), groups, 2, coreset_fraction=0.25,
      chunk_images=3, global_batch_size=4, batch_sharding=sharding, progress=False)
  patches_per_image = 6 * 6
  np.testing.assert_array_equal(bank.counts, np.ceil(0.25 * np.array([7, 8]) * 36))
  all_patches = np.asarray(patch_fn(jnp.stack([train[i]["image"] for i in range(len(groups))])))
  for g in range(2):  # every coreset point is a patch of one of the group's own images
    own = all_patches[groups == g].reshape(-1, all_patches.shape[-1])
    assert _radius(bank.group(g), own) < 1e-3 * np.abs(own).max()
    assert _radius(own, bank.group(g)) > 0  # and it is a strict subset
  assert patches_per_image * 7 > bank.counts[0]

  test = _Records(np.array([0, 0, 1, 1]), 48, seed=1)
  patches = patch_fn(jnp.stack([test[i]["image"] for i in range(4)]))
  own = hiercore.score(bank, patches, jnp.array([0, 0, 1, 1]), image_size=48)["score"]
  swapped = hiercore.score(bank, patches, jnp.array([1, 1, 0, 0]), image_size=48)["score"]
  assert np.all(np.asarray(swapped) > 1.5 * np.asarray(own))


def test_build_memory_bank_rejects_an_empty_group(resnet18):
  encoder, variables = resnet18
  with pytest.raises(ValueError, match=r"Groups \[1\] have no training images"):
    hiercore.build_memory_bank(
        hiercore.make_patch_fn(encoder, variables), _Records(np.zeros(3), 48, 0), np.arange(3),
        np.zeros(3, int), 2, coreset_size=4, global_batch_size=2,
        batch_sharding=NamedSharding(inference.data_mesh(), PartitionSpec("data")))


def test_channel_pooling_is_adaptive_average_pooling():
  np.testing.assert_allclose(features_lib._channel_pooling(5, 3), np.array(
      [[.5, 0, 0], [.5, 1 / 3, 0], [0, 1 / 3, 0], [0, 1 / 3, .5], [0, 0, .5]]), rtol=1e-6)


@pytest.mark.parametrize("name,channels", [("resnet18", 128 + 256),
                                           ("efficientnet_lite0", 40 + 112)])
def test_patch_features(name, channels):
  encoder, variables = _encoder(name)
  images = jnp.asarray(np.random.default_rng(8).integers(0, 256, (2, 64, 64, 3), np.uint8))
  got = np.asarray(hiercore.make_patch_fn(encoder, variables)(images))
  assert got.shape == (2, 8, 8, channels) and got.dtype == np.float32
  layers = jax.jit(lambda v, x: encode(encoder, v, x)[1:])
  layer2, layer3 = (np.asarray(f) for f in layers(variables, images))
  fine = layer2.shape[-1]
  np.testing.assert_allclose(got[:, 3, 4, :fine], layer2[:, 2:5, 3:6].mean((1, 2)), rtol=1e-4,
                             atol=1e-5)  # interior: 3x3 mean
  np.testing.assert_allclose(got[:, 0, 0, :fine], layer2[:, :2, :2].mean((1, 2)), rtol=1e-4,
                             atol=1e-5)  # corner: mean of the in-image neighbours only
  np.testing.assert_allclose(got[:, 7, 7, fine:], layer3[:, 2:, 2:].mean((1, 2)), rtol=1e-4,
                             atol=1e-5)  # align_corners: the corners of the 4x4 map coincide
  reduced = hiercore.make_patch_fn(encoder, variables, feature_dim=16)(images)
  assert reduced.shape == (2, 8, 8, 16)
  np.testing.assert_allclose(reduced[..., :8].mean(-1), got[..., :fine].mean(-1), rtol=1e-4,
                             atol=1e-5)  # bins of equal size preserve the channel mean


def test_leave_one_out_scores_equal_banks_built_without_the_image(resnet18):
  encoder, variables = resnet18
  patch_fn = hiercore.make_patch_fn(encoder, variables)
  groups = np.array([0, 1, 0, 1, 0, 1, 0, 2])  # group 2 has one image: nothing to score it by
  train = _Records(np.minimum(groups, 1), 32, seed=2)
  sharding = NamedSharding(inference.data_mesh(), PartitionSpec("data"))

  def bank_of(indices, **kwargs):
    return hiercore.build_memory_bank(
        patch_fn, train, indices, groups[indices], 3, coreset_fraction=1.0, chunk_images=2,
        global_batch_size=4, batch_sharding=sharding, progress=False, **kwargs)

  def detector_of(bank):
    return HierCoreDetector(32, encoder, variables, bank, None)

  indices = np.arange(len(groups))
  bank, sources = bank_of(indices, with_sources=True)
  assert sources.shape == bank.features.shape[:2]
  for g in range(3):  # every point of a group's bank traced to one of its own images
    assert set(sources[g, :bank.counts[g]].tolist()) == set(np.flatnonzero(groups == g))
  scores = fit_hiercore.leave_one_out_scores(detector_of(bank), sources, train, indices, groups,
                                    global_batch_size=4, batch_sharding=sharding)
  assert np.isnan(scores[7]) and not np.isnan(scores[:7]).any()
  full = np.asarray(detector_of(bank).score(
      jnp.stack([train[i]["image"] for i in range(7)]), jnp.asarray(groups[:7])).image_scores)
  for i in (0, 3):
    others = np.delete(indices, i)
    without = detector_of(bank_of(others)).score(train[i]["image"][None],
                                                 jnp.asarray(groups[i:i + 1])).image_scores
    assert scores[i] == pytest.approx(float(without[0]), rel=1e-5)
    assert scores[i] > full[i]  # its own patches would have matched it exactly

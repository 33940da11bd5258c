"""Calibrated decisions: threshold efficiency, cross-fitted HierCore thresholds, the hold-out
floor, PatchCore's image-score reweighting and routing on look-alike classes."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax import hiercore, scenarios
from ccl_jax.decisions import thresholds
from ccl_jax.runtime import inference
from ccl_jax.datasets import selection
from ccl_jax.training import fit_hiercore
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.models.detector import Scores
from ccl_jax.results.decision_metrics import decision_metrics


def test_threshold_efficiency_is_f1_over_the_best_cut():
  scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05, 0.9])
  labels = np.array([0, 0, 1, 0, 1, 1, 0, 1])
  class_ids = np.array([0, 0, 0, 0, 0, 0, 1, 1])
  # Class a at 0.45: flags 0.5, 0.6 (TP); misses 0.3 -> F1 = 4/5. Best cut (>= 0.3):
  # TP 3, FP 1 (0.4) -> F1 = 6/7. Class b at 0.5: flags 0.9, F1 = 1 = its best.
  per_image = np.array([0.45] * 6 + [0.5, 0.5])
  support = np.array([7] * 6 + [3, 3])
  result = decision_metrics(scores, labels, per_image, class_ids, ["a", "b"],
                                       support_per_image=support)
  a, b = result["per_class"]["a"], result["per_class"]["b"]
  assert a["f1"] == pytest.approx(4 / 5) and a["f1_max"] == pytest.approx(6 / 7)
  assert a["threshold_efficiency"] == pytest.approx((4 / 5) / (6 / 7))
  assert b["threshold_efficiency"] == 1.0
  assert (a["threshold_support"], b["threshold_support"]) == (7, 3)
  assert result["mean"]["threshold_efficiency"] == pytest.approx(((4 / 5) / (6 / 7) + 1) / 2)
  # A threshold below every normal score flags them all: efficiency falls with F1.
  low = decision_metrics(scores, labels, np.zeros(8), class_ids, ["a", "b"])
  assert low["per_class"]["a"]["threshold_efficiency"] == pytest.approx((6 / 9) / (6 / 7))


def test_threshold_efficiency_of_one_label_classes():
  scores = np.array([0.1, 0.7, 0.2, 0.9])
  labels = np.array([0, 0, 1, 1])
  result = decision_metrics(scores, labels, np.full(4, 0.5), np.array([0, 0, 1, 1]),
                                       ["normals", "defects"])
  normals, defects = result["per_class"]["normals"], result["per_class"]["defects"]
  # Nothing to find among normals only: undefined like F1, and said why.
  assert math.isnan(normals["threshold_efficiency"]) and math.isnan(normals["f1_max"])
  assert "threshold_efficiency" in result["skipped"]["normals"]
  # Defects only: flagging all is the best cut, so the efficiency is the F1.
  assert defects["f1_max"] == 1.0
  assert defects["threshold_efficiency"] == pytest.approx(2 / 3)
  assert result["mean"]["threshold_efficiency"] == pytest.approx(2 / 3)


def test_lognormal_rule_meets_alpha_on_average_at_small_n():
  rng = np.random.default_rng(3)
  draws = np.exp(rng.normal(1.0, 0.4, size=(4000, 7)))
  exceeded = [draws[i, 6] > thresholds.threshold_from_normal_scores(
      draws[i, :6], rule="lognormal", alpha=0.1) for i in range(4000)]
  # Exact for Gaussian log scores: 0.1 +- 3 binomial standard errors.
  assert abs(np.mean(exceeded) - 0.1) < 3 * np.sqrt(0.1 * 0.9 / 4000)
  # The max of 6 scores, the quantile rule's answer at n = 6, is exceeded 1/7 of the time.
  assert np.mean(draws[:, 6] > draws[:, :6].max(axis=1)) == pytest.approx(1 / 7, abs=0.02)
  with pytest.raises(ValueError, match="needs positive scores"):
    thresholds.threshold_from_normal_scores(np.array([0.5, -0.1]), rule="lognormal")


def test_holdout_floor_keeps_at_least_min_images_per_class():
  class_ids = np.repeat([0, 1, 2], [60, 10, 3])
  _, plain = selection.holdout_split(class_ids, 0.05, seed=0)
  _, floored = selection.holdout_split(class_ids, 0.05, seed=0, min_images=20)
  assert np.bincount(class_ids[plain], minlength=3).tolist() == [3, 1, 0]
  # The floor, capped so that one image per class stays for training.
  assert np.bincount(class_ids[floored], minlength=3).tolist() == [20, 9, 2]
  with pytest.raises(ValueError, match="min_images must be >= 0"):
    selection.holdout_split(class_ids, 0.05, seed=0, min_images=-1)


@pytest.mark.parametrize("split", ["random", "clusters"])
def test_folds_leave_every_group_in_every_bank(split):
  rng = np.random.default_rng(0)
  group_ids = np.repeat([0, 1, 2], [12, 3, 1])
  # Group 0 is two far-apart blobs: clusters must not mix them.
  embeddings = rng.normal(size=(16, 4))
  embeddings[:6, 0] += 50
  folds = fit_hiercore.assign_folds(embeddings, group_ids, 5, split=split, seed=0)
  assert folds[15] == -1  # a group's only image is never held out
  for g, k in ((0, 5), (1, 3)):
    members = folds[group_ids == g]
    assert set(members) == set(range(k))
  if split == "random":
    assert np.bincount(folds[:12]).tolist() == [3, 3, 2, 2, 2]
  else:
    assert not set(folds[:6]) & set(folds[6:12])
  with pytest.raises(ValueError, match="split must be"):
    fit_hiercore.assign_folds(embeddings, group_ids, 5, split="blocks", seed=0)


class _PixelNeighbours:
  """A stand-in detector whose 'bank' is a set of training images: the score is the mean
  absolute pixel difference to the nearest of them, so an image inside the bank scores 0."""

  def __init__(self, images):
    self.images = jnp.asarray(images, jnp.float32)

  def score(self, images, group_ids):
    del group_ids
    gaps = jnp.mean(jnp.abs(images.astype(jnp.float32)[:, None] - self.images[None]),
                    axis=(2, 3, 4))
    return Scores(jnp.zeros(images.shape[:3]), jnp.min(gaps, axis=1))


def test_cross_fitted_scores_come_from_banks_without_the_image():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(11, 8, 8, 3), dtype=np.uint8)
  source = [{"image": im, "mask": np.zeros((8, 8), np.uint8), "label": 0, "class_id": 0}
            for im in images]
  indices = np.arange(11)
  group_ids = np.zeros(11, np.int64)
  folds = fit_hiercore.assign_folds(np.zeros((11, 2)), group_ids, 4, split="random", seed=0)
  built = []

  def bank_of(bank_indices, bank_groups):
    built.append(set(bank_indices.tolist()))
    assert np.array_equal(bank_groups, group_ids[bank_indices])
    return images[bank_indices]

  scores = fit_hiercore.cross_fitted_scores(bank_of, _PixelNeighbours, source, indices, group_ids,
                                   folds, global_batch_size=4,
                                   batch_sharding=inference.batch_sharding())
  assert len(built) == 4 and all(len(b) in (8, 9) for b in built)
  flat = images.reshape(11, -1).astype(np.float64)
  for i in range(11):
    others = flat[folds != folds[i]]
    assert scores[i] == pytest.approx(np.abs(others - flat[i]).mean(axis=1).min(), rel=1e-5)
  assert np.all(scores > 0)


def test_reweighting_matches_patchcore_eq7_by_hand():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(2, 9, 5)).astype(np.float32)
  counts = np.array([9, 4], np.int32)
  bank = hiercore.MemoryBank.create(features, counts)
  patches = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
  group_ids = np.array([0, 1, 0])
  neighbours = 6  # more than group 1 holds: its missing points drop out of the sum
  out = jax.jit(lambda b, p, g: hiercore.score(b, p, g, image_size=8, memory_chunk=4,
                                               reweight_neighbours=neighbours))(
      bank, jnp.asarray(patches), jnp.asarray(group_ids))
  plain = hiercore.score(bank, jnp.asarray(patches), jnp.asarray(group_ids), image_size=8)
  for b in range(3):
    memory = features[group_ids[b], :counts[group_ids[b]]]
    queries = patches[b].reshape(4, 5)
    gaps = np.linalg.norm(queries[:, None] - memory[None], axis=-1)
    worst = np.argmax(gaps.min(axis=1))
    nearest = memory[np.argmin(gaps[worst])]
    support = np.argsort(np.linalg.norm(memory - nearest, axis=-1))[:neighbours]
    to_support = np.linalg.norm(memory[support] - queries[worst], axis=-1)
    weight = 1 - np.exp(to_support[0]) / np.exp(to_support).sum()
    assert float(out["score"][b]) == pytest.approx(weight * float(plain["score"][b]),
                                                   rel=1e-4)
  np.testing.assert_allclose(out["anomaly_map"], plain["anomaly_map"], rtol=1e-6)


@pytest.mark.parametrize("fold_split", ["leave_one_out", "clusters"])
def test_cross_fitted_hiercore_run_uses_every_training_image(smoke_settings, tmp_path,
                                                             fold_split):
  run_settings = smoke_settings(**{"model.kind": "hiercore", "validation_fraction": 0.25,
                                   "num_heatmaps_per_class": 0,
                                   "hiercore.threshold_folds": 3,
                                   "hiercore.fold_split": fold_split})
  from ccl_jax.training import runner  # pylint: disable=import-outside-toplevel
  runner.run(run_settings, str(tmp_path))
  run_dir = RunDir(str(tmp_path))
  _, estimated, meta = run_dir.read_decision()
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=True)
  per_class = np.bincount(dataset.train_class_ids).tolist()
  assert meta["threshold_source"] == "cross_fit" and meta["fold_split"] == fold_split
  assert meta["threshold_folds"] == (None if fold_split == "leave_one_out" else 3)
  assert list(estimated.num_normal) == per_class  # no hold-out: every image scored
  bank = run_dir.read_memory_bank()
  patches = (run_settings.image_size // 8) ** 2
  fraction = run_settings.hiercore.coreset_fraction
  assert bank.counts.tolist() == [int(np.ceil(fraction * n * patches)) for n in per_class]
  with open(os.path.join(run_dir.path, "metrics.json")) as f:
    saved = json.load(f)
  for row in saved["classwise"]["per_class"].values():
    assert 0.0 <= row["threshold_efficiency"] <= 1.0
    assert row["threshold_support"] in per_class
  assert saved["classwise"]["alpha"] == 0.05
  with open(os.path.join(run_dir.path, "results.md")) as f:
    assert "FAR (class-wise)" in f.read()


def test_scenarios_measure_routing_on_look_alike_classes(smoke_settings, tmp_path):
  from data_prep import photo_parts  # pylint: disable=import-outside-toplevel
  classes = photo_parts.write_photo_parts(tmp_path / "lookalike", photo_set="lookalike",
                                          train=8, test_good=3, test_defective=3, size=32)
  run_settings = smoke_settings(**{
      "model.kind": "hiercore", "dataset.name": "folder",
      "dataset.manual_dir": str(tmp_path / "lookalike"), "dataset.classes": "all",
      "dataset.data_dir": str(tmp_path / "prepared"), "hiercore.threshold_folds": 2,
      "decision.num_groups": 4, "num_heatmaps_per_class": 0})
  rows = scenarios.run_scenarios(run_settings, str(tmp_path / "runs"))
  labelled = rows["labels_at_training/labels_at_evaluation"]["routing"]
  assert labelled["v_measure"] == 1.0 and labelled["accuracy"] == 1.0
  # Without labels, two photographs at two scales are not told apart perfectly.
  routed = rows["no_labels_at_training/no_labels_at_evaluation"]["routing"]
  assert 0.0 <= routed["v_measure"] < 1.0 and routed["num_groups"] == 4
  assert set(rows["no_labels_at_training/no_labels_at_evaluation"]["classwise"]["per_class"]) \
      == set(classes)

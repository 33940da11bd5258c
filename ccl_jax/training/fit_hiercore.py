"""Fitting a HierCore run: groups, per-group patch coresets, thresholds and evaluation.

No training: the frozen encoder's patch features of the training images are grouped (by
class label, or by clustering the routing embeddings without labels), each group's are
reduced to a coreset, and the run ends like every other (`decide.fit_and_evaluate`).
Writes memory_bank.npz, decision.json, metrics.json, results.md and heatmaps/.

Thresholds by cross-fitting (`hiercore.threshold_folds` >= 2, the default): every training
image gets a normal score from a bank that does not hold it, and the final bank holds all of
them (no hold-out). `hiercore.fold_split`:
* 'leave_one_out' (default): each image is scored by the final bank without the coreset
  points that came from the image itself (`build_memory_bank(with_sources=True)`), so one
  bank and one scoring pass serve all images (the jackknife; exact when the coreset keeps
  every patch, `coreset_fraction` 1). On parts that are separate objects, as on a production
  line, these scores are distributed as new parts' are;
* 'random' / 'clusters': the images are dealt to K = `threshold_folds` folds and a bank of
  the other K-1 folds scores each fold (K + 1 banks). 'clusters' deals by k-means of the
  routing embeddings, so a fold is a set of images alike among themselves and unlike its
  bank: for training images that overlap one another (crops of one surface,
  near-duplicates), where an image would find its own content in the others' patches and its
  score would be too low; its scores err high instead (docs/thresholds.md measures both).
K <= 1 keeps the validation hold-out (`validation_fraction`) for the thresholds.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from sklearn.cluster import KMeans

from ccl_jax.evaluation import decide
from ccl_jax.results import writing
from ccl_jax.runtime import inference
from ccl_jax.hiercore.memory_bank import Excluded, build_memory_bank
from ccl_jax.hiercore.features import make_patch_fn
from ccl_jax.config.settings import RunSettings
from ccl_jax.hiercore.detector import HierCoreDetector, hiercore_detector
from ccl_jax.models.detector import Router
from ccl_jax.training import setup


def fit(run_settings: RunSettings, workdir: str) -> dict[str, Any]:
  """Builds the memory bank of `run_settings` in `workdir` and evaluates it."""
  start = setup.start_run(run_settings, workdir)
  run_dir, is_main, dataset = start.run_dir, start.is_main, start.dataset
  encoder, encoder_variables = start.encoder, start.encoder_variables
  batch_sharding = start.batch_sharding
  global_batch_size = run_settings.global_eval_batch_size
  hiercore_settings = run_settings.hiercore
  train_indices, holdout_indices = start.train_indices, start.holdout_indices
  if hiercore_settings.cross_fitted:
    train_indices = np.sort(np.concatenate([train_indices, holdout_indices]))
    holdout_indices = holdout_indices[:0]
  if is_main:
    run_dir.write_settings(run_settings)

  labels_at_training = run_settings.dataset.labels_at_training
  embeddings = decide.routing_embeddings(
      Router(encoder, encoder_variables), dataset.train, train_indices,
      global_batch_size=global_batch_size, batch_sharding=batch_sharding)
  train_class_ids = dataset.train_class_ids[train_indices] if labels_at_training else None
  groups = decide.fit_training_groups(
      embeddings, train_class_ids, dataset.class_names,
      num_groups=run_settings.decision.num_groups,
      max_groups=run_settings.decision.max_groups, seed=run_settings.seed)
  train_groups = decide.evaluation_groups(groups, embeddings, train_class_ids,
                                             dataset.class_names)
  logging.info("HierCore: %d groups (%s).", groups.num_groups,
               "class labels" if groups.from_labels else "clusters")
  patch_fn = make_patch_fn(encoder, encoder_variables,
                           feature_dim=hiercore_settings.feature_dim or None)

  def bank_of(indices, group_ids, with_sources=False):
    return build_memory_bank(
        patch_fn, dataset.train, indices, group_ids, groups.num_groups,
        coreset_fraction=hiercore_settings.coreset_fraction,
        chunk_images=hiercore_settings.chunk_images, global_batch_size=global_batch_size,
        batch_sharding=batch_sharding, projection_dim=hiercore_settings.projection_dim or None,
        seed=run_settings.seed, worker_count=run_settings.worker_count, progress=is_main,
        with_sources=with_sources)

  def detector_of(bank):
    return hiercore_detector(run_settings, bank, encoder, encoder_variables)

  leave_one_out = (hiercore_settings.cross_fitted
                   and hiercore_settings.fold_split == "leave_one_out")
  started = time.perf_counter()
  built = bank_of(train_indices, train_groups, with_sources=leave_one_out)
  build_seconds = time.perf_counter() - started
  bank, bank_sources = built if leave_one_out else (built, None)
  if is_main:
    run_dir.write_memory_bank(bank)
  fitted = None
  if hiercore_settings.cross_fitted:
    if leave_one_out:
      scores = leave_one_out_scores(detector_of(bank), bank_sources, dataset.train,
                                    train_indices, train_groups,
                                    global_batch_size=global_batch_size,
                                    batch_sharding=batch_sharding)
    else:
      folds = assign_folds(embeddings, train_groups, hiercore_settings.threshold_folds,
                           split=hiercore_settings.fold_split, seed=run_settings.seed)
      scores = cross_fitted_scores(bank_of, detector_of, dataset.train, train_indices,
                                   train_groups, folds, global_batch_size=global_batch_size,
                                   batch_sharding=batch_sharding)
    scored = ~np.isnan(scores)
    fitted = (decide.thresholds_of_scores(scores[scored], train_groups[scored],
                                             groups.num_groups, run_settings.decision),
              {"labels_at_training": labels_at_training, "threshold_source": "cross_fit",
               "threshold_folds": (None if leave_one_out
                                   else hiercore_settings.threshold_folds),
               "fold_split": hiercore_settings.fold_split,
               "num_holdout_images": 0, "num_cross_fitted_images": int(scored.sum()),
               "embedding_dim": int(groups.centroids.shape[1])})
  result, outputs = decide.fit_and_evaluate(
      detector_of(bank), run_settings, run_dir, dataset, train_indices, holdout_indices,
      batch_sharding=batch_sharding, groups=groups, fitted=fitted)
  result["memory_bank"] = {"patches_per_group": bank.counts.tolist(),
                           "mib": bank.nbytes / 2**20, "build_seconds": build_seconds}
  if is_main:
    writing.write_results(run_dir, result, dataset, outputs, run_settings)
  return result


def assign_folds(embeddings: np.ndarray, group_ids: np.ndarray, num_folds: int, *,
                 split: str, seed: int) -> np.ndarray:
  """Fold [N] of each training image: in [0, k_g) with k_g = min(num_folds, n_g) for a
  group of n_g >= 2 images, -1 for the only image of a group (never held out: its group's
  bank would be empty). Every fold leaves images of each group in its bank.

  split: 'random' (an even deal per group) or 'clusters' (k-means of the routing
  embeddings [N, D] per group; see the module docstring).
  """
  if split not in ("random", "clusters"):
    raise ValueError(f"split must be 'random' or 'clusters', got {split!r}.")
  if num_folds < 2:
    raise ValueError(f"num_folds must be >= 2, got {num_folds}.")
  group_ids = np.asarray(group_ids)
  folds = np.full(group_ids.shape, -1, np.int64)
  for g in np.unique(group_ids):
    members = np.flatnonzero(group_ids == g)
    k = min(num_folds, members.size)
    if k < 2:
      continue
    if split == "random":
      order = np.random.default_rng([seed, int(g)]).permutation(members.size)
      folds[members[order]] = np.arange(members.size) % k
    else:
      folds[members] = KMeans(k, n_init=10, random_state=seed).fit_predict(
          np.asarray(embeddings, np.float64)[members])
  return folds


def leave_one_out_scores(detector: HierCoreDetector, bank_sources: np.ndarray,
                         source, indices: np.ndarray, group_ids: np.ndarray, *,
                         global_batch_size: int, batch_sharding) -> np.ndarray:
  """Image scores [N] of `source[indices]`, each against its group's bank without the
  points that came from the image itself (`bank_sources`, positions in `indices`); NaN
  for the only image of a group (its bank would be empty)."""
  bank_sources = jax.device_put(np.asarray(bank_sources, np.int32),
                                inference.replicated_sharding())

  def score(images, group_id, image_source):
    excluded = Excluded(bank_sources, image_source)
    return {"score": detector.score_leaving_out(images, group_id, excluded).image_scores}

  scores = inference.run_inference(
      score, source, indices, outputs=("score",),
      per_image_inputs={"group_id": group_ids,
                        "image_source": np.arange(indices.size, dtype=np.int32)},
      global_batch_size=global_batch_size, batch_sharding=batch_sharding)["score"]
  scores = scores.astype(np.float64)
  scores[np.bincount(group_ids)[group_ids] < 2] = np.nan
  return scores


def cross_fitted_scores(bank_of: Callable, detector_of: Callable, source,
                        indices: np.ndarray, group_ids: np.ndarray, folds: np.ndarray, *,
                        global_batch_size: int, batch_sharding) -> np.ndarray:
  """Out-of-bank image scores [N] of `source[indices]`: fold k's images scored by
  `detector_of(bank_of(other indices, their groups))` in their groups; images of fold -1
  get NaN (not scored)."""
  scores = np.full(indices.size, np.nan)
  for k in range(int(folds.max()) + 1):
    held = folds == k
    if not held.any():
      continue
    detector = detector_of(bank_of(indices[~held], group_ids[~held]))
    scores[held] = inference.run_inference(
        decide.score_fn(detector), source, indices[held], outputs=("score",),
        per_image_inputs={"group_id": group_ids[held]}, global_batch_size=global_batch_size,
        batch_sharding=batch_sharding)["score"]
  return scores

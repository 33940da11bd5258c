"""Fitting a HierCore run: groups, per-group patch coresets, thresholds and evaluation.

No training: the frozen encoder's patch features of the training images are grouped (by
class label, or by clustering the routing embeddings without labels), each group's are
reduced to a coreset, and the run ends like every other (`decisions.fit_and_evaluate`).
Writes memory_bank.npz, decision.json, metrics.json, results.md and heatmaps/.
"""
from __future__ import annotations

import time
from typing import Any

import jax
from absl import logging

from ccl_jax import decisions, detectors, inference
from ccl_jax.datasets import selection
from ccl_jax.hiercore.memory_bank import build_memory_bank
from ccl_jax.hiercore.features import make_patch_fn
from ccl_jax.run_dir import RunDir
from ccl_jax.settings import RunSettings


def fit(run_settings: RunSettings, workdir: str) -> dict[str, Any]:
  """Builds the memory bank of `run_settings` in `workdir` and evaluates it."""
  run_dir = RunDir(workdir)
  is_main = jax.process_index() == 0
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=is_main)
  train_indices, holdout_indices = selection.training_split(run_settings, dataset)
  replicated = inference.replicated_sharding()
  batch_sharding = inference.batch_sharding()
  global_batch_size = run_settings.global_eval_batch_size
  encoder, encoder_variables = detectors.frozen_encoder(run_settings, replicated)
  if is_main:
    run_dir.write_settings(run_settings)

  labels_at_training = run_settings.dataset.labels_at_training
  embeddings = decisions.embeddings_of(
      detectors.Router(encoder, encoder_variables), dataset.train, train_indices,
      global_batch_size=global_batch_size, batch_sharding=batch_sharding)
  train_class_ids = dataset.train_class_ids[train_indices] if labels_at_training else None
  groups = decisions.fit_training_groups(
      embeddings, train_class_ids, dataset.class_names,
      num_groups=run_settings.decision.num_groups,
      max_groups=run_settings.decision.max_groups, seed=run_settings.seed)
  train_groups = decisions.evaluation_groups(groups, embeddings, train_class_ids,
                                             dataset.class_names)
  logging.info("HierCore: %d groups (%s).", groups.num_groups,
               "class labels" if groups.from_labels else "clusters")
  hiercore_settings = run_settings.hiercore
  started = time.perf_counter()
  bank = build_memory_bank(
      make_patch_fn(encoder, encoder_variables,
                    feature_dim=hiercore_settings.feature_dim or None),
      dataset.train, train_indices, train_groups, groups.num_groups,
      coreset_fraction=hiercore_settings.coreset_fraction,
      chunk_images=hiercore_settings.chunk_images, global_batch_size=global_batch_size,
      batch_sharding=batch_sharding, projection_dim=hiercore_settings.projection_dim or None,
      seed=run_settings.seed, worker_count=run_settings.worker_count, progress=is_main)
  build_seconds = time.perf_counter() - started
  if is_main:
    run_dir.write_memory_bank(bank)
  detector = detectors.hiercore_detector(run_settings, bank, encoder, encoder_variables)
  result, outputs = decisions.fit_and_evaluate(
      detector, run_settings, run_dir, dataset, train_indices, holdout_indices,
      batch_sharding=batch_sharding, groups=groups)
  result["memory_bank"] = {"patches_per_group": bank.counts.tolist(),
                           "mib": bank.nbytes / 2**20, "build_seconds": build_seconds}
  if is_main:
    decisions.write_results(run_dir, result, dataset, outputs, run_settings)
  return result

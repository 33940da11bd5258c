"""Per-image decisions for every model (CCL, RD, HierCore), and the four label scenarios.

A model scores images; a deployment needs "anomalous or not". The decision layer is the
same for every model (HierCore abstract: class-wise decision criteria without labels):

1. Groups (`ccl_jax.decisions.grouping`): the training images' routing embeddings (the frozen
   encoder's pooled deepest map, `Detector.embed`) grouped by class label when labels exist at
   training time, otherwise by clustering with an automatic number of groups.
2. Thresholds (`ccl_jax.decisions.thresholds`): one per group, from the scores of NORMAL held-out
   training images only (the validation hold-out, never seen by training or by the memory
   bank), plus a class-agnostic one from all of them pooled.
3. At evaluation, each image goes to a group:
   - labels at evaluation, groups from labels: its class's group;
   - labels at evaluation, groups from clustering: the given label cannot name a cluster,
     so it is used to keep a class together: every image of class c goes to the group that
     most of class c's images are routed to (ties: lower group index). This uses the class
     labels of the evaluated images, never their anomaly labels;
   - no labels at evaluation: the nearest group (`grouping.route`).
   The group's threshold then decides: anomalous iff score > threshold.

The four scenarios are (labels at training) x (labels at evaluation); `python -m
ccl_jax.scenarios` runs them. Every model is a `ccl_jax.models.detector.Detector`; for CCL/RD the
group is ignored (their maps do not depend on it), for HierCore it picks the coreset.

`fit_and_evaluate` is what every run ends with: groups and thresholds (decision.json), then the
test-set metrics and decisions (`ccl_jax.results.writing` writes them).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import sklearn.metrics
from absl import logging

from ccl_jax.decisions import grouping, thresholds
from ccl_jax.evaluation import streaming
from ccl_jax.runtime import inference
from ccl_jax.results import writing
from ccl_jax.models.detector import Detector, Router
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.config.settings import DecisionSettings, RunSettings
from ccl_jax.results.decision_metrics import decision_metrics


def routing_embeddings(router: Router, source, indices: np.ndarray, *, global_batch_size: int,
                  batch_sharding) -> np.ndarray:
  """Routing embeddings [N, D] of `source[indices]` (the same for every model)."""
  return inference.run_inference(
      lambda images: {"embedding": router.embed(images)}, source, indices,
      outputs=("embedding",), global_batch_size=global_batch_size,
      batch_sharding=batch_sharding)["embedding"]


def score_fn(detector: Detector):
  """`detector.score` with named outputs, for `inference.run_inference`."""
  def score(images, group_id):
    scores = detector.score(images, group_id)
    return {"anomaly_map": scores.anomaly_maps, "score": scores.image_scores}
  return score


def one_group(dataset) -> np.ndarray:
  """Every test image in group 0: the group ids of an evaluation without decisions (a CCL /
  RD map does not depend on its group)."""
  return np.zeros(len(dataset.test), np.int32)


def evaluate_test_set(detector: Detector, dataset, group_ids: np.ndarray, *,
                      global_batch_size: int, batch_sharding, worker_count: int = 0,
                      heatmaps_per_class: int | None = None,
                      image_thresholds: np.ndarray | None = None
                      ) -> tuple[dict, dict[str, Any]]:
  """Threshold-free metrics per class and mean over the whole test split (each image in
  group `group_ids[i]`), and the per-image outputs 'score' and 'label'.

  The split is scored class by class (`ccl_jax.evaluation.streaming`): no class's anomaly maps
  outlive its metrics, except the few the figures show. `heatmaps_per_class` None: no
  figures will be drawn from this evaluation; otherwise outputs['views'] holds the maps of
  the images `heatmap_figures` (that many per class) and `report.gallery` show, the gallery
  ordered by `image_thresholds` (each image's; None: its class's median score).
  """
  keep_rows = None
  if heatmaps_per_class is not None:
    keep_rows = functools.partial(writing.figure_rows, heatmaps_per_class=heatmaps_per_class,
                                  image_thresholds=image_thresholds)
  summary, outputs, views = streaming.score_test_split(
      score_fn(detector), dataset, group_ids, global_batch_size=global_batch_size,
      batch_sharding=batch_sharding, worker_count=worker_count, keep_rows=keep_rows)
  if views is not None:
    outputs["views"] = views
  if any("/" in name for name in dataset.class_names):  # a mixture: 'dataset/class'
    summary["per_dataset"] = per_dataset_means(summary["per_class"])
  return summary, outputs


def per_dataset_means(per_class: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
  """Mean of each metric over the classes of each dataset ('dataset/class' names)."""
  groups: dict[str, list[dict[str, float]]] = {}
  for name, row in per_class.items():
    groups.setdefault(name.split("/")[0], []).append(row)
  return {prefix: {key: float(np.nanmean([row[key] for row in rows])) for key in rows[0]}
          for prefix, rows in groups.items()}

def evaluation_groups(groups: grouping.Groups, embeddings: np.ndarray,
                      class_ids: np.ndarray | None, class_names: Sequence[str]) -> np.ndarray:
  """Group of each evaluated image; `class_ids` None means no labels at evaluation."""
  if class_ids is None:
    return grouping.route(groups, embeddings)
  class_ids = np.asarray(class_ids)
  if groups.from_labels:
    return np.array([groups.index_of(class_names[c]) for c in class_ids], np.int32)
  routed = grouping.route(groups, embeddings)
  assigned = np.empty_like(routed)
  for c in np.unique(class_ids):
    rows = class_ids == c
    assigned[rows] = np.argmax(np.bincount(routed[rows], minlength=groups.num_groups))
  return assigned


def holdout_thresholds(detector: Detector, source, holdout_indices: np.ndarray,
                        holdout_groups: np.ndarray, num_groups: int, *,
                        decision: DecisionSettings, global_batch_size: int,
                        batch_sharding) -> thresholds.Thresholds:
  """Thresholds from the scores of the normal held-out images in their groups."""
  if len(holdout_indices) == 0:
    raise ValueError("No held-out normal training images to estimate thresholds from; set "
                     "validation_fraction > 0.")
  scores = inference.run_inference(
      score_fn(detector), source, holdout_indices, outputs=("score",),
      per_image_inputs={"group_id": holdout_groups}, global_batch_size=global_batch_size,
      batch_sharding=batch_sharding)["score"]
  return thresholds.estimate_thresholds(scores, holdout_groups, num_groups, rule=decision.rule,
                                        **decision.rule_kwargs)


def fit_decision(detector: Detector, dataset, train_indices: np.ndarray,
                 holdout_indices: np.ndarray, *, labels_at_training: bool,
                 decision: DecisionSettings, seed: int, global_batch_size: int, batch_sharding,
                 groups: grouping.Groups | None = None
                 ) -> tuple[grouping.Groups, thresholds.Thresholds, dict[str, Any]]:
  """Groups (unless given, as HierCore fits them before its memory bank) and thresholds.

  Returns the groups, the thresholds and a meta dict for decision.json.
  """
  embed = functools.partial(routing_embeddings, detector, dataset.train,
                            global_batch_size=global_batch_size, batch_sharding=batch_sharding)
  if groups is None:
    groups = fit_training_groups(
        embed(train_indices), dataset.train_class_ids[train_indices] if labels_at_training
        else None, dataset.class_names, num_groups=decision.num_groups,
        max_groups=decision.max_groups, seed=seed)
  holdout_class_ids = dataset.train_class_ids[holdout_indices] if labels_at_training else None
  holdout_groups = evaluation_groups(groups, embed(holdout_indices), holdout_class_ids,
                                     dataset.class_names)
  estimated = holdout_thresholds(
      detector, dataset.train, holdout_indices, holdout_groups, groups.num_groups,
      decision=decision, global_batch_size=global_batch_size, batch_sharding=batch_sharding)
  meta = {"labels_at_training": labels_at_training, "threshold_source": "holdout",
          "num_holdout_images": int(len(holdout_indices)),
          "embedding_dim": int(groups.centroids.shape[1])}
  return groups, estimated, meta


def thresholds_of_scores(normal_scores: np.ndarray, group_ids: np.ndarray, num_groups: int,
                         decision: DecisionSettings) -> thresholds.Thresholds:
  """Thresholds from out-of-model normal scores computed elsewhere (HierCore's cross-fit)."""
  return thresholds.estimate_thresholds(normal_scores, group_ids, num_groups,
                                        rule=decision.rule, **decision.rule_kwargs)


def fit_training_groups(embeddings: np.ndarray, class_ids: np.ndarray | None,
                        class_names: Sequence[str], *, num_groups: int | None,
                        max_groups: int, seed: int) -> grouping.Groups:
  """Groups of the training images: their classes, or clusters when `class_ids` is None."""
  if class_ids is not None:
    groups, _ = grouping.fit_groups(embeddings, labels=class_ids, class_names=class_names)
  else:
    groups, _ = grouping.fit_groups(embeddings, num_groups=num_groups or None,
                                    max_groups=max_groups, seed=seed)
  return groups


def evaluate_decisions(detector: Detector, dataset, groups: grouping.Groups,
                       estimated: thresholds.Thresholds, *, labels_at_evaluation: bool,
                       global_batch_size: int, batch_sharding,
                       heatmaps_per_class: int | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Threshold-free metrics and decisions (class-wise and agnostic) on the test split.

  Returns the result dict and the per-image outputs (incl. 'group_id'; 'views' as
  `evaluate_test_set` with `heatmaps_per_class`).
  """
  indices = np.arange(len(dataset.test))
  if not len(indices):
    # Nothing to decide on: the thresholds (decision.json) still serve predict.
    summary, outputs = evaluate_test_set(detector, dataset, np.zeros(0, np.int32),
                                         global_batch_size=global_batch_size,
                                         batch_sharding=batch_sharding,
                                         heatmaps_per_class=heatmaps_per_class)
    outputs["group_id"] = np.zeros(0, np.int32)
    return {"metrics": summary}, outputs
  embeddings = routing_embeddings(detector, dataset.test, indices,
                             global_batch_size=global_batch_size,
                             batch_sharding=batch_sharding)
  group_ids = evaluation_groups(
      groups, embeddings, dataset.test_class_ids if labels_at_evaluation else None,
      dataset.class_names)
  # The thresholds each image is decided at, for report.html.
  per_image = estimated.per_image(group_ids)
  summary, outputs = evaluate_test_set(detector, dataset, group_ids,
                                       global_batch_size=global_batch_size,
                                       batch_sharding=batch_sharding,
                                       heatmaps_per_class=heatmaps_per_class,
                                       image_thresholds=per_image)
  outputs["group_id"] = group_ids
  outputs["threshold"] = per_image
  outputs["agnostic_threshold"] = np.full(len(group_ids), estimated.agnostic)
  scores, labels = outputs["score"], outputs["label"]
  decide = functools.partial(decision_metrics, scores, labels,
                             class_ids=dataset.test_class_ids, class_names=dataset.class_names)
  support = (np.asarray(estimated.num_normal)[group_ids] if estimated.num_normal else None)
  pooled = int(sum(estimated.num_normal)) if estimated.num_normal else None
  nominal = {"alpha": estimated.params.get("alpha")}
  result = {
      "metrics": summary,
      "classwise": dict(decide(outputs["threshold"], support_per_image=support), **nominal),
      "agnostic": dict(decide(outputs["agnostic_threshold"],
                              support_per_image=None if pooled is None
                              else np.full(len(scores), pooled)), **nominal),
      "routing": routing_quality(groups, group_ids, dataset.test_class_ids,
                                 dataset.class_names),
  }
  return result, outputs


def fit_and_evaluate(detector: Detector, run_settings: RunSettings, run_dir: RunDir, dataset,
                     train_indices: np.ndarray, holdout_indices: np.ndarray, *, batch_sharding,
                     groups: grouping.Groups | None = None,
                     fitted: tuple[thresholds.Thresholds, dict[str, Any]] | None = None
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Groups and class-wise thresholds (decision.json), then the test-set evaluation with
  threshold-free metrics and decisions (evaluation labels as at training).

  `fitted`: thresholds and their decision.json meta estimated elsewhere (with `groups`);
  then `holdout_indices` is not used.
  """
  labels_at_training = run_settings.dataset.labels_at_training
  global_batch_size = run_settings.global_eval_batch_size
  if fitted is not None:
    if groups is None:
      raise ValueError("fitted thresholds need the groups they were estimated in.")
    estimated, decision_meta = fitted
  elif not len(holdout_indices):
    logging.warning("validation_fraction=0: no held-out normal images, so no thresholds and "
                    "no decision.json; `python -m ccl_jax.predict` needs them.")
    summary, outputs = evaluate_test_set(
        detector, dataset, one_group(dataset),
        global_batch_size=global_batch_size, batch_sharding=batch_sharding,
        worker_count=run_settings.worker_count,
        heatmaps_per_class=run_settings.num_heatmaps_per_class)
    return {"metrics": summary, "classes": list(dataset.class_names)}, outputs
  else:
    groups, estimated, decision_meta = fit_decision(
        detector, dataset, train_indices, holdout_indices,
        labels_at_training=labels_at_training, decision=run_settings.decision,
        seed=run_settings.seed, global_batch_size=global_batch_size,
        batch_sharding=batch_sharding, groups=groups)
  if jax.process_index() == 0:
    run_dir.write_decision(groups, estimated, dict(decision_meta, model=detector.name))
  result, outputs = evaluate_decisions(
      detector, dataset, groups, estimated, labels_at_evaluation=labels_at_training,
      global_batch_size=global_batch_size, batch_sharding=batch_sharding,
      heatmaps_per_class=run_settings.num_heatmaps_per_class)
  result["classes"] = list(dataset.class_names)
  return result, outputs


def routing_quality(groups: grouping.Groups, group_ids: np.ndarray, class_ids: np.ndarray,
                    class_names: Sequence[str]) -> dict[str, float]:
  """How well groups match the true classes: V-measure always, accuracy for label groups."""
  quality = {"v_measure": float(sklearn.metrics.v_measure_score(class_ids, group_ids)),
             "num_groups": groups.num_groups}
  if groups.from_labels:
    true_groups = np.array([groups.index_of(class_names[c]) for c in class_ids])
    quality["accuracy"] = float(np.mean(true_groups == group_ids))
  return quality

"""Per-image decisions for every model (CCL, RD, HierCore), and the four label scenarios.

A model scores images; a deployment needs "anomalous or not". The decision layer is the
same for every model (HierCore abstract, /work/shared/papers/hiercore_abstract.txt):

1. Groups (`ccl_jax.grouping`): the training images' routing embeddings (the frozen
   encoder's pooled deepest map, `step.embed`) grouped by class label when labels exist at
   training time, otherwise by clustering with an automatic number of groups.
2. Thresholds (`ccl_jax.thresholds`): one per group, from the scores of NORMAL held-out
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
ccl_jax.scenarios` runs them. A score function has the signature
`fn(variables, encoder_variables, images, group_id) -> {'anomaly_map', 'score'}`; for CCL/RD
the group is ignored (their maps do not depend on it), for HierCore it picks the coreset.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import sklearn.metrics

from ccl_jax import grouping, inference, step, thresholds


def group_agnostic(predict_fn: Callable) -> Callable:
  """A CCL/RD predict function with the score-function signature (group ignored)."""
  def score(variables, encoder_variables, images, group_id):
    del group_id
    return predict_fn(variables, encoder_variables, images)
  return score


def embeddings_of(encoder, encoder_variables, source, indices: np.ndarray, *,
                  global_batch_size: int, batch_sharding) -> np.ndarray:
  """Routing embeddings [N, D] of `source[indices]` (the same for every model)."""
  return inference.run_inference(
      _jitted_embed(encoder), None, encoder_variables, source, indices, outputs=("embedding",),
      global_batch_size=global_batch_size, batch_sharding=batch_sharding)["embedding"]


@functools.lru_cache(maxsize=8)
def _jitted_embed(encoder):
  # One jitted function per encoder, so the train, hold-out and test passes share its
  # compilation instead of each tracing a fresh partial.
  return jax.jit(functools.partial(step.embed, encoder=encoder))


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


def estimate_thresholds(score_fn: Callable, variables, encoder_variables, source,
                        holdout_indices: np.ndarray, holdout_groups: np.ndarray,
                        num_groups: int, *, rule: str, rule_params: dict[str, float],
                        global_batch_size: int, batch_sharding) -> thresholds.Thresholds:
  """Thresholds from the scores of the normal held-out images in their groups."""
  if len(holdout_indices) == 0:
    raise ValueError("No held-out normal training images to estimate thresholds from; set "
                     "validation_fraction > 0.")
  scores = inference.run_inference(
      score_fn, variables, encoder_variables, source, holdout_indices, outputs=("score",),
      per_image_inputs={"group_id": holdout_groups}, global_batch_size=global_batch_size,
      batch_sharding=batch_sharding)["score"]
  return thresholds.estimate_thresholds(scores, holdout_groups, num_groups, rule=rule,
                                        **rule_params)


def fit_decision(score_fn: Callable, variables, encoder, encoder_variables, dataset,
                 train_indices: np.ndarray, holdout_indices: np.ndarray, *,
                 labels_at_training: bool, num_groups: int | None, max_groups: int,
                 rule: str, rule_params: dict[str, float], seed: int,
                 global_batch_size: int, batch_sharding,
                 groups: grouping.Groups | None = None
                 ) -> tuple[grouping.Groups, thresholds.Thresholds, dict[str, Any]]:
  """Groups (unless given, as HierCore fits them before its memory bank) and thresholds.

  Returns the groups, the thresholds and a meta dict for decision.json.
  """
  embed = functools.partial(embeddings_of, encoder, encoder_variables, dataset.train,
                            global_batch_size=global_batch_size, batch_sharding=batch_sharding)
  if groups is None:
    groups = fit_training_groups(
        embed(train_indices), dataset.train_class_ids[train_indices] if labels_at_training
        else None, dataset.class_names, num_groups=num_groups, max_groups=max_groups,
        seed=seed)
  holdout_class_ids = dataset.train_class_ids[holdout_indices] if labels_at_training else None
  holdout_groups = evaluation_groups(groups, embed(holdout_indices), holdout_class_ids,
                                     dataset.class_names)
  estimated = estimate_thresholds(
      score_fn, variables, encoder_variables, dataset.train, holdout_indices, holdout_groups,
      groups.num_groups, rule=rule, rule_params=rule_params,
      global_batch_size=global_batch_size, batch_sharding=batch_sharding)
  meta = {"labels_at_training": labels_at_training,
          "num_holdout_images": int(len(holdout_indices)),
          "embedding_dim": int(groups.centroids.shape[1])}
  return groups, estimated, meta


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


def evaluate_decisions(score_fn: Callable, variables, encoder, encoder_variables, dataset,
                       groups: grouping.Groups, estimated: thresholds.Thresholds, *,
                       labels_at_evaluation: bool, global_batch_size: int,
                       batch_sharding) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Threshold-free metrics and decisions (class-wise and agnostic) on the test split.

  Returns the result dict and the raw per-image outputs (incl. 'group_id').
  """
  indices = np.arange(len(dataset.test))
  embeddings = embeddings_of(encoder, encoder_variables, dataset.test, indices,
                             global_batch_size=global_batch_size,
                             batch_sharding=batch_sharding)
  group_ids = evaluation_groups(
      groups, embeddings, dataset.test_class_ids if labels_at_evaluation else None,
      dataset.class_names)
  summary, outputs = inference.evaluate_test_set(
      score_fn, variables, encoder_variables, dataset, global_batch_size=global_batch_size,
      batch_sharding=batch_sharding, per_image_inputs={"group_id": group_ids})
  outputs["group_id"] = group_ids
  scores, labels = outputs["score"], outputs["label"]
  decide = functools.partial(thresholds.decision_metrics, scores, labels,
                             class_ids=dataset.test_class_ids, class_names=dataset.class_names)
  result = {
      "metrics": summary,
      "classwise": decide(estimated.per_image(group_ids)),
      "agnostic": decide(np.full(len(scores), estimated.agnostic)),
      "routing": routing_quality(groups, group_ids, dataset.test_class_ids,
                                 dataset.class_names),
  }
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


DECISION_COLUMNS = ("precision", "recall", "f1", "false_alarm_rate")


def format_decision_table(result: dict[str, Any]) -> str:
  """Markdown table of decisions per class at class-wise and class-agnostic thresholds."""
  header = ["class"] + [f"{c} ({kind})" for kind in ("class-wise", "agnostic")
                        for c in ("P", "R", "F1", "FAR")]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

  def row(name, classwise, agnostic):
    values = [100 * block[c] for block in (classwise, agnostic) for c in DECISION_COLUMNS]
    return "| " + " | ".join([name] + [f"{v:.1f}" for v in values]) + " |"

  classwise, agnostic = result["classwise"], result["agnostic"]
  for name in classwise["per_class"]:
    lines.append(row(name, classwise["per_class"][name], agnostic["per_class"][name]))
  lines.append(row("**mean**", classwise["mean"], agnostic["mean"]))
  lines.append(row("spread (std)", {c: classwise["spread"][c]["std"] for c in DECISION_COLUMNS},
                   {c: agnostic["spread"][c]["std"] for c in DECISION_COLUMNS}))
  return "\n".join(lines)

"""Batched inference over a dataset split: every image exactly once, on any number of
devices or hosts (the last batch is padded and its padding masked out), and the test-set
metrics built on it. Used by training, evaluation, HierCore and the decision scenarios.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from ccl_jax import input_pipeline, metrics


class _Gather:
  """Collects per-image outputs of padded eval batches into arrays indexed by position."""

  def __init__(self, num_items: int):
    self.num_items = num_items
    self.fields: dict[str, np.ndarray] = {}
    self.seen = np.zeros(num_items, bool)

  def add(self, index: np.ndarray, valid: np.ndarray, values: dict[str, np.ndarray]) -> None:
    index = index[valid]
    if np.any(self.seen[index]):
      raise RuntimeError("An evaluation image was produced twice; the eval stream is broken.")
    self.seen[index] = True
    for name, value in values.items():
      if name not in self.fields:
        self.fields[name] = np.zeros((self.num_items,) + value.shape[1:], value.dtype)
      self.fields[name][index] = value[valid]

  def result(self) -> dict[str, np.ndarray]:
    if not np.all(self.seen):
      raise RuntimeError(f"{np.sum(~self.seen)} evaluation images were never produced.")
    return self.fields


def host_value(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) global array on every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_inference(fn, variables, encoder_variables, source, indices: np.ndarray, *,
                  outputs: tuple[str, ...], batch_fields: tuple[str, ...] = (),
                  per_image_inputs: dict[str, np.ndarray] | None = None,
                  global_batch_size: int, batch_sharding,
                  worker_count: int = 0) -> dict[str, np.ndarray]:
  """Runs `fn(variables, encoder_variables, images, **inputs)` on every image of `indices`
  exactly once (padded, masked last batch) and returns the named `outputs` of `fn` and
  `batch_fields` of the input batches as per-position arrays. `per_image_inputs` maps
  keyword names to arrays over the positions of `indices` (e.g. each image's group)."""
  per_image_inputs = per_image_inputs or {}
  for name, values in per_image_inputs.items():
    if len(values) != len(indices):
      raise ValueError(f"per_image_inputs[{name!r}] has {len(values)} entries for "
                       f"{len(indices)} images.")
  gather = _Gather(len(indices))
  for local in input_pipeline.eval_batches(
      source, indices, global_batch_size=global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=worker_count):
    # Padding rows (index -1) take the first image's inputs; their outputs are dropped.
    positions = np.maximum(np.asarray(local["index"]), 0)
    local = dict(local, **{name: np.asarray(values)[positions]
                           for name, values in per_image_inputs.items()})
    batch = input_pipeline.to_global_array(local, batch_sharding)
    out = fn(variables, encoder_variables, batch["image"],
             **{name: batch[name] for name in per_image_inputs})
    values = {name: host_value(out[name]) for name in outputs}
    values.update({name: host_value(batch[name]) for name in batch_fields})
    gather.add(host_value(batch["index"]), host_value(batch["valid"]), values)
  return gather.result()


def evaluate_test_set(predict_fn, variables, encoder_variables, dataset, *,
                      global_batch_size: int, batch_sharding,
                      per_image_inputs: dict[str, np.ndarray] | None = None,
                      worker_count: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
  """Metrics per class and mean over the whole test split, plus the raw outputs."""
  indices = np.arange(len(dataset.test))
  outputs = run_inference(predict_fn, variables, encoder_variables, dataset.test, indices,
                          outputs=("anomaly_map", "score"), batch_fields=("mask", "label"),
                          per_image_inputs=per_image_inputs,
                          global_batch_size=global_batch_size, batch_sharding=batch_sharding,
                          worker_count=worker_count)
  per_class = {}
  for class_id, name in enumerate(dataset.class_names):
    rows = dataset.test_class_ids == class_id
    per_class[name] = {"labels": outputs["label"][rows], "scores": outputs["score"][rows],
                       "masks": outputs["mask"][rows], "maps": outputs["anomaly_map"][rows]}
  summary = metrics.summarize(per_class)
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

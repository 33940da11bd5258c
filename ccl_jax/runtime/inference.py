"""Batched inference over a dataset split: every image exactly once, on any number of
devices or hosts (the last batch is padded and its padding masked out).

The device mesh is 1-D ('data') over every device of every process: batches are sharded
along it, everything else is replicated.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from ccl_jax.datasets import input_pipeline


class PerImage:
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


def data_mesh() -> jax.sharding.Mesh:
  """1-D mesh over every device of every process, axis 'data'.

  Auto axis types: XLA propagates the batch sharding through the step and inserts the
  cross-device reductions (BatchNorm statistics, gradients, contrastive similarities).
  """
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding() -> NamedSharding:
  """Arrays split along their first (batch) axis over the 'data' mesh."""
  return NamedSharding(data_mesh(), P("data"))


def replicated_sharding() -> NamedSharding:
  """Arrays held whole on every device."""
  return NamedSharding(data_mesh(), P())


def host_value(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) global array on every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _row_ranges(x: jax.Array) -> list[tuple[int, int]]:
  rows = {shard.index[0].indices(x.shape[0])[:2] for shard in x.addressable_shards}
  return sorted(rows)


def process_rows(x: jax.Array, like: jax.Array) -> np.ndarray:
  """This process's rows of a global array whose first axis is the batch: the rows that
  this process's devices hold of `like` (a batch-sharded input), in order. Nothing moves
  between hosts."""
  if jax.process_count() == 1:
    return np.asarray(x)
  parts = []
  for start, stop in _row_ranges(like):
    for shard in x.addressable_shards:
      first, last = shard.index[0].indices(x.shape[0])[:2]
      if first <= start and stop <= last:
        parts.append(np.asarray(shard.data)[start - first:stop - first])
        break
    else:
      raise RuntimeError(f"Rows {start}:{stop} of a batch are not on this process's devices "
                         f"in the output's sharding {x.sharding}.")
  return np.concatenate(parts)


def all_processes(value: Any) -> list[Any]:
  """`value` (picklable) of every process, in process order, on every process."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(pickle.dumps(value), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(row[:int(size)].tobytes()) for row, size in zip(gathered, sizes.ravel())]


def scored_batches(fn, source, indices: np.ndarray, *, outputs: tuple[str, ...],
                   batch_fields: tuple[str, ...] = (), local_outputs: tuple[str, ...] = (),
                   per_image_inputs: dict[str, np.ndarray] | None = None,
                   global_batch_size: int, batch_sharding, layout: np.ndarray | None = None,
                   worker_count: int = 0) -> Iterator[tuple[dict, dict]]:
  """Runs `fn(images, **inputs)` on every image of `indices` exactly once (padded, masked
  last batch; `layout` as `input_pipeline.eval_batches`) and yields, per global batch,
  (shared, local): `shared` holds the named `outputs` of `fn` and `batch_fields` of the
  input batch for every row, on every process, with 'index' (the position in `indices`,
  -1 for padding) and 'valid'; `local` holds `local_outputs` of `fn` for this process's
  rows only, beside that process's input batch (image, mask, label, index, valid, ...).
  `per_image_inputs` maps keyword names to arrays over the positions of `indices` (e.g.
  each image's group)."""
  per_image_inputs = per_image_inputs or {}
  for name, values in per_image_inputs.items():
    if len(values) != len(indices):
      raise ValueError(f"per_image_inputs[{name!r}] has {len(values)} entries for "
                       f"{len(indices)} images.")
  for local in input_pipeline.eval_batches(
      source, indices, global_batch_size=global_batch_size, layout=layout,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=worker_count):
    # Padding rows (index -1) take the first image's inputs; their outputs are dropped.
    positions = np.maximum(np.asarray(local["index"]), 0)
    inputs = {name: np.asarray(values)[positions] for name, values in per_image_inputs.items()}
    batch = input_pipeline.to_global_array(
        {name: local[name] for name in ("image", "index", "valid", *batch_fields)} | inputs,
        batch_sharding)
    out = fn(batch["image"], **{name: batch[name] for name in per_image_inputs})
    shared = {name: host_value(out[name]) for name in outputs}
    shared.update({name: host_value(batch[name]) for name in ("index", "valid", *batch_fields)})
    own = {name: np.asarray(value) for name, value in local.items()}
    if local_outputs:
      if not np.array_equal(process_rows(batch["index"], batch["index"]), own["index"]):
        raise RuntimeError("This process's rows of the global batch are not its input rows.")
      own.update({name: process_rows(out[name], batch["index"]) for name in local_outputs})
    yield shared, own


def run_inference(fn, source, indices: np.ndarray, *,
                  outputs: tuple[str, ...], batch_fields: tuple[str, ...] = (),
                  per_image_inputs: dict[str, np.ndarray] | None = None,
                  global_batch_size: int, batch_sharding,
                  worker_count: int = 0) -> dict[str, np.ndarray]:
  """Runs `fn(images, **inputs)` on every image of `indices`
  exactly once (padded, masked last batch) and returns the named `outputs` of `fn` and
  `batch_fields` of the input batches as per-position arrays, on every process.
  `per_image_inputs` maps keyword names to arrays over the positions of `indices` (e.g.
  each image's group)."""
  gather = PerImage(len(indices))
  for shared, _ in scored_batches(
      fn, source, indices, outputs=outputs, batch_fields=batch_fields,
      per_image_inputs=per_image_inputs, global_batch_size=global_batch_size,
      batch_sharding=batch_sharding, worker_count=worker_count):
    gather.add(shared.pop("index"), shared.pop("valid"), shared)
  return gather.result()

"""HierCore's hierarchical memory bank: group centroids above, one patch coreset per group.

Designed from HierCore's abstract (arXiv, Aug 2025), which names only "a hierarchical memory
bank" that works "even without class labels" and yields "class-wise decision criteria". The
two levels here:

* Upper level: groups of training images (true classes, or clusters of the image-level
  embedding when labels are absent) with their centroids. They belong to
  `ccl_jax.decisions.grouping`; this module only receives each training image's group id and the
  number of groups, and at test time each image's routed group id.
* Lower level: per group, a greedy k-center coreset of the PatchCore patch features of that
  group's training images (`coreset.py`), so a test patch is compared only with normal
  patches of the group its image was routed to. Per-group scores are what per-group
  thresholds (`ccl_jax.decisions.thresholds`) are estimated from.

Bank size: `coreset_fraction` keeps ceil(fraction * patches of the group) points per group
(PatchCore's 1 %-25 % rule, per group), `coreset_size` a fixed number per group (capped at
the group's patch count). Coresets of different size are stored padded to one
[G, M, C] array with `counts` [G]; `valid` masks the padding.

Building streams the training images once, in group order, through
`input_pipeline.eval_batches` (padded, masked last batch; multi-host safe as in
`inference.run_inference`); each group's patches go to its `StreamingCoreset` in chunks of
`chunk_images` images. As groups arrive one after another, a group's last partial chunk is
reduced as soon as the next group starts, so host memory is bounded by the bank plus one
chunk and one batch of patches.

Scoring (`score`, jittable): the anomaly of a patch is its Euclidean distance to the nearest
patch of its image's group coreset (PatchCore). The memory axis is processed in chunks of
`memory_chunk` entries with a running minimum, so the largest intermediates are the
distances [B, h*w, memory_chunk] and the gathered memory [B, memory_chunk, C], never
[B*h*w, M]. Squared distances are |x|^2 - 2 x.y + |y|^2 (one matmul per chunk, at HIGHEST
precision so TF32 does not perturb near-zero distances), clamped at 0 before the root.
Padding rows of a group (beyond counts[g]) are masked to +inf. The patch-distance map is
upsampled (bilinear, align_corners=True) and blurred (Gaussian sigma 4) to the image size
with the operators of `ccl_jax.models.anomaly_maps`, as RD's maps are; the image score is the
maximum of that map (`anomaly_maps.image_score`), so both models' scores are defined alike.
PatchCore's image-score reweighting (Eq. 7, by the density of the bank around the nearest
coreset point of the worst patch; `reweighting`) is an option (`hiercore.reweight_neighbours`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ccl_jax.models import anomaly_maps
from ccl_jax.datasets import input_pipeline
from ccl_jax.runtime import inference
from ccl_jax.hiercore.coreset import DEFAULT_PROJECTION_DIM, StreamingCoreset
from ccl_jax.hiercore.features import patch_features



@functools.partial(jax.tree_util.register_dataclass, data_fields=("features", "counts"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class MemoryBank:
  """Per-group patch coresets, padded: `features` [G, M, C] float32, `counts` [G] int32
  (group g's coreset is features[g, :counts[g]]). A pytree: pass it to jitted `score` as an
  argument (`jax.device_put` it once to keep it on the device)."""
  features: np.ndarray | jax.Array
  counts: np.ndarray | jax.Array

  @property
  def num_groups(self) -> int:
    return self.features.shape[0]

  @property
  def feature_dim(self) -> int:
    return self.features.shape[2]

  @property
  def valid(self) -> np.ndarray:
    """[G, M] bool: which rows of `features` are real coreset points."""
    return np.arange(self.features.shape[1])[None, :] < np.asarray(self.counts)[:, None]

  @property
  def nbytes(self) -> int:
    """Bytes of the stored (padded) features."""
    return int(np.prod(self.features.shape)) * 4

  def group(self, g: int) -> np.ndarray:
    """Group g's coreset [counts[g], C]."""
    return np.asarray(self.features[g, :int(self.counts[g])])

  @classmethod
  def create(cls, features: np.ndarray, counts: np.ndarray) -> MemoryBank:
    """A validated bank of host arrays (float32 features, int32 counts)."""
    features = np.asarray(features)
    counts = np.asarray(counts)
    if features.ndim != 3 or not np.issubdtype(features.dtype, np.floating):
      raise ValueError(f"features must be a float [G, M, C] array, got {features.dtype} "
                       f"{features.shape}.")
    if counts.shape != features.shape[:1] or not np.issubdtype(counts.dtype, np.integer):
      raise ValueError(f"counts must be an int [G] array with G = {features.shape[0]}, got "
                       f"{counts.dtype} {counts.shape}.")
    if np.any(counts < 1) or np.any(counts > features.shape[1]):
      raise ValueError(f"every group needs 1 to {features.shape[1]} coreset points; counts "
                       f"are {counts.tolist()}.")
    if not np.all(np.isfinite(features)):
      raise ValueError("features contain non-finite values.")
    return cls(features.astype(np.float32), counts.astype(np.int32))


def coreset_sizes(patches_per_group: np.ndarray, *, coreset_fraction: float | None = None,
                  coreset_size: int | None = None) -> np.ndarray:
  """Coreset size per group [G] from its patch count: ceil(fraction * patches) or
  min(coreset_size, patches); exactly one of the two must be given."""
  patches_per_group = np.asarray(patches_per_group, np.int64)
  if (coreset_fraction is None) == (coreset_size is None):
    raise ValueError("Give exactly one of coreset_fraction and coreset_size.")
  if coreset_fraction is not None:
    if not 0.0 < coreset_fraction <= 1.0:
      raise ValueError(f"coreset_fraction must be in (0, 1], got {coreset_fraction}.")
    return np.maximum(1, np.ceil(coreset_fraction * patches_per_group)).astype(np.int64)
  if coreset_size < 1:
    raise ValueError(f"coreset_size must be positive, got {coreset_size}.")
  return np.minimum(coreset_size, patches_per_group)


def build_memory_bank(patch_fn: Callable[[jax.Array], jax.Array], source,
                      indices: Sequence[int], group_ids: Sequence[int], num_groups: int, *,
                      coreset_fraction: float | None = None, coreset_size: int | None = None,
                      chunk_images: int = 64, global_batch_size: int, batch_sharding,
                      projection_dim: int | None = DEFAULT_PROJECTION_DIM, seed: int = 0,
                      worker_count: int = 0, progress: bool = True,
                      with_sources: bool = False
                      ) -> MemoryBank | tuple[MemoryBank, np.ndarray]:
  """The memory bank of the training images `source[indices]`, and with `with_sources` the
  position in `indices` of the image each coreset point came from ([G, M] int32, -1 in the
  padding), for scoring a training image against the bank without its own patches.

  Args:
    patch_fn: uint8 images [B, S, S, 3] -> patch features [B, h, w, C] (`make_patch_fn`).
    source, indices: training records (see `input_pipeline`) and the positions to use.
    group_ids: [len(indices)] group of each image, in [0, num_groups); every group needs at
      least one image.
    coreset_fraction / coreset_size: per-group coreset size (exactly one; `coreset_sizes`).
    chunk_images: images per merge-and-reduce step (bounds memory; larger is closer to the
      exact greedy coreset, see `coreset.py`).
    global_batch_size, batch_sharding, worker_count: as `inference.run_inference`.
    projection_dim, seed: the greedy selection's random projection (`coreset.py`).
    progress: show a tqdm bar (on process 0).
  """
  indices = np.asarray(indices)
  group_ids = np.asarray(group_ids)
  if indices.ndim != 1 or group_ids.shape != indices.shape:
    raise ValueError(f"indices {indices.shape} and group_ids {group_ids.shape} must be 1-D "
                     "of the same length.")
  if group_ids.size and (group_ids.min() < 0 or group_ids.max() >= num_groups):
    raise ValueError(f"group_ids must lie in [0, {num_groups}), got "
                     f"[{group_ids.min()}, {group_ids.max()}].")
  images_per_group = np.bincount(group_ids, minlength=num_groups)
  if np.any(images_per_group == 0):
    raise ValueError(f"Groups {np.flatnonzero(images_per_group == 0).tolist()} have no "
                     "training images; every group needs at least one.")
  if chunk_images < 1:
    raise ValueError(f"chunk_images must be positive, got {chunk_images}.")
  image_shape = np.shape(source[int(indices[0])]["image"])
  patch_shape = jax.eval_shape(patch_fn, jax.ShapeDtypeStruct((1,) + image_shape, jnp.uint8))
  _, height, width, channels = patch_shape.shape
  patches_per_image = height * width
  sizes = coreset_sizes(images_per_group * patches_per_image,
                        coreset_fraction=coreset_fraction, coreset_size=coreset_size)
  max_size = int(sizes.max())
  streams = [StreamingCoreset(int(sizes[g]), chunk_images * patches_per_image, channels,
                              max_samples=max_size, projection_dim=projection_dim, seed=seed)
             for g in range(num_groups)]
  # Group order: the stream feeds one group at a time, so only one group holds pending
  # patches (plus a batch's overlap) and each chunk is a contiguous run of one group.
  order = np.argsort(group_ids, kind="stable")
  ordered_groups = group_ids[order]
  seen = np.zeros(indices.size, bool)
  finished = 0  # groups [0, finished) have been fully streamed
  batches = input_pipeline.eval_batches(
      source, indices[order], global_batch_size=global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=worker_count)
  total = input_pipeline.num_eval_batches(indices.size, global_batch_size)
  for local in tqdm.tqdm(batches, total=total, desc="HierCore memory bank", unit="batch",
                         disable=not progress or jax.process_index() != 0):
    batch = input_pipeline.to_global_array(local, batch_sharding)
    features = inference.host_value(patch_fn(batch["image"]))
    position, valid = inference.host_value(batch["index"]), inference.host_value(batch["valid"])
    position, features = position[valid], features[valid]
    if np.any(seen[position]):
      raise RuntimeError("A training image was produced twice; the eval stream is broken.")
    seen[position] = True
    for g in np.unique(ordered_groups[position]):
      rows = ordered_groups[position] == g
      streams[g].add(features[rows].reshape(-1, channels),
                     np.repeat(order[position[rows]], patches_per_image))
    # Positions arrive in group order: groups before this batch's last one are complete, so
    # their last partial chunk is reduced now rather than held until the end.
    last = int(ordered_groups[position.max()]) if position.size else finished
    for g in range(finished, last):
      streams[g].result()
    finished = max(finished, last)
  if not np.all(seen):
    raise RuntimeError(f"{np.sum(~seen)} training images were never produced.")
  bank = np.zeros((num_groups, max_size, channels), np.float32)
  counts = np.zeros(num_groups, np.int32)
  sources = np.full((num_groups, max_size), -1, np.int32)
  for g, stream in enumerate(streams):
    coreset = stream.result()
    bank[g, :coreset.shape[0]] = coreset
    sources[g, :coreset.shape[0]] = stream.sources
    counts[g] = coreset.shape[0]
  bank = MemoryBank.create(bank, counts)
  return (bank, sources) if with_sources else bank


def _nearest(bank: MemoryBank, queries: jax.Array, group_ids: jax.Array, k: int, *,
             memory_chunk: int, rows: bool = True,
             excluded: Excluded | None = None) -> tuple[jax.Array, jax.Array]:
  """Squared distances and bank rows [B, P, k] of the k nearest points of each query [B, P, C]
  in its image's group coreset, nearest first; the memory axis is scanned in chunks with a
  running top-k. Where the group has fewer than k points the rest are +inf. `rows` False
  (k = 1 only) skips the rows (returned as zeros): a running minimum is the cheapest scan.
  `excluded` leaves out, for query image b, the points whose source is `image_sources[b]`."""
  features = jnp.asarray(bank.features, jnp.float32)
  counts = jnp.asarray(bank.counts)
  batch, num_queries, channels = queries.shape
  if features.shape[2] != channels:
    raise ValueError(f"patch features have {channels} channels, the memory bank "
                     f"{features.shape[2]}.")
  size = features.shape[1]
  chunk = min(memory_chunk, size)
  queries = queries.astype(jnp.float32)
  query_norms = jnp.sum(jnp.square(queries), axis=-1)
  group_ids = jnp.asarray(group_ids, jnp.int32)

  def step(running, k_chunk):
    # The last chunk is shifted back to stay in range; its rows seen twice are dropped.
    start = jnp.minimum(k_chunk * chunk, size - chunk)
    memory = jax.lax.dynamic_slice_in_dim(features, start, chunk, axis=1)[group_ids]
    slots = start + jnp.arange(chunk)
    valid = ((slots[None, :] < counts[group_ids][:, None])
             & (slots[None, :] >= k_chunk * chunk))  # [B, chunk]
    if excluded is not None:
      sources = jax.lax.dynamic_slice_in_dim(excluded.bank_sources, start, chunk,
                                             axis=1)[group_ids]
      valid = valid & (sources != excluded.image_sources[:, None])
    squared = (query_norms[:, :, None] + jnp.sum(jnp.square(memory), axis=-1)[:, None, :]
               - 2.0 * jnp.einsum("bpc,bmc->bpm", queries, memory,
                                  precision=jax.lax.Precision.HIGHEST))
    squared = jnp.where(valid[:, None, :], squared, jnp.inf)
    if k == 1 and not rows:
      return (jnp.minimum(running[0], jnp.min(squared, axis=-1, keepdims=True)),
              running[1]), None
    if k == 1:
      # min/argmin: a top-k merge costs several times more on CPU for the common case.
      best = jnp.argmin(squared, axis=-1)[..., None]
      nearer = jnp.take_along_axis(squared, best, axis=-1) < running[0]
      return (jnp.where(nearer, jnp.take_along_axis(squared, best, axis=-1), running[0]),
              jnp.where(nearer, slots[best], running[1])), None
    merged = jnp.concatenate([running[0], squared], axis=-1)
    merged_rows = jnp.concatenate([running[1], jnp.broadcast_to(slots, squared.shape)],
                                  axis=-1)
    negative, picked = jax.lax.top_k(-merged, k)
    return (-negative, jnp.take_along_axis(merged_rows, picked, axis=-1)), None

  running = (jnp.full((batch, num_queries, k), jnp.inf, jnp.float32),
             jnp.zeros((batch, num_queries, k), jnp.int32))
  (squared, nearest), _ = jax.lax.scan(step, running, jnp.arange(math.ceil(size / chunk)))
  return squared, nearest


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("bank_sources", "image_sources"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class Excluded:
  """Bank points to leave out per query image: those of bank_sources [G, M] (as returned by
  `build_memory_bank(with_sources=True)`) equal to the image's own image_sources [B]."""
  bank_sources: jax.Array
  image_sources: jax.Array


def nearest_distances(bank: MemoryBank, patch_features: jax.Array, group_ids: jax.Array, *,
                      memory_chunk: int = 1024) -> jax.Array:
  """Euclidean distance [B, h, w] of every patch to the nearest point of its image's group
  coreset, scanning the memory axis in chunks of `memory_chunk`. Jittable."""
  return _nearest_patches(bank, patch_features, group_ids, memory_chunk=memory_chunk,
                          rows=False)[0]


def _nearest_patches(bank: MemoryBank, patch_features: jax.Array, group_ids: jax.Array, *,
                     memory_chunk: int, rows: bool,
                     excluded: Excluded | None = None) -> tuple[jax.Array, jax.Array]:
  """Distances [B, h, w] to the nearest coreset point, and that point's row [B, h*w] (zeros
  unless `rows`)."""
  batch, height, width, channels = patch_features.shape
  squared, nearest = _nearest(bank, patch_features.reshape(batch, height * width, channels),
                              group_ids, 1, memory_chunk=memory_chunk, rows=rows,
                              excluded=excluded)
  # squeeze, not [..., 0]: under a symbolic batch (jax.export) indexing becomes a gather.
  distances = jnp.sqrt(jnp.maximum(jnp.squeeze(squared, -1), 0.0)).reshape(batch, height, width)
  return distances, jnp.squeeze(nearest, -1)


def reweighting(bank: MemoryBank, patch_features: jax.Array, group_ids: jax.Array,
                distances: jax.Array, nearest_rows: jax.Array, neighbours: int, *,
                memory_chunk: int = 1024, excluded: Excluded | None = None) -> jax.Array:
  """PatchCore's image-score weight [B] (Roth et al. 2022, Eq. 7):
  1 - exp|m_test - m*| / sum over m in N_b(m*) of exp|m_test - m|, with m_test the patch
  farthest from its nearest coreset point m* and N_b(m*) the b = `neighbours` points of the
  group coreset nearest to m* (m* itself among them). The weight grows towards 1 when m*
  lies in a sparse part of the bank (a rare normal pattern is far from its neighbours, so a
  patch near it is still suspicious) and is 1 - 1/b where the bank is dense around m*.
  Points missing from a small group are left out of the sum."""
  batch, height, width, channels = patch_features.shape
  images = jnp.arange(batch)
  worst = jnp.argmax(distances.reshape(batch, height * width), axis=1)
  query = patch_features.reshape(batch, height * width, channels)[images, worst]  # [B, C]
  features = jnp.asarray(bank.features, jnp.float32)
  group_ids = jnp.asarray(group_ids, jnp.int32)
  anchor = features[group_ids, nearest_rows[images, worst]]  # m*, [B, C]
  squared, support = _nearest(bank, anchor[:, None, :], group_ids, neighbours,
                              memory_chunk=memory_chunk, excluded=excluded)
  points = features[group_ids[:, None], support[:, 0]]  # [B, b, C]
  gaps = jnp.sqrt(jnp.sum(jnp.square(query[:, None, :].astype(jnp.float32) - points), -1))
  logits = jnp.where(jnp.isfinite(squared[:, 0]), gaps, -jnp.inf)
  # support[:, 0, 0] is m* itself (distance 0 to itself): its share of the softmax.
  return 1.0 - jax.nn.softmax(logits, axis=-1)[:, 0]


def score(bank: MemoryBank, patch_features: jax.Array, group_ids: jax.Array, *,
          image_size: int | Sequence[int], memory_chunk: int = 1024,
          blur: bool = True, reweight_neighbours: int = 0,
          excluded: Excluded | None = None) -> dict[str, jax.Array]:
  """{'anomaly_map': [B, H, W], 'score': [B]} of patch features [B, h, w, C] against the
  coresets of `group_ids` [B] (module docstring), without the points `excluded` names;
  `reweight_neighbours` b > 0 multiplies each image score by `reweighting`. Jittable;
  `image_size`, `memory_chunk`, `blur` and `reweight_neighbours` are static."""
  distances, rows = _nearest_patches(bank, patch_features, group_ids,
                                     memory_chunk=memory_chunk, rows=bool(reweight_neighbours),
                                     excluded=excluded)
  maps = anomaly_maps.resize_maps(distances, image_size, blur=blur)
  image_scores = anomaly_maps.image_score(maps)
  if reweight_neighbours:
    image_scores = image_scores * reweighting(bank, patch_features, group_ids, distances, rows,
                                              reweight_neighbours, memory_chunk=memory_chunk,
                                              excluded=excluded)
  return {"anomaly_map": maps, "score": image_scores}


def score_images(bank: MemoryBank, encoder_variables, images: jax.Array, group_id: jax.Array, *,
                 encoder, feature_dim: int | None = None, memory_chunk: int = 1024,
                 reweight_neighbours: int = 0,
                 excluded: Excluded | None = None) -> dict[str, jax.Array]:
  """Anomaly maps and scores of uint8 images [B, H, W, 3] routed to `group_id` [B]."""
  features = patch_features(encoder, encoder_variables, images, feature_dim=feature_dim)
  return score(bank, features, group_id, image_size=images.shape[1:3],
               memory_chunk=memory_chunk, reweight_neighbours=reweight_neighbours,
               excluded=excluded)

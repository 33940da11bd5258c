"""Greedy k-center coreset subsampling (PatchCore's coreset), exact and streaming.

Greedy k-center (Gonzalez's farthest-point traversal)
------------------------------------------------------
Start from one point, then repeatedly add the point farthest from everything chosen so far.
The loop keeps one running vector, the squared distance of every point to its nearest
chosen point, so each of the `k` iterations costs one pass over the `N` points
(O(N * k * d) in all, O(N) memory beyond the points). It runs as a `lax.fori_loop` on the
accelerator.

* Start: the first point (`start_index=0`), deterministically. PatchCore starts from a
  random point; a fixed start makes a bank a pure function of its inputs and of `seed`, and
  the approximation guarantee below holds for any start.
* Ties (equal distances) go to the lowest index, as `numpy.argmax` does. A chosen point is
  marked with distance -1, so when fewer than `k` distinct points exist the remaining picks
  are other (duplicate) points, never a repeat of a chosen index: indices are distinct.
* Guarantee: the covering radius r = max_x min_{c in S} |x - c| of the greedy set S of size
  k is at most 2 * OPT_k, where OPT_k is the smallest radius any k centres (anywhere in
  space) achieve: the k chosen points plus the farthest remaining one are k + 1 points at
  pairwise distance >= r, and two of them share one optimal ball of diameter 2 * OPT_k.
* Johnson-Lindenstrauss projection (`projection_dim`, PatchCore's default 128): distances
  are computed on `x @ P` with P a fixed Gaussian [C, d] matrix (entries N(0, 1/d), drawn
  from `seed`), which preserves all pairwise distances up to a factor 1 +- eps with high
  probability for d = O(log N / eps^2), at d/C of the cost. The guarantee then holds in the
  projected metric, i.e. up to that distortion in the original one. `None` (or d >= C)
  selects on exact distances.

Streaming (merge-and-reduce)
----------------------------
The patches of a large training set do not fit in memory at once (MVTec at 256 px with
wide_resnet50_2: ~1 k patches x 1.5 k channels x 4 bytes = 6 MiB per image). `StreamingCoreset`
keeps a coreset S of at most k points and folds in bounded chunks C_1, C_2, ...:
S_t = greedy_k(S_{t-1} u C_t), in a buffer of fixed size k + chunk_points (one compilation).

* Guarantee: a point x of chunk C_t is within r_t of S_t, each point of S_t within r_{t+1}
  of S_{t+1}, and so on, so d(x, S_T) <= r_t + ... + r_T, where r_s is the greedy covering
  radius of step s. `radius_bound` accumulates that sum, a certificate computed from the
  data. Since S_{s-1} u C_s is a subset of all points, r_s <= 2 * OPT_k(all points), hence
  radius(S_T) <= 2 * T * OPT_k <= 2 * T * r_full for T reductions, r_full being the
  radius of the non-streaming greedy coreset (r_full >= OPT_k). The worst-case factor grows
  with the number of chunks (bigger chunks: fewer reductions, tighter bound); in practice the
  errors do not add up like that (the test checks both the certificate and the bound).
* Chunks are folded in only once k points are exceeded: while S u C fits in k points nothing
  is dropped and r_s = 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_PROJECTION_DIM = 128  # PatchCore's ApproximateGreedyCoresetSampler dimension
_CHOSEN = -1.0  # running distance of a chosen point: below any real (>= 0) distance


def projection_matrix(num_channels: int, projection_dim: int | None,
                      seed: int) -> jax.Array | None:
  """The Johnson-Lindenstrauss matrix [C, d] (N(0, 1/d) entries), or None for exact
  distances (no projection asked, or it would not reduce the dimension)."""
  if projection_dim is None or projection_dim >= num_channels:
    return None
  if projection_dim < 1:
    raise ValueError(f"projection_dim must be positive or None, got {projection_dim}.")
  return (jax.random.normal(jax.random.key(seed), (num_channels, projection_dim), jnp.float32)
          / np.sqrt(projection_dim))


@functools.partial(jax.jit, static_argnames=("max_samples",))
def _greedy(points: jax.Array, valid: jax.Array, num_samples: jax.Array,
            projection: jax.Array | None, *, max_samples: int) -> tuple[jax.Array, jax.Array]:
  """Greedy k-center on the `valid` rows of `points` [N, C], starting at row 0 (valid).

  `num_samples` (traced, <= max_samples) points are chosen, so buffers of one shape share a
  compilation whatever k is. Returns (indices [max_samples] int32, the first `num_samples`
  filled, the rest 0; covering radius of the valid rows, in the selection metric).
  """
  points = points.astype(jnp.float32)
  if projection is not None:
    points = jnp.dot(points, projection, precision=jax.lax.Precision.HIGHEST)
  # Invalid (padding) rows sit at -inf: never chosen, never updated by jnp.minimum.
  running = jnp.where(valid, jnp.inf, -jnp.inf)
  indices = jnp.zeros((max_samples,), jnp.int32)

  def body(i, carry):
    running, indices = carry
    # Iteration 0 picks row 0: every valid row is +inf and argmax takes the first.
    chosen = jnp.argmax(running).astype(jnp.int32)
    distance = jnp.sum(jnp.square(points - points[chosen]), axis=-1)
    running = jnp.minimum(running, distance).at[chosen].set(_CHOSEN)
    return running, indices.at[i].set(chosen)

  running, indices = jax.lax.fori_loop(0, num_samples, body, (running, indices))
  return indices, jnp.sqrt(jnp.maximum(jnp.max(running), 0.0))


def greedy_coreset(features: jax.Array | np.ndarray, num_samples: int, *,
                   projection_dim: int | None = DEFAULT_PROJECTION_DIM, seed: int = 0,
                   start_index: int = 0) -> np.ndarray:
  """Indices [num_samples] (int64, distinct, in selection order) of the greedy k-center
  coreset of `features` [N, C], starting at `start_index`.

  `projection_dim`: JL projection dimension for the distance computation (None: exact);
  `seed` draws its matrix. See the module docstring for the guarantee.
  """
  features = jnp.asarray(features)
  if features.ndim != 2 or features.shape[0] == 0:
    raise ValueError(f"features must be a non-empty [N, C] array, got shape {features.shape}.")
  n = features.shape[0]
  if not 1 <= num_samples <= n:
    raise ValueError(f"num_samples must be in [1, {n}] (the number of features), got "
                     f"{num_samples}.")
  if not 0 <= start_index < n:
    raise ValueError(f"start_index {start_index} is out of range for {n} features.")
  # Moving the start to row 0 keeps `_greedy`'s start rule; the order maps indices back.
  order = np.arange(n)
  order[[0, start_index]] = order[[start_index, 0]]
  projection = projection_matrix(features.shape[1], projection_dim, seed)
  indices, _ = _greedy(features[order], jnp.ones((n,), bool), jnp.int32(num_samples),
                       projection, max_samples=num_samples)
  return order[np.asarray(indices)]


def covering_radius(points: np.ndarray, centres: np.ndarray, *, chunk: int = 4096) -> float:
  """max over `points` [N, C] of the Euclidean distance to the nearest of `centres` [K, C]
  (float64, on the host, `chunk` points at a time)."""
  points = np.asarray(points, np.float64)
  centres = np.asarray(centres, np.float64)
  radius = 0.0
  centre_norms = np.sum(centres * centres, axis=1)
  for start in range(0, points.shape[0], chunk):
    block = points[start:start + chunk]
    squared = (np.sum(block * block, axis=1)[:, None] - 2.0 * block @ centres.T
               + centre_norms[None, :])
    radius = max(radius, float(np.sqrt(max(np.min(squared, axis=1).max(), 0.0))))
  return radius


class StreamingCoreset:
  """Greedy k-center coreset of a stream of [n, C] point chunks by merge-and-reduce.

  `add` buffers points and reduces whenever `chunk_points` are pending; `result` reduces the
  rest and returns the coreset [<= num_samples, C] (fewer only if fewer points were added).
  `radius_bound` certifies that every point added is within that distance of the result (in
  the selection metric: exact when no projection is used). `sources` [len(result)] holds the id
  given with each kept point (`add(points, ids)`; -1 where none was given), so a point of the
  coreset can be traced to the image it came from. The reduction buffer always has
  `max_samples + chunk_points` rows, so coresets of different groups with the same
  `max_samples` share one compilation.
  """

  def __init__(self, num_samples: int, chunk_points: int, num_channels: int, *,
               max_samples: int | None = None,
               projection_dim: int | None = DEFAULT_PROJECTION_DIM, seed: int = 0):
    max_samples = num_samples if max_samples is None else max_samples
    if not 1 <= num_samples <= max_samples:
      raise ValueError(f"Need 1 <= num_samples <= max_samples, got {num_samples} and "
                       f"{max_samples}.")
    if chunk_points < 1:
      raise ValueError(f"chunk_points must be positive, got {chunk_points}.")
    self.num_samples = num_samples
    self.max_samples = max_samples
    self.chunk_points = chunk_points
    self.num_channels = num_channels
    self.projection = projection_matrix(num_channels, projection_dim, seed)
    self.coreset = np.zeros((0, num_channels), np.float32)
    self.sources = np.zeros((0,), np.int64)
    self.radius_bound = 0.0
    self.num_reductions = 0
    self._pending: list[tuple[np.ndarray, np.ndarray]] = []
    self._num_pending = 0

  def add(self, points: np.ndarray, ids: np.ndarray | None = None) -> None:
    points = np.asarray(points, np.float32)
    if points.ndim != 2 or points.shape[1] != self.num_channels:
      raise ValueError(f"points must be [n, {self.num_channels}], got shape {points.shape}.")
    ids = np.full(points.shape[0], -1, np.int64) if ids is None else np.asarray(ids, np.int64)
    if ids.shape != points.shape[:1]:
      raise ValueError(f"ids must be [{points.shape[0]}], one per point; got {ids.shape}.")
    self._pending.append((points, ids))
    self._num_pending += points.shape[0]
    while self._num_pending >= self.chunk_points:
      self._reduce(self._take(self.chunk_points))

  def result(self) -> np.ndarray:
    if self._num_pending:
      self._reduce(self._take(self._num_pending))
    return self.coreset

  def _take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
    points, ids = (self._pending[0] if len(self._pending) == 1
                   else tuple(np.concatenate(parts) for parts in zip(*self._pending)))
    self._pending = [(points[count:], ids[count:])] if count < points.shape[0] else []
    self._num_pending -= count
    return points[:count], ids[:count]

  def _reduce(self, chunk: tuple[np.ndarray, np.ndarray]) -> None:
    merged = np.concatenate([self.coreset, chunk[0]])
    merged_sources = np.concatenate([self.sources, chunk[1]])
    if merged.shape[0] <= self.num_samples:  # nothing to drop: exact, radius 0
      self.coreset, self.sources = merged, merged_sources
      return
    capacity = self.max_samples + self.chunk_points
    buffer = np.zeros((capacity, self.num_channels), np.float32)
    buffer[:merged.shape[0]] = merged
    valid = np.arange(capacity) < merged.shape[0]
    indices, radius = _greedy(jnp.asarray(buffer), jnp.asarray(valid),
                              jnp.int32(self.num_samples), self.projection,
                              max_samples=self.max_samples)
    kept = np.asarray(indices)[:self.num_samples]
    self.coreset, self.sources = merged[kept], merged_sources[kept]
    self.radius_bound += float(radius)
    self.num_reductions += 1

"""Input pipeline: class-mixed (or plainly shuffled) epochs, grain train/eval streams.

Everything here is a pure function of explicit arguments (no config objects).

Data model
----------
``source`` is any random-access object with ``len(source)`` and ``source[i]``
returning a dict record with (at least) ``image`` uint8 [S, S, 3], ``mask``
uint8 [S, S] in {0, 1}, ``class_id`` int32, ``label`` int32 (0 normal,
1 anomalous). Records are only read for the rows a process actually yields.

Training stream
---------------
``train_batches`` is infinite. The order of epoch ``e`` is
``class_mixed_epoch(..., rng=np.random.default_rng([seed, e]))`` (sampler
'class_mixing') or ``shuffled_epoch(...)`` with the same rng (sampler
'shuffle', the authors' plain shuffled DataLoader), so the global
stream is a pure function of ``(seed, step)``: resuming at ``start_step`` skips
whole epochs arithmetically and the remaining batches of the current epoch
without reading them. Every *global* batch (``global_batch_size`` rows, split
over processes) mixes at least two classes whenever two or more classes are
present; a single process's slice of it need not.

Implementation with grain (0.2.18 dataset API)::

    grain.MapDataset.range(N)            # local row counter j
      .map(_TrainRow(...))               # j -> (global step, row) -> record
      .batch(b, drop_remainder=True)     # one element per step
      .to_iter_dataset(grain.ReadOptions(num_threads, prefetch_buffer_size))
      [.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))]

Batching happens on the ``MapDataset`` (one-to-one at batch level), so the
``mp_prefetch`` worker slicing (worker w produces batches w, w+W, ...) and
its round-robin interleave give exactly the stream of ``worker_count=0``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Iterator, Mapping

import grain
import jax
import numpy as np

__all__ = [
    "class_mixed_epoch",
    "steps_per_epoch",
    "train_batches",
    "eval_batches",
    "num_eval_batches",
    "to_global_array",
]

# Length of the (virtually infinite) training row range. grain's MapDataset
# needs a finite length; 2**62 rows never run out.
_INFINITE_ROWS = 2**62


# --------------------------------------------------------------------------
# Class-mixed epoch order.
# --------------------------------------------------------------------------


def _check_mixable(class_ids: np.ndarray, batch_size: int) -> None:
  """Raises ValueError if no epoch order can mix every batch."""
  n = class_ids.size
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if n < batch_size:
    raise ValueError(
        f"Not enough samples for one batch: {n} samples < batch_size "
        f"{batch_size}.")
  _, counts = np.unique(class_ids, return_counts=True)
  if counts.size < 2:
    return
  num_batches = n // batch_size
  others = n - counts.max()
  # Every mixed batch holds at least one sample outside the largest class,
  # so this is necessary; the construction below shows it is sufficient.
  if others < num_batches:
    raise ValueError(
        f"Cannot mix classes in every batch: {num_batches} batches of "
        f"{batch_size} need at least {num_batches} samples outside the "
        f"largest class, but only {others} of {n} are (class sizes "
        f"{sorted(counts.tolist(), reverse=True)}). Use a larger batch size "
        "or rebalance the classes.")


def _class_mixed_positions(class_ids: np.ndarray, batch_size: int,
                           rng: np.random.Generator) -> np.ndarray:
  """Positions into ``class_ids`` for one epoch (see class_mixed_epoch)."""
  class_ids = np.asarray(class_ids)
  _check_mixable(class_ids, batch_size)
  n = class_ids.size
  num_batches = n // batch_size
  m = num_batches * batch_size
  perm = rng.permutation(n)
  if np.unique(class_ids).size < 2:
    return perm[:m]

  # 1. Drop the remainder: random samples, unless that leaves too few
  #    samples outside the (kept) largest class; then drop greedily from the
  #    currently largest class (always feasible when _check_mixable passed).
  kept = perm[:m]
  _, kept_counts = np.unique(class_ids[kept], return_counts=True)
  if m - kept_counts.max() < num_batches:
    uniq, inv = np.unique(class_ids[perm], return_inverse=True)
    remaining = np.bincount(inv, minlength=uniq.size)
    drop = np.zeros(n, dtype=bool)
    for _ in range(n - m):
      c = int(np.argmax(remaining))
      # Last not-yet-dropped member of class c in the random order.
      cand = np.flatnonzero((inv == c) & ~drop)
      drop[cand[-1]] = True
      remaining[c] -= 1
    kept = perm[~drop]

  # 2. Stratified interleave: the k-th (random) member of a class of size
  #    n_c gets the key (k + u) / n_c, u ~ U[0, 1); sorting by the key
  #    spreads every class evenly over the epoch.
  cls = class_ids[kept]
  order = np.argsort(cls, kind="stable")
  sorted_cls = cls[order]
  _, starts, counts = np.unique(sorted_cls, return_index=True,
                                return_counts=True)
  rank = np.arange(m) - np.repeat(starts, counts)
  key = (rank + rng.random(m)) / np.repeat(counts, counts)
  seq = kept[order][np.argsort(key, kind="stable")]
  batches = seq.reshape(num_batches, batch_size).copy()

  # 3. Repair single-class batches. For a batch that is all class c, some
  #    other batch holds >= 2 samples not of class c (pigeonhole: there are
  #    >= num_batches such samples and none in this batch). Swapping one of
  #    them with a class-c sample leaves both batches mixed, so each swap
  #    removes one single-class batch and creates none.
  bcls = class_ids[batches]
  single = np.flatnonzero(np.all(bcls == bcls[:, :1], axis=1))
  for i in single:
    c = bcls[i, 0]
    not_c = bcls != c
    eligible = np.flatnonzero(not_c.sum(axis=1) >= 2)
    if eligible.size == 0:  # Unreachable after _check_mixable.
      raise AssertionError("class-mixing repair failed")
    j = eligible[rng.integers(eligible.size)]
    cols = np.flatnonzero(not_c[j])
    col_j = cols[rng.integers(cols.size)]
    col_i = rng.integers(batch_size)
    batches[i, col_i], batches[j, col_j] = batches[j, col_j], batches[i, col_i]
    bcls[i, col_i], bcls[j, col_j] = bcls[j, col_j], bcls[i, col_i]

  # 4. Shuffle the batch order and the rows inside each batch.
  batches = batches[rng.permutation(num_batches)]
  batches = rng.permuted(batches, axis=1)
  return batches.reshape(-1)


def class_mixed_epoch(class_ids_of_indices, indices, batch_size: int,
                      rng: np.random.Generator) -> np.ndarray:
  """One epoch's order of ``indices`` with every batch mixing classes.

  Args:
    class_ids_of_indices: int array [n]; ``class_ids_of_indices[k]`` is the
      class (or pseudo-class) of ``indices[k]``.
    indices: array [n] of source indices.
    batch_size: the batch the mixing constraint applies to (the GLOBAL batch).
    rng: numpy Generator; the result is a pure function of its state.

  Returns:
    Array of ``(n // batch_size) * batch_size`` distinct elements of
    ``indices``: the remainder ``n % batch_size`` is dropped (random samples,
    or samples of the largest class when random dropping would make mixing
    impossible). With two or more classes every consecutive chunk of
    ``batch_size`` contains at least two classes; with one class it is a
    plain shuffle.

  Raises:
    ValueError: if ``n < batch_size``, or if the class sizes make mixing every
      batch impossible (fewer samples outside the largest class than
      batches, e.g. any ``batch_size == 1`` with several classes).
  """
  indices = np.asarray(indices)
  class_ids_of_indices = np.asarray(class_ids_of_indices)
  if indices.shape != class_ids_of_indices.shape or indices.ndim != 1:
    raise ValueError(
        f"indices {indices.shape} and class_ids_of_indices "
        f"{class_ids_of_indices.shape} must be 1-D of the same length")
  return indices[_class_mixed_positions(class_ids_of_indices, batch_size,
                                        rng)]


SAMPLERS = ("class_mixing", "shuffle")


def shuffled_epoch(num_examples: int, batch_size: int,
                   rng: np.random.Generator) -> np.ndarray:
  """Positions ``0..n-1`` of one plainly shuffled epoch, the remainder
  ``n % batch_size`` dropped (a DataLoader with ``drop_last``); batches may
  hold a single class."""
  if num_examples < batch_size:
    raise ValueError(
        f"Not enough samples for one batch: {num_examples} samples < "
        f"batch_size {batch_size}.")
  return rng.permutation(num_examples)[:(num_examples // batch_size)
                                       * batch_size]


def _epoch_positions(sampler: str, class_ids: np.ndarray, batch_size: int,
                     rng: np.random.Generator) -> np.ndarray:
  if sampler == "shuffle":
    return shuffled_epoch(class_ids.size, batch_size, rng)
  return _class_mixed_positions(class_ids, batch_size, rng)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  if global_batch_size <= 0:
    raise ValueError(
        f"global_batch_size must be positive, got {global_batch_size}")
  return int(num_examples) // int(global_batch_size)


def num_eval_batches(n: int, global_batch_size: int) -> int:
  """Global eval batches covering ``n`` examples (the last one padded)."""
  if global_batch_size <= 0:
    raise ValueError(
        f"global_batch_size must be positive, got {global_batch_size}")
  return -(-int(n) // int(global_batch_size))


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"Bad process_index {process_index} / process_count "
                     f"{process_count}")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size {global_batch_size} must be a positive multiple "
        f"of process_count {process_count}")
  return global_batch_size // process_count


# --------------------------------------------------------------------------
# grain element functions (picklable; they run in grain threads/workers).
# --------------------------------------------------------------------------


class _TrainRow:
  """Maps a local row counter j to this process's record of the stream.

  Row j of process p is row ``p * b + j % b`` of global step
  ``start_step + j // b``; the epoch order is computed lazily (and cached)
  from ``default_rng([seed, epoch])``.
  """

  _CACHE_EPOCHS = 3

  def __init__(self, source, indices, class_ids, global_batch_size,
               local_batch_size, process_index, seed, start_step,
               sampler="class_mixing", view_source=None):
    self.source = source
    self.sampler = sampler
    self.view_source = view_source
    self.indices = np.asarray(indices)
    self.class_ids = np.asarray(class_ids)
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size
    self.process_index = process_index
    self.seed = seed
    self.start_step = start_step
    self.steps_per_epoch = steps_per_epoch(self.indices.size,
                                           global_batch_size)
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.Lock()
    self._orders = OrderedDict()

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_lock"], state["_orders"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Positions into ``indices`` for ``epoch`` (cached)."""
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        rng = np.random.default_rng([int(self.seed), int(epoch)])
        order = _epoch_positions(self.sampler, self.class_ids,
                                 self.global_batch_size, rng)
        self._orders[epoch] = order
        while len(self._orders) > self._CACHE_EPOCHS:
          self._orders.popitem(last=False)
      return order

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    step = self.start_step + j // self.local_batch_size
    row = self.process_index * self.local_batch_size + j % self.local_batch_size
    epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
    pos = self.epoch_order(epoch)[step_in_epoch * self.global_batch_size + row]
    index = int(self.indices[pos])
    row = {
        "image": np.asarray(self.source[index]["image"], dtype=np.uint8),
        "class_id": np.int32(self.class_ids[pos]),
    }
    if self.view_source is not None:
      row["image_source"] = np.asarray(self.view_source[index]["image"],
                                       dtype=np.uint8)
    return row


class _EvalRow:
  """Maps a local row counter j to a (possibly padding) eval record."""

  def __init__(self, source, indices, layout, local_batch_size, process_index):
    self.source = source
    self.indices = np.asarray(indices)
    self.layout = layout
    self.local_batch_size = local_batch_size
    self.process_index = process_index

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    b = self.local_batch_size
    q = int(self.layout[j // b, self.process_index * b + j % b])
    valid = q >= 0
    # Padding repeats the last real record (valid=False, index=-1).
    record = self.source[int(self.indices[q if valid else self.indices.size - 1])]
    return {
        "image": np.asarray(record["image"], dtype=np.uint8),
        "mask": np.asarray(record["mask"], dtype=np.uint8),
        "label": np.int32(record["label"]),
        "class_id": np.int32(record["class_id"]),
        "index": np.int32(q),
        "valid": np.bool_(valid),
    }


def _mark_absl_flags_parsed(worker_index: int, worker_count: int) -> None:
  """Marks absl flags parsed (defaults) if nobody parsed them yet.

  Used in the main process before starting grain workers and as grain's
  ``worker_init_fn`` in each (spawned) worker. A program run with
  ``absl.app.run`` has parsed them already and is left untouched.
  """
  del worker_index, worker_count
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _iterate(dataset) -> Iterator[dict]:
  """Iterates a grain dataset, closing its iterator (workers) at the end."""
  it = iter(dataset)
  try:
    yield from it
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()


def _to_iter(ds, worker_count: int, read_num_threads: int,
             prefetch_buffer_size: int):
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=read_num_threads,
                        prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    # grain reads its absl flags when it starts workers (main process) and
    # inside them; unparsed flags raise UnparsedFlagAccessError.
    _mark_absl_flags_parsed(0, worker_count)
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count),
        worker_init_fn=_mark_absl_flags_parsed)
  return _iterate(ds)


# --------------------------------------------------------------------------
# Public streams.
# --------------------------------------------------------------------------


def train_batches(source, indices, class_ids_of_indices, *,
                  global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  worker_count: int = 0, read_num_threads: int = 4,
                  prefetch_buffer_size: int = 4, sampler: str = "class_mixing",
                  view_source=None) -> Iterator[dict]:
  """Infinite training stream of this process's rows of each global batch.

  Global step ``s`` is batch ``s % spe`` of epoch ``s // spe`` (``spe =
  steps_per_epoch(len(indices), global_batch_size)``), epoch orders from
  ``class_mixed_epoch(class_ids_of_indices, indices, global_batch_size,
  np.random.default_rng([seed, epoch]))``. Process ``p`` yields rows
  ``[p*b, (p+1)*b)`` of each global batch, ``b = global_batch_size //
  process_count``. The first batch yielded is global step ``start_step``.

  Yields:
    ``{'image': uint8 [b, S, S, 3], 'class_id': int32 [b]}`` where
    ``class_id`` is taken from ``class_ids_of_indices`` (so pseudo-classes
    work), not from the record.

  With ``sampler='shuffle'`` the epoch orders come from
  ``shuffled_epoch(len(indices), global_batch_size, rng)`` instead (no class
  constraint). With ``view_source`` (a source holding the same records at a
  larger size, e.g. prepared at ``augmented_view_source_size``) every row
  also carries ``'image_source'``, that source's image of the same index:
  the augmented view is cut from it.

  Args:
    worker_count: grain multiprocessing workers (0: read in this process).
    read_num_threads, prefetch_buffer_size: grain ``ReadOptions`` per process
      (threads decode whole local batches; the buffer counts batches).
  """
  indices = np.asarray(indices)
  class_ids_of_indices = np.asarray(class_ids_of_indices)
  if indices.ndim != 1 or indices.shape != class_ids_of_indices.shape:
    raise ValueError(
        f"indices {indices.shape} and class_ids_of_indices "
        f"{class_ids_of_indices.shape} must be 1-D of the same length")
  b = _local_batch_size(global_batch_size, process_index, process_count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  if sampler == "class_mixing":
    _check_mixable(class_ids_of_indices, global_batch_size)
  elif indices.size < global_batch_size:
    raise ValueError(f"Not enough samples for one batch: {indices.size} samples "
                     f"< batch_size {global_batch_size}.")
  row_fn = _TrainRow(source, indices, class_ids_of_indices, global_batch_size,
                     b, process_index, seed, start_step, sampler, view_source)
  num_rows = (_INFINITE_ROWS // b) * b
  ds = (grain.MapDataset.range(num_rows)
        .map(row_fn)
        .batch(b, drop_remainder=True))
  return _to_iter(ds, worker_count, read_num_threads, prefetch_buffer_size)


def eval_layout(n: int, global_batch_size: int) -> np.ndarray:
  """The default eval layout of ``n`` positions: global batch ``k`` holds
  positions ``[k*G, (k+1)*G)``, the last one padded with -1."""
  layout = np.arange(num_eval_batches(n, global_batch_size) * global_batch_size)
  layout[n:] = -1
  return layout.reshape(-1, global_batch_size)


def _check_layout(layout, n: int, global_batch_size: int) -> np.ndarray:
  layout = np.asarray(layout)
  if layout.ndim != 2 or layout.shape[1] != global_batch_size:
    raise ValueError(f"layout must have shape [num_batches, {global_batch_size}], got "
                     f"{layout.shape}")
  real = np.sort(layout[layout >= 0])
  if layout.min(initial=0) < -1 or not np.array_equal(real, np.arange(n)):
    raise ValueError(f"layout must hold each of the {n} positions exactly once (and -1 "
                     "for padding)")
  return layout


def eval_batches(source, indices, *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, layout=None,
                 worker_count: int = 0, read_num_threads: int = 4,
                 prefetch_buffer_size: int = 4) -> Iterator[dict]:
  """Finite eval stream over ``indices``, padded to full batches.

  ``layout`` [num_batches, G] says which position of ``indices`` each row of
  each global batch holds (-1: padding); every position appears exactly once.
  Process ``p`` reads columns ``[p*b, (p+1)*b)``. The default,
  ``eval_layout(len(indices), G)``, takes ``indices`` in order. Padding rows
  are a copy of the last real record (``valid=False``, ``index=-1``), so
  every image counts exactly once over all processes.

  Yields:
    ``{'image' uint8 [b,S,S,3], 'mask' uint8 [b,S,S], 'label' int32 [b],
    'class_id' int32 [b], 'index' int32 [b], 'valid' bool [b]}``; ``index``
    is the position in ``indices`` (-1 for padding).
  """
  indices = np.asarray(indices)
  if indices.ndim != 1:
    raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
  b = _local_batch_size(global_batch_size, process_index, process_count)
  layout = (eval_layout(indices.size, global_batch_size) if layout is None
            else _check_layout(layout, indices.size, global_batch_size))
  row_fn = _EvalRow(source, indices, layout, b, process_index)
  ds = (grain.MapDataset.range(len(layout) * b)
        .map(row_fn)
        .batch(b, drop_remainder=True))
  return _to_iter(ds, worker_count, read_num_threads, prefetch_buffer_size)


def to_global_array(local_batch: Mapping[str, Any], sharding) -> dict:
  """Assembles process-local batches into global jax.Arrays.

  ``sharding`` is e.g. ``NamedSharding(mesh, P('data'))``. Each field's
  local rows become the slice of the global batch axis owned by this
  process's devices (so the global batch is ``process_count`` times the local
  one; the row order follows the mesh's device order). Works for numpy
  arrays and grain's shared-memory arrays alike.
  """
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in local_batch.items()
  }

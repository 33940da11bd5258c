"""Any trained model (CCL, RD or HierCore) behind one interface, for scoring new images.

  scorer = scorers.load_scorer(workdir, batch_size=16)
  embeddings = scorer.embed(images)              # [B, D] routing embeddings
  outputs = scorer.score(images, group_ids)      # {'anomaly_map': [B, S, S], 'score': [B]}

`images` are uint8 RGB arrays [B, S, S, 3] with S = `scorer.image_size`, any B. They go
through jitted functions built once, in batches of exactly `batch_size` images (the last
one zero-padded, the padding dropped from the outputs), so no batch size ever recompiles.
The model comes from `train.load_scoring_model`: a training run's best checkpoint (kind
'ccl', or 'rd' when both contrastive loss weights are 0; `group_ids` unused) or a HierCore
memory bank (kind 'hiercore'; each image is scored against its group's coreset).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from ccl_jax import step, train


def run_batched(fn: Callable[..., dict[str, jax.Array]], batch_size: int,
                outputs: tuple[str, ...], *arrays: np.ndarray) -> dict[str, np.ndarray]:
  """`fn(*batch)` over the leading axis of `arrays` in batches of exactly `batch_size`
  rows; the named `outputs` of `fn`, concatenated, with the padding of the last batch
  removed."""
  count = len(arrays[0])
  if count == 0:
    raise ValueError("run_batched: no rows to process.")
  parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
  for start in range(0, count, batch_size):
    batch = [a[start:start + batch_size] for a in arrays]
    real = len(batch[0])
    if real < batch_size:
      # Zero rows (group 0 for group ids): every model scores images independently
      # (inference-mode BatchNorm, per-image nearest neighbours).
      batch = [np.concatenate([b, np.zeros((batch_size - real,) + b.shape[1:], b.dtype)])
               for b in batch]
    out = fn(*batch)
    for name in outputs:
      parts[name].append(np.asarray(out[name])[:real])
  return {name: np.concatenate(values) for name, values in parts.items()}


class Scorer:
  """A trained model that embeds images for routing and scores them."""

  def __init__(self, model: train.ScoringModel, *, batch_size: int):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.model = model
    self.kind: str = model.kind  # 'ccl' | 'rd' | 'hiercore'
    self.image_size = int(model.config.image_size)
    self.batch_size = batch_size
    self._embed = jax.jit(functools.partial(step.embed, encoder=model.encoder))

  def _check(self, images: np.ndarray) -> None:
    shape = (self.image_size, self.image_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
      raise ValueError(f"{self.kind} scorer: expected uint8 images [B, {self.image_size}, "
                       f"{self.image_size}, 3], got {images.dtype} {images.shape}.")

  def embed(self, images: np.ndarray) -> np.ndarray:
    """Routing embeddings [B, D] (`step.embed`) of uint8 images [B, S, S, 3]."""
    self._check(images)
    fn = lambda x: self._embed(None, self.model.encoder_variables, x)
    return run_batched(fn, self.batch_size, ("embedding",), images)["embedding"]

  def score(self, images: np.ndarray, group_ids: np.ndarray) -> dict[str, np.ndarray]:
    """{'anomaly_map': float [B, S, S], 'score': float [B]} of uint8 images [B, S, S, 3]
    in groups `group_ids` [B] (ignored by CCL / RD: one model for all classes)."""
    self._check(images)
    group_ids = np.asarray(group_ids, np.int32)
    if group_ids.shape != (len(images),):
      raise ValueError(f"group_ids must be [{len(images)}], got shape {group_ids.shape}.")
    fn = lambda x, g: self.model.score_fn(self.model.variables, self.model.encoder_variables,
                                          x, g)
    return run_batched(fn, self.batch_size, ("anomaly_map", "score"), images, group_ids)


def load_scorer(workdir: str, *, batch_size: int = 16) -> Scorer:
  """The scorer of a CCL / RD training run or a HierCore fit saved in `workdir`."""
  return Scorer(train.load_scoring_model(workdir), batch_size=batch_size)

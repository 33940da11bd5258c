"""Trained anomaly models behind one interface, for scoring arbitrary images.

  scorer = scorers.load_scorer(workdir, batch_size=16)
  embeddings = scorer.embed(images)              # [B, D] routing embeddings
  outputs = scorer.score(images, group_ids)      # {'anomaly_map': [B, S, S], 'score': [B]}

`images` are uint8 RGB arrays [B, S, S, 3] with S = `scorer.image_size`, any B. They go
through jitted functions built once, in batches of exactly `batch_size` images (the last
one zero-padded, the padding dropped from the outputs), so no batch size ever recompiles.

Kinds: 'ccl' and 'rd' (a training run's best checkpoint; 'rd' when both contrastive loss
weights of its config are 0) and 'hiercore' (a HierCore memory bank, recognised by
`model.kind == 'hiercore'` in the workdir's config.json).
"""
from __future__ import annotations

import abc
import functools
import json
import os
from typing import Callable

import jax
import numpy as np

from ccl_jax import step, train

KINDS = ("ccl", "rd", "hiercore")


class Scorer(abc.ABC):
  """A trained model that embeds images for routing and scores them."""

  kind: str        # one of KINDS
  image_size: int  # S: the side of the square uint8 images the model takes
  batch_size: int  # images per jitted call

  @abc.abstractmethod
  def embed(self, images: np.ndarray) -> np.ndarray:
    """Routing embeddings [B, D] (`step.embed`) of uint8 images [B, S, S, 3]."""

  @abc.abstractmethod
  def score(self, images: np.ndarray, group_ids: np.ndarray) -> dict[str, np.ndarray]:
    """{'anomaly_map': float [B, S, S], 'score': float [B]} of uint8 images [B, S, S, 3];
    `group_ids` [B] are the images' groups (models without per-group state ignore them)."""

  def check_images(self, images: np.ndarray) -> None:
    shape = (self.image_size, self.image_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
      raise ValueError(f"{self.kind} scorer: expected uint8 images [B, {self.image_size}, "
                       f"{self.image_size}, 3], got {images.dtype} {images.shape}.")


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
      # Zero rows: every model scores images independently (inference-mode BatchNorm).
      batch = [np.concatenate([b, np.zeros((batch_size - real,) + b.shape[1:], b.dtype)])
               for b in batch]
    out = fn(*batch)
    for name in outputs:
      parts[name].append(np.asarray(out[name])[:real])
  return {name: np.concatenate(values) for name, values in parts.items()}


class ReverseDistillationScorer(Scorer):
  """RD4AD / CCL: the best checkpoint of a training run (`train.load_trained`)."""

  def __init__(self, trained: train.TrainedModel, *, batch_size: int):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    loss = trained.config.loss
    self.kind = "rd" if loss.local_weight == 0 and loss.global_weight == 0 else "ccl"
    self.image_size = int(trained.config.image_size)
    self.batch_size = batch_size
    self.trained = trained
    self._predict = step.jit_predict(trained.model, trained.encoder)
    self._embed = jax.jit(functools.partial(step.embed, encoder=trained.encoder))

  def embed(self, images: np.ndarray) -> np.ndarray:
    self.check_images(images)
    fn = lambda x: self._embed(None, self.trained.encoder_variables, x)
    return run_batched(fn, self.batch_size, ("embedding",), images)["embedding"]

  def score(self, images: np.ndarray, group_ids: np.ndarray) -> dict[str, np.ndarray]:
    del group_ids  # one model for all classes
    self.check_images(images)
    fn = lambda x: self._predict(self.trained.variables, self.trained.encoder_variables, x)
    return run_batched(fn, self.batch_size, ("anomaly_map", "score"), images)


def model_kind(workdir: str) -> str | None:
  """`model.kind` of a workdir's config.json (None when the config has no such key)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a ccl_jax workdir "
                            "(a training or HierCore run).")
  with open(path) as f:
    config = json.load(f)
  return config.get("model", {}).get("kind")


def load_scorer(workdir: str, *, batch_size: int = 16) -> Scorer:
  """The scorer of a training run (CCL / RD) or of a HierCore fit saved in `workdir`."""
  kind = model_kind(workdir)
  if kind == "hiercore":
    raise NotImplementedError(
        f"{workdir!r} holds a HierCore model (config.json model.kind = 'hiercore'); "
        "scoring HierCore models is not implemented yet.")
  if kind not in (None, "ccl", "rd"):
    raise ValueError(f"{workdir!r}: unknown model.kind {kind!r} in config.json; expected "
                     f"one of {KINDS} (or none, for a CCL / RD training run).")
  return ReverseDistillationScorer(train.load_trained(workdir), batch_size=batch_size)

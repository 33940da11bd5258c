"""The interface every anomaly model implements: `Detector` (embed, score).

  embeddings = detector.embed(images)          # [B, D] routing embeddings
  scores = detector.score(images, group_ids)   # Scores(anomaly_maps [B, S, S], image_scores [B])

`images` are uint8 RGB [B, S, S, 3] (S = `detector.image_size`), numpy or (sharded) jax
arrays; both methods are jitted and work on any batch size (each size compiles once).

The routing embedding is the same for every detector: the frozen encoder's deepest feature
map, averaged over space; groups and routing (`ccl_jax.decisions.grouping`) use it. The
methods implement it: `ccl_jax.ccl.detector` (CCL / RD) and `ccl_jax.hiercore.detector`;
`ccl_jax.runs.loading.load_detector` restores either from a run directory. Decisions,
prediction, scenarios, evaluation and the confusion analysis use only this interface.
"""
from __future__ import annotations

import abc
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccl_jax.deploy.loader import Scores
from ccl_jax.models.frozen import encode


class Router:
  """The frozen encoder's routing embeddings; groups are fitted on them before any model
  exists (HierCore builds one coreset per group)."""

  def __init__(self, encoder: nn.Module, encoder_variables: Any):
    self.encoder = encoder
    self.encoder_variables = encoder_variables

  def embed(self, images: jax.Array) -> jax.Array:
    """Routing embeddings [B, D]: the frozen encoder's deepest map averaged over space."""
    return _jitted_routing_embedding(self.encoder)(self.encoder_variables, images)


class Detector(Router, abc.ABC):
  """A trained anomaly model: routing embeddings and anomaly scores of images."""

  checkpoint_step: int | None = None  # the training step it was restored from, if any

  def __init__(self, name: str, image_size: int, encoder: nn.Module, encoder_variables: Any):
    super().__init__(encoder, encoder_variables)
    self.name = name  # 'ccl' | 'rd' | 'hiercore'
    self.image_size = image_size

  def embed(self, images: jax.Array) -> jax.Array:
    self._check_images(images)
    return super().embed(images)

  def score(self, images: jax.Array, group_ids: jax.Array) -> Scores:
    """Anomaly maps and image scores of uint8 images [B, S, S, 3] in groups `group_ids`
    [B] (ignored by CCL / RD: one model for every class)."""
    self._check_images(images)
    if tuple(group_ids.shape) != (images.shape[0],):
      raise ValueError(f"group_ids must be [{images.shape[0]}], got shape "
                       f"{tuple(group_ids.shape)}.")
    return self._score(images, group_ids)

  @abc.abstractmethod
  def _score(self, images: jax.Array, group_ids: jax.Array) -> Scores:
    """`score` on checked inputs."""

  @abc.abstractmethod
  def _weights(self) -> dict[str, Any]:
    """Every array the model computes with, {'encoder': ..., ...}."""

  @abc.abstractmethod
  def _pure_score(self, arrays: dict[str, Any], images: jax.Array,
                  group_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(anomaly maps, image scores) from `_weights()`-shaped arrays; traceable."""

  def pure_functions(self) -> tuple[list[np.ndarray], Callable, Callable]:
    """(weights, embed, score) for serialising the model (`ccl_jax.export`): the weights as
    a flat list of host arrays, and pure functions of it that compute what `embed` and
    `score` do, embed(weights, images) -> [B, D] and score(weights, images, group_ids) ->
    (anomaly maps [B, S, S], image scores [B]). A flat list, so the serialised functions
    take only arrays, never this package's pytree types."""
    leaves, treedef = jax.tree_util.tree_flatten(self._weights())

    def embed(arrays: list[jax.Array], images: jax.Array) -> jax.Array:
      encoder_variables = jax.tree_util.tree_unflatten(treedef, arrays)["encoder"]
      return routing_embedding(encoder_variables, images, encoder=self.encoder)

    def score(arrays: list[jax.Array], images: jax.Array,
              group_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
      return self._pure_score(jax.tree_util.tree_unflatten(treedef, arrays), images,
                              group_ids)

    return [np.asarray(leaf) for leaf in leaves], embed, score

  def _check_images(self, images: jax.Array) -> None:
    shape = (self.image_size, self.image_size, 3)
    if images.dtype != jnp.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
      raise ValueError(f"{self.name} detector: expected uint8 images [B, {self.image_size}, "
                       f"{self.image_size}, 3], got {images.dtype} {tuple(images.shape)}.")


def routing_embedding(encoder_variables, images: jax.Array, *, encoder: nn.Module) -> jax.Array:
  """Spatial mean of the frozen encoder's deepest feature map, [B, D]."""
  features = encode(encoder, encoder_variables, images)
  return jnp.mean(features[-1], axis=(1, 2))


@functools.lru_cache(maxsize=8)
def _jitted_routing_embedding(encoder: nn.Module):
  return jax.jit(functools.partial(routing_embedding, encoder=encoder))

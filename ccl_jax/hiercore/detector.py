"""The HierCore detector: patch distances to the coreset of each image's group."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from ccl_jax.config.settings import RunSettings
from ccl_jax.hiercore.memory_bank import Excluded, MemoryBank, score_images
from ccl_jax.models.detector import Detector, Scores
from ccl_jax.runtime import inference


class HierCoreDetector(Detector):
  """HierCore: patch distances to the coreset of each image's group."""

  def __init__(self, image_size: int, encoder: nn.Module, encoder_variables: Any,
               bank: MemoryBank, feature_dim: int | None,
               reweight_neighbours: int = 0):
    super().__init__("hiercore", image_size, encoder, encoder_variables)
    self.bank = bank
    self.feature_dim = feature_dim
    self.reweight_neighbours = reweight_neighbours

  def _score(self, images: jax.Array, group_ids: jax.Array,
             excluded: Excluded | None = None) -> Scores:
    outputs = _jitted_hiercore_scores(self.encoder, self.feature_dim, self.reweight_neighbours)(
        self.bank, self.encoder_variables, images, group_ids, excluded=excluded)
    return Scores(outputs["anomaly_map"], outputs["score"])

  def _weights(self) -> dict[str, Any]:
    return {"encoder": self.encoder_variables, "bank": self.bank}

  def score_leaving_out(self, images: jax.Array, group_ids: jax.Array,
                        excluded: Excluded) -> Scores:
    """`score` against the bank without the points `excluded` names per image (a training
    image's own patches: its leave-one-out score)."""
    self._check_images(images)
    return self._score(images, group_ids, excluded)

  def _pure_score(self, arrays, images, group_ids):
    outputs = score_images(arrays["bank"], arrays["encoder"], images, group_ids,
                                    encoder=self.encoder, feature_dim=self.feature_dim,
                                    reweight_neighbours=self.reweight_neighbours)
    return outputs["anomaly_map"], outputs["score"]


@functools.lru_cache(maxsize=8)
def _jitted_hiercore_scores(encoder: nn.Module, feature_dim: int | None,
                            reweight_neighbours: int):
  return jax.jit(functools.partial(score_images, encoder=encoder,
                                   feature_dim=feature_dim,
                                   reweight_neighbours=reweight_neighbours))


def hiercore_detector(run_settings: RunSettings, bank: MemoryBank, encoder: nn.Module,
                      encoder_variables: Any) -> HierCoreDetector:
  return HierCoreDetector(run_settings.image_size, encoder, encoder_variables,
                          jax.device_put(bank, inference.replicated_sharding()),
                          run_settings.hiercore.feature_dim or None,
                          run_settings.hiercore.reweight_neighbours)

"""The CCL / RD detector: the anomaly map of the frozen encoder's features against the
decoder's reconstruction (`ccl_jax.models.anomaly_maps`), one model for every class."""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax.ccl import losses
from ccl_jax.config.settings import RunSettings
from ccl_jax.models import ReverseDistillation, anomaly_maps, encoder_spec
from ccl_jax.models.detector import Detector, Scores
from ccl_jax.models.frozen import encode
from ccl_jax.weights.encoder_weights import frozen_encoder


class ReverseDistillationDetector(Detector):
  """CCL / RD: the anomaly map of the frozen encoder's features against the decoder's,
  times `map_scale` (`model.anomaly_map_scale`)."""

  def __init__(self, name: str, image_size: int, encoder: nn.Module, encoder_variables: Any,
               network: ReverseDistillation, variables: Any, *, map_scale: float = 1.0):
    super().__init__(name, image_size, encoder, encoder_variables)
    self.network = network
    self.variables = variables
    self.map_scale = map_scale

  def outputs(self, images: jax.Array) -> dict[str, jax.Array]:
    """{'anomaly_map', 'score', 'kd'}: maps, image scores and each image's KD loss (the RD
    objective in inference mode, the validation loss)."""
    return _jitted_rd_outputs(self.network, self.encoder, self.map_scale)(self.variables,
                                                          self.encoder_variables, images)

  def _score(self, images: jax.Array, group_ids: jax.Array) -> Scores:
    del group_ids  # one model for every class
    outputs = self.outputs(images)
    return Scores(outputs["anomaly_map"], outputs["score"])

  def _weights(self) -> dict[str, Any]:
    return {"encoder": self.encoder_variables, "network": self.variables}

  def _pure_score(self, arrays, images, group_ids):
    del group_ids  # one model for every class
    outputs = rd_outputs(arrays["network"], arrays["encoder"], images,
                         network=self.network, encoder=self.encoder, map_scale=self.map_scale)
    return outputs["anomaly_map"], outputs["score"]

  def global_embedding(self, images: jax.Array) -> jax.Array:
    """The neck's global embedding [B, D] (the paper's global contrastive loss input)."""
    return _jitted_global_embedding(self.network, self.encoder)(self.variables,
                                                                self.encoder_variables, images)


def rd_outputs(variables, encoder_variables, images: jax.Array, *,
               network: ReverseDistillation, encoder: nn.Module,
               map_scale: float = 1.0) -> dict[str, jax.Array]:
  """Inference on uint8 images [B,H,W,3]: anomaly maps (times `map_scale`), image scores and
  per-image KD loss."""
  features = encode(encoder, encoder_variables, images)
  reconstruction = network.apply(variables, features, train=False)
  maps = map_scale * anomaly_maps.anomaly_map(features, reconstruction, images.shape[1:3])
  return {"anomaly_map": maps, "score": anomaly_maps.image_score(maps),
          "kd": losses.kd_loss(features, reconstruction, per_sample=True)}


# One jitted function per network/encoder, so every pass over a split (training, hold-out,
# test) and every detector of the same architecture share one compilation.
@functools.lru_cache(maxsize=8)
def _jitted_rd_outputs(network: ReverseDistillation, encoder: nn.Module, map_scale: float):
  return jax.jit(functools.partial(rd_outputs, network=network, encoder=encoder,
                                   map_scale=map_scale))


@functools.lru_cache(maxsize=8)
def _jitted_global_embedding(network: ReverseDistillation, encoder: nn.Module):
  def embed(variables, encoder_variables, images):
    features = encode(encoder, encoder_variables, images)
    return network.apply(variables, features, method="global_embedding")
  return jax.jit(embed)


def build_network(run_settings: RunSettings) -> ReverseDistillation:
  """The projector + neck + decoder network the settings describe (not initialised)."""
  spec = encoder_spec(run_settings.model.encoder)
  model = run_settings.model
  return ReverseDistillation(
      spec, use_projector=run_settings.use_projector,
      neck_width_per_group=model.neck_width_per_group or spec.width_per_group,
      decoder_width_per_group=model.decoder_width_per_group or spec.width_per_group,
      noise_probability=model.feature_noise_probability, dtype=jnp.dtype(model.dtype))


def network_template(network: ReverseDistillation, encoder: nn.Module, encoder_variables,
                     image_size: int) -> Any:
  """Shapes and dtypes of the network's variables, {'params', 'batch_stats'}."""
  features = jax.eval_shape(
      lambda v: encode(encoder, v, jnp.zeros((1, image_size, image_size, 3), jnp.uint8)),
      encoder_variables)
  return jax.eval_shape(network.init, jax.random.key(0), features)


def rd_detector(run_settings: RunSettings, encoder: nn.Module, encoder_variables: Any,
                network: ReverseDistillation, variables: Any) -> ReverseDistillationDetector:
  """The CCL / RD detector of the network `variables`, as `run_settings` describe it."""
  return ReverseDistillationDetector(run_settings.model_name, run_settings.image_size, encoder,
                                     encoder_variables, network, variables,
                                     map_scale=run_settings.model.anomaly_map_scale)


def restored_rd_detector(run_settings: RunSettings, sharding,
                         read_variables: Callable[[Any], Any]) -> ReverseDistillationDetector:
  """The detector with the frozen encoder placed with `sharding` and the network variables
  `read_variables(template)` returns (template: their shapes and dtypes)."""
  encoder, encoder_variables = frozen_encoder(run_settings, sharding)
  network = build_network(run_settings)
  template = network_template(network, encoder, encoder_variables, run_settings.image_size)
  return rd_detector(run_settings, encoder, encoder_variables, network,
                     read_variables(template))

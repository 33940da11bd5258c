"""The frozen encoder's features of images, as every model reads them."""
from __future__ import annotations

import flax.linen as nn
import jax

from ccl_jax import augment
from ccl_jax.models import input_normalisation


def encode(encoder: nn.Module, encoder_variables, images: jax.Array):
  """Frozen encoder features of RGB images (uint8, or float in [0, 1]), normalised as the
  encoder's weights expect; no gradient reaches the encoder."""
  mean, std = input_normalisation(encoder)
  features = encoder.apply(encoder_variables, augment.normalize(images, mean, std))
  return tuple(jax.lax.stop_gradient(f) for f in features)

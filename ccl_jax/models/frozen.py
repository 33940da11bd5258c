"""The frozen encoder's features of images, as every model reads them."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax.models import input_normalisation


def encode(encoder: nn.Module, encoder_variables, images: jax.Array):
  """Frozen encoder features of RGB images (uint8, or float in [0, 1]), normalised as the
  encoder's weights expect; no gradient reaches the encoder."""
  mean, std = input_normalisation(encoder)
  features = encoder.apply(encoder_variables, normalize(images, mean, std))
  return tuple(jax.lax.stop_gradient(f) for f in features)


def normalize(images, mean, std) -> jax.Array:
  """Per-channel mean/std normalisation of channels-last RGB; uint8 input is divided by 255
  first. The encoder's (mean, std) come from `input_normalisation`."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  images = images.astype(jnp.float32)
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)

"""Flax modules: frozen encoders and the RD + CCL projector, neck and decoder."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ccl_jax.models.efficientnet import (EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD,
                                         EfficientNetLite0)
from ccl_jax.models.resnet import ENCODERS, EncoderSpec, FeatureMaps, ResNetEncoder, encoder_spec
from ccl_jax.models.reverse_distillation import (AUTHORS_NOISE_PROBABILITY, Decoder, Neck,
                                                 ProjectionHead, Projector, ReverseDistillation,
                                                 TrainingOutputs)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_encoder(name: str, dtype: Any = jnp.float32) -> nn.Module:
  """The frozen encoder module for an `ENCODERS` name; apply(variables, images) returns
  the three feature maps."""
  spec = encoder_spec(name)
  if name == "efficientnet_lite0":
    return EfficientNetLite0(dtype=dtype)
  return ResNetEncoder(spec, dtype=dtype)


def input_normalisation(encoder: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) the encoder's weights expect for RGB images in [0, 1]."""
  if isinstance(encoder, EfficientNetLite0):
    return EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD  # TF-Lite style (x - 0.5) / 0.5
  return IMAGENET_MEAN, IMAGENET_STD


__all__ = [
    "AUTHORS_NOISE_PROBABILITY", "ENCODERS", "Decoder", "EfficientNetLite0", "EncoderSpec",
    "FeatureMaps", "Neck", "ProjectionHead", "Projector", "ResNetEncoder", "ReverseDistillation",
    "TrainingOutputs", "build_encoder", "encoder_spec", "input_normalisation",
]

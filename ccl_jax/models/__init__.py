"""Flax modules: ResNet encoders and the RD + CCL projector, neck and decoder."""
from ccl_jax.models.resnet import ENCODERS, EncoderSpec, FeatureMaps, ResNetEncoder, encoder_spec
from ccl_jax.models.reverse_distillation import (AUTHORS_NOISE_PROBABILITY, Decoder, Neck,
                                                 ProjectionHead, Projector, ReverseDistillation,
                                                 TrainingOutputs)

__all__ = [
    "AUTHORS_NOISE_PROBABILITY", "ENCODERS", "Decoder", "EncoderSpec", "FeatureMaps", "Neck",
    "ProjectionHead", "Projector", "ResNetEncoder", "ReverseDistillation", "TrainingOutputs",
    "encoder_spec",
]

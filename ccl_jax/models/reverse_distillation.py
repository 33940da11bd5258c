"""The trainable part of RD + CCL: projector, one-class bottleneck neck, and decoder.

Data flow (paper Sec. 3.1 and Fig. 2): frozen encoder features -> projector (CCL only) -> neck
(multi-scale fusion + one-class bottleneck) -> decoder, whose three outputs are compared with
the *raw* encoder features by the KD loss and the anomaly map. The global embedding for the
global contrastive loss is the spatial mean of the neck output.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax.models.resnet import (EncoderSpec, FeatureMaps, Stage, batch_norm, conv,
                                   torch_default_init)

# P(N(0, 1) > 0.5): the authors' code draws torch.randn(1) > 0.5 to decide whether to
# perturb the projected features in a training step.
AUTHORS_NOISE_PROBABILITY = 0.3085375387259869


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """InstanceNorm2d without affine parameters: per sample and channel over H, W."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.var(x, axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class ProjectionHead(nn.Module):
  """CCL's projector for one scale: four Conv3x3 -> InstanceNorm -> LeakyReLU blocks.

  Channels go C -> C/2 -> C/4 -> C/2 -> C. Convs are named by their index in the authors'
  `nn.Sequential` ('0', '3', '6', '9') so their checkpoints import by renaming.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.features
    for name, width in zip(("0", "3", "6", "9"), (c // 2, c // 4, c // 2, c)):
      x = conv(width, 3, name=name, dtype=self.dtype, use_bias=True,
               kernel_init=torch_default_init)(x)
      x = nn.leaky_relu(instance_norm(x), negative_slope=0.01)
    return x


class Projector(nn.Module):
  """One ProjectionHead per encoder scale (`proj_a`, `proj_b`, `proj_c` as in the authors' code)."""
  channels: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: FeatureMaps) -> FeatureMaps:
    return tuple(
        ProjectionHead(c, self.dtype, name=f"proj_{'abc'[i]}")(f)
        for i, (c, f) in enumerate(zip(self.channels, features)))


class Neck(nn.Module):
  """RD's multi-scale feature fusion + one-class bottleneck embedding (OCBE / MFF_OCE).

  Scale 1 goes through two stride-2 conv3x3+BN+ReLU, scale 2 through one, both are
  concatenated with scale 3 and compressed by `num_blocks` residual blocks (the first with
  stride 2): e.g. 3072ch@16x16 -> 2048ch@8x8 for wide_resnet50_2.
  """
  spec: EncoderSpec
  width_per_group: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: FeatureMaps, train: bool) -> jax.Array:
    # For a ResNet c = (64e, 128e, 256e), which gives RD4AD's layer sizes exactly.
    c = self.spec.channels
    relu_bn_conv = lambda x, n, f: nn.relu(batch_norm(train, name=f"bn{n}", dtype=self.dtype)(
        conv(f, 3, 2, name=f"conv{n}", dtype=self.dtype)(x)))
    scale1 = relu_bn_conv(relu_bn_conv(features[0], 1, c[1]), 2, c[2])
    scale2 = relu_bn_conv(features[1], 3, c[2])
    fused = jnp.concatenate([scale1, scale2, features[2].astype(scale1.dtype)], axis=-1)
    return Stage(self.spec.block, 2 * c[2] // self.spec.expansion, self.spec.neck_blocks,
                 stride=2, in_features=3 * c[2], width_per_group=self.width_per_group,
                 dtype=self.dtype, name="bn_layer")(fused, train)


class Decoder(nn.Module):
  """RD's student: the encoder's layer1..3 mirrored, upsampling with 2x2 transposed convs.

  Returns three maps with the encoder's shapes, in the encoder's order (highest resolution
  first). For non-ResNet encoders the stages take the encoder's stage channels.
  """
  spec: EncoderSpec
  width_per_group: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bottleneck: jax.Array, train: bool) -> FeatureMaps:
    x = bottleneck
    outputs = []
    e = self.spec.expansion
    in_features = 2 * self.spec.channels[2]
    for i, (channels, num_blocks) in enumerate(zip(self.spec.channels[::-1],
                                                    self.spec.stage_sizes)):
      x = Stage(self.spec.block, channels // e, num_blocks, stride=2, in_features=in_features,
                width_per_group=self.width_per_group, transpose=True, dtype=self.dtype,
                name=f"layer{i + 1}")(x, train)
      in_features = channels
      outputs.append(x)
    return tuple(reversed(outputs))


class TrainingOutputs(NamedTuple):
  """What one training forward pass produces for the losses."""
  projected: FeatureMaps           # projector output, original view (noise included)
  projected_aug: FeatureMaps | None  # projector output, augmented view
  embedding: jax.Array             # [B, D] global embedding, original view
  embedding_aug: jax.Array | None  # [B, D] global embedding, augmented view
  decoder_features: FeatureMaps    # decoder reconstruction of the encoder features


class ReverseDistillation(nn.Module):
  """Projector (optional) + neck + decoder. The frozen encoder is not part of it.

  Attributes:
    spec: the encoder architecture the model sits on.
    use_projector: False gives plain RD (the neck reads the raw encoder features).
    neck_width_per_group: bottleneck width of the neck blocks (RD4AD: the encoder's width,
      128 for wide_resnet50_2; the authors' CCL code: 64).
    decoder_width_per_group: bottleneck width of the decoder blocks (RD4AD: the encoder's).
    noise_probability: chance per training step of adding N(0, 1) noise to the projected
      features at a random half of the positions (the authors' projector regulariser; it
      reaches the neck and the local loss). 0, or no projector, disables it.
  """
  spec: EncoderSpec
  use_projector: bool = True
  neck_width_per_group: int = 64
  decoder_width_per_group: int = 64
  noise_probability: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    if self.use_projector:
      self.projector = Projector(self.spec.channels, self.dtype)
    self.neck = Neck(self.spec, self.neck_width_per_group, self.dtype)
    self.decoder = Decoder(self.spec, self.decoder_width_per_group, self.dtype)

  def project(self, encoder_features: FeatureMaps) -> FeatureMaps:
    return self.projector(encoder_features) if self.use_projector else encoder_features

  def __call__(self, encoder_features: FeatureMaps, train: bool = False) -> FeatureMaps:
    """Inference: decoder features reconstructing `encoder_features`."""
    return self.decoder(self.neck(self.project(encoder_features), train), train)

  def global_embedding(self, encoder_features: FeatureMaps) -> jax.Array:
    """Inference: the global embedding [B, D] (spatial mean of the neck output)."""
    return jnp.mean(self.neck(self.project(encoder_features), False), axis=(1, 2))

  def training_outputs(self, encoder_features: FeatureMaps,
                       encoder_features_aug: FeatureMaps | None,
                       embed_augmented: bool) -> TrainingOutputs:
    """Training forward pass. Needs the 'noise' RNG when noise_probability > 0.

    The projector runs once on both views stacked (InstanceNorm is per sample, so this is
    exact); the neck runs per view so that each view's BatchNorm statistics are its own,
    as in the authors' code. `embed_augmented` skips the neck on the augmented view when
    nothing uses its embedding.
    """
    batch = encoder_features[0].shape[0]
    if encoder_features_aug is None:
      projected, projected_aug = self.project(encoder_features), None
    else:
      both = self.project(tuple(jnp.concatenate([f, g]) for f, g in
                                zip(encoder_features, encoder_features_aug)))
      projected = tuple(p[:batch] for p in both)
      projected_aug = tuple(p[batch:] for p in both)
    if self.use_projector and self.noise_probability > 0:
      projected = self._add_feature_noise(projected)
    bottleneck = self.neck(projected, True)
    embedding_aug = None
    if embed_augmented:
      if projected_aug is None:
        raise ValueError("embed_augmented needs encoder_features_aug.")
      embedding_aug = jnp.mean(self.neck(projected_aug, True), axis=(1, 2))
    return TrainingOutputs(
        projected=projected, projected_aug=projected_aug,
        embedding=jnp.mean(bottleneck, axis=(1, 2)), embedding_aug=embedding_aug,
        decoder_features=self.decoder(bottleneck, True))

  def _add_feature_noise(self, projected: FeatureMaps) -> FeatureMaps:
    key = self.make_rng("noise")
    apply_key, *scale_keys = jax.random.split(key, 1 + len(projected))
    apply = jax.random.uniform(apply_key) < self.noise_probability
    noisy = []
    for f, k in zip(projected, scale_keys):
      noise_key, mask_key = jax.random.split(k)
      noise = jax.random.normal(noise_key, f.shape, f.dtype)
      positions = jax.random.bernoulli(mask_key, 0.5, f.shape[:3] + (1,)).astype(f.dtype)
      noisy.append(jnp.where(apply, f + noise * positions, f))
    return tuple(noisy)

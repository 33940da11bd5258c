"""EfficientNet-Lite0 (ImageNet-pretrained) as a frozen feature encoder.

EfficientNet-Lite0 is EfficientNet-B0 made friendly to mobile accelerators: no
squeeze-excitation, ReLU6 instead of swish, and a stem (3x3 stride-2 conv, 32 channels) and
head (1x1 conv, 1280 channels) that are not scaled. Its body is B0's seven stages of MBConv
blocks (inverted residuals: 1x1 expansion, depthwise kxk, 1x1 linear projection, identity
shortcut when stride and width are unchanged):

  stage  channels  kernel  stride  expansion  blocks   output stride
  1      16        3       1       1          1        2
  2      24        3       2       6          2        4
  3      40        5       2       6          2        8
  4      80        3       2       6          3        16
  5      112       5       1       6          3        16
  6      192       5       2       6          4        32
  7      320       3       1       6          1        32

Conventions, as the pretrained weights expect them (the ImageNet weights were trained in
TensorFlow and converted for the lukemelas-style `efficientnet-lite-pytorch` `EfficientNet`,
whose convolutions reproduce TF's padding):

* padding is TensorFlow 'SAME': total padding `max((ceil(n/s) - 1) * s + k - n, 0)`, the
  smaller half before and the larger half after. Stride-1 convs are therefore padded
  symmetrically (k // 2), but a stride-2 conv on an even-sized input is padded (0, 1) for
  k=3 and (1, 2) for k=5 -- not PyTorch's symmetric k // 2. The padding is written out
  explicitly (`same_padding`) rather than left to a padding string;
* BatchNorm in inference mode with epsilon 1e-3 (TF's default; momentum 0.99);
* inputs in [0, 1] RGB, normalised with `EFFICIENTNET_LITE0_MEAN` / `EFFICIENTNET_LITE0_STD`
  = 0.5 / 0.5, i.e. the official EfficientNet-Lite preprocessing `(pixel - 127) / 128` up
  to 1/255 (see `normalise_images`).

Parameter names are a readable rename of the torch keys (see
`ccl_jax.weights.convert.efficientnet_lite0_variables`): `_conv_stem`/`_bn0` -> `stem_conv`/`stem_bn`,
`_blocks.N` -> `blockN` with `_expand_conv`/`_bn0` -> `expand_conv`/`expand_bn`,
`_depthwise_conv`/`_bn1` -> `depthwise_conv`/`depthwise_bn`, `_project_conv`/`_bn2` ->
`project_conv`/`project_bn`, `_conv_head`/`_bn1` -> `head_conv`/`head_bn`, `_fc` ->
`classifier`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccl_jax.models.resnet import FeatureMaps


@dataclasses.dataclass(frozen=True)
class MBConvStage:
  channels: int
  kernel: int
  stride: int
  expansion: int
  blocks: int


# EfficientNet-B0's stages, which Lite0 (width and depth multipliers 1.0) uses unchanged.
EFFICIENTNET_LITE0_STAGES: tuple[MBConvStage, ...] = (
    MBConvStage(16, 3, 1, 1, 1),
    MBConvStage(24, 3, 2, 6, 2),
    MBConvStage(40, 5, 2, 6, 2),
    MBConvStage(80, 3, 2, 6, 3),
    MBConvStage(112, 5, 1, 6, 3),
    MBConvStage(192, 5, 2, 6, 4),
    MBConvStage(320, 3, 1, 6, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Flax convention (TF's); torch's momentum 0.01

# Feature maps handed to Reverse Distillation: the last block of the 24-, 40- and
# 112-channel stages (indices into EFFICIENTNET_LITE0_STAGES).
FEATURE_STAGES = (1, 2, 4)
EFFICIENTNET_LITE0_CHANNELS = (24, 40, 112)
EFFICIENTNET_LITE0_STRIDES = (4, 8, 16)

# Input normalisation the pretrained weights expect, for RGB images scaled to [0, 1]:
# (x - mean) / std. This is TF EfficientNet-Lite's (pixel - 127) / 128 up to 1/255.
EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)


def input_normalisation() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
  """(mean, std) per RGB channel for [0, 1] images, as the pretrained weights expect."""
  return EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD


def normalise_images(images: Any) -> Any:
  """[..., 3] RGB images in [0, 1] -> the network's input scale (works on numpy and jax)."""
  mean = np.asarray(EFFICIENTNET_LITE0_MEAN, np.float32)
  std = np.asarray(EFFICIENTNET_LITE0_STD, np.float32)
  return (images - mean) / std


def block_layout() -> list[tuple[int, MBConvStage, int, int]]:
  """One entry per MBConv block, in torch's `_blocks.N` order:
  (block index, stage, input channels, stride)."""
  layout = []
  in_channels = STEM_CHANNELS
  for stage in EFFICIENTNET_LITE0_STAGES:
    for i in range(stage.blocks):
      layout.append((len(layout), stage, in_channels, stage.stride if i == 0 else 1))
      in_channels = stage.channels
  return layout


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding (before, after) of one spatial axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0, 6)


def _conv_layer(features: int, kernel: int, stride: int, name: str, dtype: Any, *,
                depthwise: bool = False):
  """A padded conv whose parameters sit directly under `name` (`name/kernel`)."""

  def apply(x: jax.Array) -> jax.Array:
    pads = tuple(same_padding(n, kernel, stride) for n in x.shape[1:3])
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pads,
                   use_bias=False, feature_group_count=x.shape[-1] if depthwise else 1,
                   dtype=dtype,
                   kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   name=name)(x)

  return apply


def _bn(name: str, dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      dtype=dtype, name=name)


class MBConv(nn.Module):
  """Inverted residual: [1x1 expand + BN + ReLU6] -> depthwise kxk + BN + ReLU6 -> 1x1
  project + BN (linear), plus the identity when stride is 1 and the width is unchanged."""
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  expansion: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = self.in_channels * self.expansion
    y = x
    if self.expansion != 1:
      y = _conv_layer(hidden, 1, 1, "expand_conv", self.dtype)(y)
      y = relu6(_bn("expand_bn", self.dtype)(y))
    y = _conv_layer(hidden, self.kernel, self.stride, "depthwise_conv", self.dtype,
                    depthwise=True)(y)
    y = relu6(_bn("depthwise_bn", self.dtype)(y))
    y = _conv_layer(self.out_channels, 1, 1, "project_conv", self.dtype)(y)
    y = _bn("project_bn", self.dtype)(y)
    if self.stride == 1 and self.in_channels == self.out_channels:
      y = y + x
    return y


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 with inference-mode BatchNorm (the frozen RD teacher).

  Input: RGB images [B, H, W, 3] normalised with `normalise_images`. With
  `features_only=True` (the default, the encoder interface of `ResNetEncoder`) returns
  the outputs of the last block of the 24-, 40- and 112-channel stages, at strides 4, 8
  and 16 (64x64x24, 32x32x40, 16x16x112 for a 256x256 input). Those are the last
  feature maps at each of the strides RD's decoder reconstructs (the ResNet
  layer1..layer3 counterparts): stage 4 (80 channels) also has stride 16 but stage 5
  refines it further at the same resolution, and the stride-32 stages are left out as
  RD leaves out layer4. (They are also the maps timm's EfficientNet `features_only`
  reports at reductions 4, 8, 16.) The computation stops after stage 5. With
  `features_only=False` returns ImageNet logits [B, 1000] (head 1x1 conv + BN + ReLU6,
  global average pool, fully-connected layer; dropout is a no-op at inference).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, features_only: bool = True
               ) -> FeatureMaps | jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"Encoder expects images [B, H, W, 3], got shape {images.shape}.")
    x = _conv_layer(STEM_CHANNELS, 3, 2, "stem_conv", self.dtype)(images.astype(self.dtype))
    x = relu6(_bn("stem_bn", self.dtype)(x))
    features = []
    block, in_channels = 0, STEM_CHANNELS
    for stage_index, stage in enumerate(EFFICIENTNET_LITE0_STAGES):
      for i in range(stage.blocks):  # named as block_layout() lists them
        x = MBConv(in_channels, stage.channels, stage.kernel, stage.stride if i == 0 else 1,
                   stage.expansion, self.dtype, name=f"block{block}")(x)
        block, in_channels = block + 1, stage.channels
      if stage_index in FEATURE_STAGES:
        features.append(x)
        if features_only and stage_index == FEATURE_STAGES[-1]:
          return tuple(features)
    x = _conv_layer(HEAD_CHANNELS, 1, 1, "head_conv", self.dtype)(x)
    x = relu6(_bn("head_bn", self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(NUM_CLASSES, dtype=self.dtype, name="classifier")(x)


def feature_channels() -> tuple[int, int, int]:
  """Channels of the three feature maps (24, 40, 112)."""
  return EFFICIENTNET_LITE0_CHANNELS


__all__ = [
    "EFFICIENTNET_LITE0_CHANNELS", "EFFICIENTNET_LITE0_MEAN", "EFFICIENTNET_LITE0_STD",
    "EFFICIENTNET_LITE0_STRIDES", "EfficientNetLite0", "MBConv", "block_layout",
    "feature_channels", "input_normalisation", "normalise_images", "same_padding",
]

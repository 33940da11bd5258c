"""ResNet encoders (the frozen teacher) and the residual blocks shared with the decoder.

Parameter trees mirror torchvision's state-dict names (`conv1`, `bn1`, `layer1/0/conv1`,
`layer1/0/downsample/0`, ...), so importing ImageNet weights is a rename plus a kernel
transpose, never a rewrite. Padding is written out explicitly because Flax's 'SAME' pads
stride-2 convolutions asymmetrically while PyTorch pads symmetrically.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax.models import conv as conv_lib

# Three feature maps, highest resolution first (the encoder's layer1..layer3 order).
FeatureMaps = tuple[jax.Array, ...]

BlockKind = Literal["basic", "bottleneck"]

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'), as torchvision does.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default Conv2d init (kaiming_uniform with a=sqrt(5)) for layers torchvision leaves alone.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """What the neck and decoder need to know about an encoder architecture.

  For a ResNet the decoder mirrors the encoder (same block kind and stage sizes). For other
  encoders (`stage_channels` given) the neck and decoder are built from the encoder's stage
  channels with the block kind and depths named here.
  """
  block: BlockKind
  stage_sizes: tuple[int, ...]  # blocks in layer1..layer3 (layer4 is never used by RD)
  width_per_group: int
  neck_blocks: int  # RD4AD's bottleneck depth for this encoder
  stage_channels: tuple[int, int, int] | None = None  # None: the ResNet's 64e, 128e, 256e

  @property
  def expansion(self) -> int:
    return 4 if self.block == "bottleneck" else 1

  @property
  def channels(self) -> tuple[int, int, int]:
    if self.stage_channels is not None:
      return self.stage_channels
    e = self.expansion
    return (64 * e, 128 * e, 256 * e)

  @property
  def strides(self) -> tuple[int, int, int]:
    return (4, 8, 16)


ENCODERS: dict[str, EncoderSpec] = {
    "resnet18": EncoderSpec("basic", (2, 2, 2), 64, neck_blocks=2),
    "resnet34": EncoderSpec("basic", (3, 4, 6), 64, neck_blocks=3),
    "resnet50": EncoderSpec("bottleneck", (3, 4, 6), 64, neck_blocks=3),
    "wide_resnet50_2": EncoderSpec("bottleneck", (3, 4, 6), 128, neck_blocks=3),
    # Not a ResNet: the neck and a BasicBlock decoder are built from its stage channels.
    "efficientnet_lite0": EncoderSpec("basic", (2, 2, 2), 64, neck_blocks=2,
                                      stage_channels=(24, 40, 112)),
}


def encoder_spec(name: str) -> EncoderSpec:
  if name not in ENCODERS:
    raise ValueError(f"Unknown encoder {name!r}; expected one of {sorted(ENCODERS)}.")
  return ENCODERS[name]


def conv(features: int, kernel: int, stride: int = 1, *, name: str, dtype: Any,
         use_bias: bool = False, kernel_init=conv_init) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                 kernel_init=kernel_init, conv_general_dilated=conv_lib.conv_general_dilated,
                 name=name)


class Deconv2x2(nn.Module):
  """PyTorch's ConvTranspose2d(kernel 2, stride 2, no bias), written as one matmul.

  Stride equal to the kernel means the output windows never overlap: output pixel
  (2i+a, 2j+b) is input pixel (i, j) times the kernel tap (a, b). An einsum followed by a
  depth-to-space reshape computes exactly that, and its gradients are plain matmuls too.
  The same layer as `lax.conv_transpose` has a weight gradient that XLA:CPU lowers to a
  direct convolution 9x to 59x slower than the matmul (`python -m benchmarks.deconv`).

  The kernel is [2, 2, out, in], the layout of flax's ConvTranspose with
  transpose_kernel=True, so a torch weight [in, out, kh, kw] maps to it by a plain
  transpose and checkpoints of either form load unchanged.
  """
  features: int
  dtype: Any = jnp.float32
  kernel_init: Any = torch_default_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (2, 2, self.features, x.shape[-1]),
                        jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    b, h, w, _ = x.shape
    y = jnp.einsum("bijc,deoc->bidjeo", x, kernel)
    return y.reshape(b, 2 * h, 2 * w, self.features)


def batch_norm(train: bool, *, name: str, dtype: Any, scale_init=nn.initializers.ones):
  # PyTorch defaults: eps 1e-5, running statistics updated with momentum 0.1.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      scale_init=scale_init, name=name)


class _ResidualModule(nn.Module, kw_only=True):
  """The attributes every residual module below shares.

  `transpose`: RD's decoder variant, upsampling with Deconv2x2 where the encoder's stride-2
  convolutions (and their 1x1 shortcut) downsample. `dtype`: the compute dtype.
  Keyword-only: inherited fields come first and these have defaults, so the subclasses'
  required fields could not follow them positionally.
  """
  transpose: bool = False
  dtype: Any = jnp.float32


class Shortcut(_ResidualModule):
  """torchvision's `downsample` (conv1x1 + BN) or RD's `upsample` (Deconv2x2 + BN) branch."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.transpose:
      x = Deconv2x2(self.features, self.dtype, name="0")(x)
    else:
      x = conv(self.features, 1, self.stride, name="0", dtype=self.dtype)(x)
    return batch_norm(train, name="1", dtype=self.dtype)(x)


class BasicBlock(_ResidualModule):
  """ResNet BasicBlock; with `transpose` the stride-2 conv becomes RD's Deconv2x2 upsampling."""
  planes: int
  stride: int = 1
  shortcut: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.transpose and self.stride == 2:
      y = Deconv2x2(self.planes, self.dtype, name="conv1")(x)
    else:
      y = conv(self.planes, 3, self.stride, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(y))
    y = conv(self.planes, 3, name="conv2", dtype=self.dtype)(y)
    y = batch_norm(train, name="bn2", dtype=self.dtype)(y)
    if self.shortcut:
      x = Shortcut(self.planes, self.stride, transpose=self.transpose, dtype=self.dtype,
                   name="upsample" if self.transpose else "downsample")(x, train)
    return nn.relu(y + x)


class Bottleneck(_ResidualModule):
  """ResNet v1.5 Bottleneck (stride on the 3x3 conv); `transpose` as in BasicBlock."""
  planes: int
  stride: int = 1
  shortcut: bool = False
  width_per_group: int = 64
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = int(self.planes * (self.width_per_group / 64.0))
    y = conv(width, 1, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(y))
    if self.transpose and self.stride == 2:
      y = Deconv2x2(width, self.dtype, name="conv2")(y)
    else:
      y = conv(width, 3, self.stride, name="conv2", dtype=self.dtype)(y)
    y = nn.relu(batch_norm(train, name="bn2", dtype=self.dtype)(y))
    y = conv(self.planes * self.expansion, 1, name="conv3", dtype=self.dtype)(y)
    y = batch_norm(train, name="bn3", dtype=self.dtype)(y)
    if self.shortcut:
      x = Shortcut(self.planes * self.expansion, self.stride, transpose=self.transpose,
                   dtype=self.dtype,
                   name="upsample" if self.transpose else "downsample")(x, train)
    return nn.relu(y + x)


class Stage(_ResidualModule):
  """One `layerN` of a ResNet: blocks named '0', '1', ... as in torchvision.

  `in_features` is the input channel count: torchvision adds the shortcut projection
  whenever the stride or the channel count changes, and so do we.
  """
  block: BlockKind
  planes: int
  num_blocks: int
  stride: int
  in_features: int
  width_per_group: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    expansion = 4 if self.block == "bottleneck" else 1
    needs_shortcut = self.stride != 1 or self.in_features != self.planes * expansion
    for i in range(self.num_blocks):
      kwargs = dict(planes=self.planes, stride=self.stride if i == 0 else 1,
                    shortcut=needs_shortcut and i == 0, transpose=self.transpose,
                    dtype=self.dtype, name=str(i))
      if self.block == "bottleneck":
        x = Bottleneck(width_per_group=self.width_per_group, **kwargs)(x, train)
      else:
        x = BasicBlock(**kwargs)(x, train)
    return x


class ResNetEncoder(nn.Module):
  """The frozen ImageNet teacher: stem + layer1..layer3, BatchNorm in inference mode.

  Input: normalised images [B, H, W, 3]. Output: the three stage outputs at strides
  4, 8 and 16 (e.g. 256/512/1024 channels for wide_resnet50_2).
  """
  spec: EncoderSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> FeatureMaps:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"Encoder expects images [B, H, W, 3], got shape {images.shape}.")
    x = conv(64, 7, 2, name="conv1", dtype=self.dtype)(images.astype(self.dtype))
    x = nn.relu(batch_norm(False, name="bn1", dtype=self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = []
    in_features = 64
    for i, (planes, num_blocks) in enumerate(zip((64, 128, 256), self.spec.stage_sizes)):
      x = Stage(self.spec.block, planes, num_blocks, stride=1 if i == 0 else 2,
                in_features=in_features, width_per_group=self.spec.width_per_group,
                dtype=self.dtype, name=f"layer{i + 1}")(x, train=False)
      in_features = planes * self.spec.expansion
      features.append(x)
    return tuple(features)

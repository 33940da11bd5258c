"""Eager PyTorch (NCHW) RD + CCL model, for benchmarking and parity checks against ccl_jax.

Module and parameter names are the ones the authors' `RDLGC` state dict uses
(`net_t` / `proj_layer.proj_{a,b,c}.proj.{0,3,6,9}` / `mff_oce` / `net_s`, torchvision names
inside), so `model.state_dict()` imports into ccl_jax through `ccl_jax.weights.convert` unchanged.
The architecture hyperparameters (block kind, stage sizes, widths) come from
`ccl_jax.models.encoder_spec`, so both frameworks build the same network; everything else is
written here independently of the JAX code.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ccl_jax.models import encoder_spec
from ccl_jax.models.resnet import EncoderSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The authors' CCL code builds the neck (MFF_OCE) with timm Bottlenecks of base width 64,
# whatever the encoder's width.
NECK_WIDTH_PER_GROUP = 64


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 1, stride, bias=False)


def _deconv2x2(cin: int, cout: int) -> nn.ConvTranspose2d:
  return nn.ConvTranspose2d(cin, cout, 2, 2, bias=False)


class BasicBlock(nn.Module):
  """torchvision BasicBlock; `transpose` turns the stride-2 conv into RD's deconv2x2."""
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, shortcut: nn.Module | None,
               width_per_group: int = 64, transpose: bool = False):
    super().__init__()
    del width_per_group  # basic blocks have no bottleneck width
    self.conv1 = (_deconv2x2(cin, planes) if transpose and stride == 2
                  else _conv3x3(cin, planes, stride))
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    # The shortcut's attribute name is part of the state-dict layout: torchvision's
    # `downsample` in encoders and the neck, RD's `upsample` in the decoder.
    setattr(self, "upsample" if transpose else "downsample", shortcut)
    self._shortcut_name = "upsample" if transpose else "downsample"

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = getattr(self, self._shortcut_name)
    return F.relu(y + (x if shortcut is None else shortcut(x)))


class Bottleneck(nn.Module):
  """torchvision/timm Bottleneck v1.5 (stride on the 3x3 conv); `transpose` as BasicBlock."""
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, shortcut: nn.Module | None,
               width_per_group: int = 64, transpose: bool = False):
    super().__init__()
    width = int(planes * (width_per_group / 64.0))
    self.conv1 = _conv1x1(cin, width)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = (_deconv2x2(width, width) if transpose and stride == 2
                  else _conv3x3(width, width, stride))
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = _conv1x1(width, planes * 4)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    setattr(self, "upsample" if transpose else "downsample", shortcut)
    self._shortcut_name = "upsample" if transpose else "downsample"

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = getattr(self, self._shortcut_name)
    return F.relu(y + (x if shortcut is None else shortcut(x)))


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(kind: str, cin: int, planes: int, num_blocks: int, stride: int,
               width_per_group: int, transpose: bool = False) -> nn.Sequential:
  """One `layerN`: the shortcut projection appears whenever stride or channels change."""
  block = _BLOCKS[kind]
  cout = planes * block.expansion
  shortcut = None
  if stride != 1 or cin != cout:
    conv = _deconv2x2(cin, cout) if transpose else _conv1x1(cin, cout, stride)
    shortcut = nn.Sequential(conv, nn.BatchNorm2d(cout))
  blocks = [block(cin, planes, stride, shortcut, width_per_group, transpose)]
  blocks += [block(cout, planes, 1, None, width_per_group, transpose)
             for _ in range(1, num_blocks)]
  return nn.Sequential(*blocks)


def _init_resnet(module: nn.Module) -> None:
  """torchvision's init: kaiming-normal (fan_out) convs, BatchNorm weight 1 and bias 0."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


class ResNetEncoder(nn.Module):
  """torchvision ResNet stem + layer1..3 (layer4 and fc are never used by RD)."""

  def __init__(self, spec: EncoderSpec):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256), spec.stage_sizes)):
      setattr(self, f"layer{i + 1}", make_stage(spec.block, cin, planes, blocks,
                                                1 if i == 0 else 2, spec.width_per_group))
      cin = planes * spec.expansion
    _init_resnet(self)

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    f1 = self.layer1(x)
    f2 = self.layer2(f1)
    return [f1, f2, self.layer3(f2)]


class ProjLayer(nn.Module):
  """CCL projector for one scale: 4 x (Conv3x3 with bias -> InstanceNorm -> LeakyReLU)."""

  def __init__(self, c: int):
    super().__init__()
    layers = []
    for cin, cout in ((c, c // 2), (c // 2, c // 4), (c // 4, c // 2), (c // 2, c)):
      layers += [nn.Conv2d(cin, cout, 3, 1, padding=1), nn.InstanceNorm2d(cout),
                 nn.LeakyReLU(0.01)]
    self.proj = nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x)


class MultiProjectionLayer(nn.Module):
  def __init__(self, channels: Sequence[int]):
    super().__init__()
    self.proj_a, self.proj_b, self.proj_c = (ProjLayer(c) for c in channels)

  def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [self.proj_a(features[0]), self.proj_b(features[1]), self.proj_c(features[2])]


class MFFOCE(nn.Module):
  """RD's multi-scale fusion + one-class bottleneck (the authors' `MFF_OCE`)."""

  def __init__(self, spec: EncoderSpec):
    super().__init__()
    c0, c1, c2 = spec.channels
    self.conv1 = _conv3x3(c0, c1, 2)
    self.bn1 = nn.BatchNorm2d(c1)
    self.conv2 = _conv3x3(c1, c2, 2)
    self.bn2 = nn.BatchNorm2d(c2)
    self.conv3 = _conv3x3(c1, c2, 2)
    self.bn3 = nn.BatchNorm2d(c2)
    self.bn_layer = make_stage(spec.block, 3 * c2, 2 * c2 // spec.expansion, spec.neck_blocks,
                               2, NECK_WIDTH_PER_GROUP)
    _init_resnet(self)

  def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
    l1 = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x[0]))))))
    l2 = F.relu(self.bn3(self.conv3(x[1])))
    return self.bn_layer(torch.cat([l1, l2, x[2]], 1))


class DeResNet(nn.Module):
  """RD's decoder (`de_resnet*`): layer1..3 upsample 2x each with deconv2x2 blocks and return
  the maps highest resolution first, like the encoder."""

  def __init__(self, spec: EncoderSpec):
    super().__init__()
    cin = 2 * spec.channels[2]
    for i, (channels, blocks) in enumerate(zip(spec.channels[::-1], spec.stage_sizes)):
      setattr(self, f"layer{i + 1}", make_stage(spec.block, cin, channels // spec.expansion,
                                                blocks, 2, spec.width_per_group,
                                                transpose=True))
      cin = channels
    _init_resnet(self)

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    a = self.layer1(x)
    b = self.layer2(a)
    return [self.layer3(b), b, a]


class RDCCL(nn.Module):
  """Frozen teacher `net_t` + projector + neck + decoder, named like the authors' RDLGC.

  `train()` keeps the teacher in eval mode with frozen parameters, as the authors' model does.
  """

  def __init__(self, encoder: str):
    super().__init__()
    spec = encoder_spec(encoder)
    if spec.stage_channels is not None:
      raise ValueError(f"The PyTorch reference builds ResNet encoders only; {encoder} is not one.")
    self.spec = spec
    self.encoder_name = encoder
    self.net_t = ResNetEncoder(spec)
    self.proj_layer = MultiProjectionLayer(spec.channels)
    self.mff_oce = MFFOCE(spec)
    self.net_s = DeResNet(spec)
    for p in self.net_t.parameters():
      p.requires_grad_(False)
    self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
    self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

  def train(self, mode: bool = True) -> "RDCCL":
    super().train(mode)
    self.net_t.eval()
    return self

  def normalise(self, images01: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of images in [0, 1], in float32 whatever the model's dtype, as
    ccl_jax's frozen.normalize.

    The values are not bit-identical to ccl_jax's: XLA rewrites a division by a constant into
    a multiplication by its float32 reciprocal (and fuses the /255 into the same loop), so
    about half the inputs differ by an ulp. Parity tests that need identical inputs (the
    float64 gradient comparison) replace this method on the instance with ccl_jax's values.
    """
    return (images01.float() - self.mean.float()) / self.std.float()

  def encode(self, images01: torch.Tensor) -> list[torch.Tensor]:
    """Teacher features of images in [0, 1] (normalised by `normalise`), without gradient."""
    x = self.normalise(images01)
    with torch.no_grad():
      return [f.detach() for f in self.net_t(x.to(self.mean.dtype))]

  def trainable_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(projector parameters, neck + decoder parameters): the two learning-rate groups."""
    return (list(self.proj_layer.parameters()),
            list(self.mff_oce.parameters()) + list(self.net_s.parameters()))

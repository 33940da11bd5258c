"""Locally aware patch features (PatchCore's, from the frozen RD encoders).

Design (HierCore's abstract names only a hierarchical coreset memory bank; the patch
features follow PatchCore, Roth et al. 2022, which HierCore's name points to):

* Scales: the encoders return (layer1, layer2, layer3) at strides 4, 8, 16. PatchCore uses
  the two middle ResNet stages, layer2 + layer3 (= our features[1], features[2]): layer1 is
  too generic and ImageNet-biased deeper stages are dropped. For efficientnet_lite0 the same
  positions are its stride-8 (40 ch) and stride-16 (112 ch) stages.
* Neighbourhood aggregation: a 3x3 local average (stride 1) of each map, so a patch feature
  describes its neighbourhood without losing resolution. Border windows average only the
  in-image neighbours (PatchCore zero-pads, which darkens border patches; excluding the
  padding keeps border features on the same scale as interior ones).
* Resolution: the stride-16 map is resized to the stride-8 grid with the bilinear
  (align_corners=True) matrices of `ccl_jax.models.anomaly_maps`, then the two are concatenated along
  channels: [B, H/8, W/8, C2 + C3].
* Optional reduction (`feature_dim`): each scale is reduced to `feature_dim // 2` channels by
  adaptive average pooling over contiguous channel bins (PatchCore's parameter-free
  reduction, as torch.nn.functional.adaptive_avg_pool1d), so both scales weigh equally.
  Default None keeps all channels (resnet18: 384, efficientnet_lite0: 152,
  wide_resnet50_2: 1536); PatchCore reduces wide_resnet50_2 to 1024.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccl_jax.models import anomaly_maps
from ccl_jax.models.frozen import encode

PATCH_SCALES = (1, 2)  # indices into the encoder's (layer1, layer2, layer3)


@functools.lru_cache(maxsize=32)
def _channel_pooling(num_in: int, num_out: int) -> np.ndarray:
  """[num_in, num_out] matrix of adaptive_avg_pool1d: output j averages input channels
  floor(j * n / m) .. ceil((j + 1) * n / m) - 1."""
  matrix = np.zeros((num_in, num_out), np.float32)
  for j in range(num_out):
    start = (j * num_in) // num_out
    end = -(-((j + 1) * num_in) // num_out)
    matrix[start:end, j] = 1.0 / (end - start)
  return matrix


def _local_average(feature_map: jax.Array) -> jax.Array:
  """3x3 mean over the in-image neighbours of every position of [B, h, w, C]."""
  window, strides, padding = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(feature_map, 0.0, jax.lax.add, window, strides, padding)
  ones = jnp.ones((1,) + feature_map.shape[1:3] + (1,), feature_map.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, padding)
  return total / count


def patch_features(encoder: nn.Module, encoder_variables, images_uint8: jax.Array, *,
                   feature_dim: int | None = None) -> jax.Array:
  """Patch features [B, h, w, C] float32 of uint8 images [B, H, W, 3] (h, w = H/8, W/8
  rounded as the encoder does; C as in the module docstring). Jittable."""
  if feature_dim is not None and (feature_dim < 2 or feature_dim % 2):
    raise ValueError(f"feature_dim must be an even number >= 2 or None, got {feature_dim}.")
  features = encode(encoder, encoder_variables, images_uint8)
  fine, coarse = (_local_average(features[i].astype(jnp.float32)) for i in PATCH_SCALES)
  height, width = fine.shape[1:3]
  op_h = anomaly_maps.upsample_matrix(coarse.shape[1], height).astype(np.float32)
  op_w = anomaly_maps.upsample_matrix(coarse.shape[2], width).astype(np.float32)
  coarse = jnp.einsum("Hh,bhwc,Ww->bHWc", op_h, coarse, op_w,
                      precision=jax.lax.Precision.HIGHEST)
  if feature_dim is not None:
    fine, coarse = (jnp.dot(x, _channel_pooling(x.shape[-1], feature_dim // 2),
                            precision=jax.lax.Precision.HIGHEST) for x in (fine, coarse))
  return jnp.concatenate([fine, coarse], axis=-1)


def make_patch_fn(encoder: nn.Module, encoder_variables, *,
                  feature_dim: int | None = None) -> Callable[[jax.Array], jax.Array]:
  """A jitted `images_uint8 -> patch features` for `build_memory_bank`; the encoder
  variables are passed as an argument (not baked into the program as constants)."""
  fn = jax.jit(functools.partial(patch_features, encoder, feature_dim=feature_dim))
  return lambda images: fn(encoder_variables, images)

"""The CCL "augmented view", computed on device from an RNG key.

Reimplements, in JAX, the torchvision pipeline the CCL authors apply to the already-resized
image (float RGB in [0, 1], channels last):

  RandomResizedCrop(S, scale=(0.8, 1.0), ratio=(3/4, 4/3))
  -> RandomHorizontalFlip(0.5) -> RandomVerticalFlip(0.5)
  -> ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
  -> RandomGrayscale(0.2)
  -> GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))
  -> RandomRotation(15)   (NEAREST, fill 0, about the centre, no expand)

Every op is a small pure function on ONE image `[H, W, 3]` (`resized_crop`, `hflip`, `vflip`,
`adjust_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`, `rgb_to_grayscale`,
`gaussian_blur`, `rotate`). `sample_params` draws the random parameters of one image from a key
(torchvision's `get_params` logic, vectorised); `apply_params` runs the pipeline; `augment_batch`
vmaps both over the batch with one key per image, so images never share parameters and there is
no Python loop over images. Everything is jittable for a static image size.

Data-dependent choices (flip or not, grayscale or not, the jitter order) are evaluated both ways
and selected with `jnp.where`: under vmap they differ per image, so a real branch is impossible.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ITU-R 601-2 luma transform (PIL's convert("L"); torchvision's tensor path uses 0.2989).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

# Order of the ColorJitter ops, as in torchvision's `fn_idx` (a permutation of these indices).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges of the augmented view; the defaults are the CCL authors' settings.

  Frozen (hashable) so it can be a static argument of `jax.jit`.
  """
  crop_scale: tuple[float, float] = (0.8, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  crop_tries: int = 10  # torchvision retries 10 times before the central-crop fallback
  hflip_p: float = 0.5
  vflip_p: float = 0.5
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1
  grayscale_p: float = 0.2
  blur_kernel_size: int = 23
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  rotation_degrees: float = 15.0


DEFAULT_CONFIG = AugmentConfig()


class AugParams(NamedTuple):
  """Random parameters of one image (a pytree; batched along axis 0 after vmap)."""
  crop_box: jax.Array  # int32 [4]: top, left, height, width (pixels)
  hflip: jax.Array  # bool []
  vflip: jax.Array  # bool []
  jitter_order: jax.Array  # int32 [4]: permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE
  brightness: jax.Array  # float32 [] multiplicative factor
  contrast: jax.Array  # float32 [] blend factor
  saturation: jax.Array  # float32 [] blend factor
  hue: jax.Array  # float32 [] hue shift, in turns
  grayscale: jax.Array  # bool []
  blur_sigma: jax.Array  # float32 []
  angle: jax.Array  # float32 [] degrees, positive = counter-clockwise


# ----------------------------------------------------------------------------- geometry


def _bilinear_taps(out_size: int, start, length):
  """torch `upsample_bilinear2d(align_corners=False)` source taps for a 1-D crop resize."""
  length = jnp.asarray(length, jnp.float32)
  start = jnp.asarray(start, jnp.float32)
  dst = jnp.arange(out_size, dtype=jnp.float32)
  src = jnp.maximum((dst + 0.5) * (length / out_size) - 0.5, 0.0)
  i0 = jnp.floor(src)
  lam = src - i0
  i1 = jnp.minimum(i0 + 1.0, length - 1.0)
  return (i0 + start).astype(jnp.int32), (i1 + start).astype(jnp.int32), lam


def resized_crop(img: jax.Array, box, size: tuple[int, int] | None = None) -> jax.Array:
  """Crop `box` = (top, left, height, width) and resize it bilinearly to `size` (default: input).

  Bilinear resampling follows torch's `align_corners=False` convention. The box must lie inside
  the image (as torchvision's RandomResizedCrop guarantees); it may be traced.
  """
  out_h, out_w = size if size is not None else img.shape[:2]
  top, left, height, width = (box[i] for i in range(4))
  y0, y1, ly = _bilinear_taps(out_h, top, height)
  x0, x1, lx = _bilinear_taps(out_w, left, width)
  ly = ly[:, None, None]
  lx = lx[None, :, None]
  rows = img[y0] * (1.0 - ly) + img[y1] * ly  # [out_h, W, C]
  return rows[:, x0] * (1.0 - lx) + rows[:, x1] * lx


def _antialiased_weights(out_size: int, in_size: int, start, length) -> jax.Array:
  """[out_size, in_size] weights of PIL's bilinear resize of the crop [start, start +
  length) to out_size: a triangle filter stretched by the downscale factor (antialiasing),
  pixels outside the crop weighted 0, each row normalised."""
  length = jnp.asarray(length, jnp.float32)
  start = jnp.asarray(start, jnp.float32)
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixel = jnp.arange(in_size, dtype=jnp.float32)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixel[None, :] + 0.5 - centre[:, None]) / support)
  weights = jnp.where((pixel >= start) & (pixel < start + length), weights, 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def antialiased_resized_crop(img: jax.Array, box, size: tuple[int, int]) -> jax.Array:
  """Crop `box` = (top, left, height, width) of a larger image and resize it to `size` as
  torchvision's RandomResizedCrop does on a PIL image (PIL's antialiased bilinear), which
  is how the authors cut the augmented view from the full-resolution file."""
  wy = _antialiased_weights(size[0], img.shape[0], box[0], box[2])
  wx = _antialiased_weights(size[1], img.shape[1], box[1], box[3])
  return jnp.einsum("oh,hwc,pw->opc", wy, img, wx, precision=jax.lax.Precision.HIGHEST)


def hflip(img: jax.Array) -> jax.Array:
  """Mirror left-right."""
  return img[:, ::-1]


def vflip(img: jax.Array) -> jax.Array:
  """Mirror top-bottom."""
  return img[::-1]


def rotate(img: jax.Array, angle) -> jax.Array:
  """Rotate by `angle` degrees counter-clockwise about the image centre (torchvision sense).

  Nearest-neighbour sampling (round half to even, like grid_sample), fill 0 outside, same size.
  Matches torchvision's tensor `rotate`: output pixel centres, taken relative to the centre
  ((W-1)/2, (H-1)/2), are mapped back with the inverse rotation.
  """
  h, w = img.shape[:2]
  theta = jnp.deg2rad(jnp.asarray(angle, jnp.float32))
  c, s = jnp.cos(theta), jnp.sin(theta)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  y = jnp.arange(h, dtype=jnp.float32)[:, None] - cy
  x = jnp.arange(w, dtype=jnp.float32)[None, :] - cx
  src_x = c * x - s * y + cx
  src_y = s * x + c * y + cy
  ix = jnp.round(src_x).astype(jnp.int32)
  iy = jnp.round(src_y).astype(jnp.int32)
  inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  out = img[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
  return jnp.where(inside[..., None], out, jnp.zeros_like(out))


# ----------------------------------------------------------------------------- colour


def rgb_to_grayscale(img: jax.Array) -> jax.Array:
  """Luma `[H, W, 1]` with the ITU-R 601-2 weights."""
  wr, wg, wb = GRAY_WEIGHTS
  return (wr * img[..., 0:1] + wg * img[..., 1:2] + wb * img[..., 2:3]).astype(img.dtype)


def to_grayscale(img: jax.Array) -> jax.Array:
  """Grayscale replicated to three channels (RandomGrayscale's output)."""
  return jnp.broadcast_to(rgb_to_grayscale(img), img.shape)


def _blend(img: jax.Array, other, factor) -> jax.Array:
  return jnp.clip(factor * img + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(img: jax.Array, factor) -> jax.Array:
  """Multiply by `factor`, clip to [0, 1]."""
  return _blend(img, 0.0, factor)


def adjust_contrast(img: jax.Array, factor) -> jax.Array:
  """Blend with the mean of the grayscale image, clip to [0, 1]."""
  return _blend(img, jnp.mean(rgb_to_grayscale(img)), factor)


def adjust_saturation(img: jax.Array, factor) -> jax.Array:
  """Blend with the grayscale image, clip to [0, 1]."""
  return _blend(img, rgb_to_grayscale(img), factor)


def _rgb_to_hsv(img: jax.Array) -> jax.Array:
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc = jnp.max(img, axis=-1)
  minc = jnp.min(img, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  ones = jnp.ones_like(maxc)
  s = cr / jnp.where(eqc, ones, maxc)
  cr_div = jnp.where(eqc, ones, cr)
  rc = (maxc - r) / cr_div
  gc = (maxc - g) / cr_div
  bc = (maxc - b) / cr_div
  is_r = maxc == r
  is_g = (maxc == g) & ~is_r
  is_b = ~is_r & ~is_g
  h = (jnp.where(is_r, bc - gc, 0.0) + jnp.where(is_g, 2.0 + rc - bc, 0.0)
       + jnp.where(is_b, 4.0 + gc - rc, 0.0))
  h = jnp.fmod(h / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i.astype(jnp.int32), 6)
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
  g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
  b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(img: jax.Array, delta) -> jax.Array:
  """Rotate the hue by `delta` turns (in [-0.5, 0.5]) in HSV space."""
  hsv = _rgb_to_hsv(img)
  h = jnp.mod(hsv[..., 0] + delta, 1.0)
  return _hsv_to_rgb(jnp.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))


def color_jitter(img: jax.Array, order, brightness, contrast, saturation, hue) -> jax.Array:
  """ColorJitter's four ops applied in the (possibly traced) permutation `order`.

  The cheap blends are selected per step; the hue shift, the only costly op, is computed once:
  blends ranked before it, then the hue shift, then the blends ranked after it.
  """
  order = jnp.asarray(order, jnp.int32)
  hue_pos = jnp.argmax(order == HUE)

  def blend_step(x, op):
    cands = [adjust_brightness(x, brightness), adjust_contrast(x, contrast),
             adjust_saturation(x, saturation)]
    return jnp.select([op == BRIGHTNESS, op == CONTRAST, op == SATURATION], cands, x)

  for k in range(4):
    img = jnp.where(k < hue_pos, blend_step(img, order[k]), img)
  img = adjust_hue(img, hue)
  for k in range(4):
    img = jnp.where(k > hue_pos, blend_step(img, order[k]), img)
  return img


# ----------------------------------------------------------------------------- blur


def gaussian_kernel1d(kernel_size: int, sigma) -> jax.Array:
  """torchvision's `_get_gaussian_kernel1d`: taps at -(k-1)/2 .. (k-1)/2, normalised to sum 1."""
  half = (kernel_size - 1) * 0.5
  x = jnp.linspace(-half, half, kernel_size, dtype=jnp.float32)
  pdf = jnp.exp(-0.5 * jnp.square(x / jnp.asarray(sigma, jnp.float32)))
  return pdf / jnp.sum(pdf)


def _reflect_indices(n: int, pad: int) -> np.ndarray:
  """Source indices of reflect padding (edge not repeated: torch 'reflect', scipy 'mirror')."""
  idx = np.arange(-pad, n + pad)
  if n == 1:
    return np.zeros_like(idx)
  period = 2 * (n - 1)
  idx = np.mod(idx, period)
  return np.where(idx >= n, period - idx, idx)


def _correlate_axis(img: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
  k = kernel.shape[0]
  pad = (k - 1) // 2
  n = img.shape[axis]
  padded = jnp.take(img, jnp.asarray(_reflect_indices(n, pad)), axis=axis)
  out = jnp.zeros_like(img)
  for t in range(k):
    out = out + kernel[t] * jax.lax.slice_in_dim(padded, t, t + n, axis=axis)
  return out


def gaussian_blur(img: jax.Array, sigma, kernel_size: int = 23) -> jax.Array:
  """Separable Gaussian blur with reflect padding (torchvision GaussianBlur on a tensor)."""
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be odd, got {kernel_size}")
  kernel = gaussian_kernel1d(kernel_size, sigma)
  return _correlate_axis(_correlate_axis(img, kernel, 0), kernel, 1)


# ----------------------------------------------------------------------------- sampling


def _sample_crop_box(key, height: int, width: int, scale, ratio, tries: int) -> jax.Array:
  """RandomResizedCrop.get_params with `tries` vectorised attempts; the first valid one wins."""
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = float(height * width)
  target = area * jax.random.uniform(k_area, (tries,), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (tries,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)
  w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(valid)
  w, h = w[first], h[first]
  top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1)).astype(jnp.int32)
  top = jnp.clip(top, 0, height - h)
  left = jnp.clip(left, 0, width - w)

  # Central-crop fallback (static: depends on the image size only).
  in_ratio = width / height
  if in_ratio < min(ratio):
    fw, fh = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fh, fw = height, int(round(height * max(ratio)))
  else:
    fw, fh = width, height
  fallback = jnp.asarray([(height - fh) // 2, (width - fw) // 2, fh, fw], jnp.int32)
  box = jnp.stack([top, left, h, w]).astype(jnp.int32)
  return jnp.where(jnp.any(valid), box, fallback)


def _factor_range(x: float) -> tuple[float, float]:
  return max(0.0, 1.0 - x), 1.0 + x


def sample_params(key, height: int, width: int,
                  config: AugmentConfig = DEFAULT_CONFIG) -> AugParams:
  """Draw the random parameters of one image (torchvision's `get_params` distributions)."""
  keys = jax.random.split(key, 11)
  u = lambda k, lo, hi: jax.random.uniform(k, (), jnp.float32, lo, hi)
  return AugParams(
      crop_box=_sample_crop_box(keys[0], height, width, config.crop_scale, config.crop_ratio,
                                config.crop_tries),
      hflip=jax.random.uniform(keys[1]) < config.hflip_p,
      vflip=jax.random.uniform(keys[2]) < config.vflip_p,
      jitter_order=jax.random.permutation(keys[3], 4).astype(jnp.int32),
      brightness=u(keys[4], *_factor_range(config.brightness)),
      contrast=u(keys[5], *_factor_range(config.contrast)),
      saturation=u(keys[6], *_factor_range(config.saturation)),
      hue=u(keys[7], -config.hue, config.hue),
      grayscale=jax.random.uniform(keys[8]) < config.grayscale_p,
      blur_sigma=u(keys[9], *config.blur_sigma),
      angle=u(keys[10], -config.rotation_degrees, config.rotation_degrees),
  )


# ----------------------------------------------------------------------------- pipeline


def apply_params(img: jax.Array, params: AugParams, config: AugmentConfig = DEFAULT_CONFIG,
                 size: tuple[int, int] | None = None) -> jax.Array:
  """Run the augmentation pipeline on one `[H, W, 3]` image with fixed parameters; with
  `size`, the crop of the (larger) image is resized to `size` with antialiasing."""
  img = img.astype(jnp.float32)
  if size is None:
    img = resized_crop(img, params.crop_box)
  else:
    img = antialiased_resized_crop(img, params.crop_box, size)
  img = jnp.where(params.hflip, hflip(img), img)
  img = jnp.where(params.vflip, vflip(img), img)
  img = color_jitter(img, params.jitter_order, params.brightness, params.contrast,
                     params.saturation, params.hue)
  img = jnp.where(params.grayscale, to_grayscale(img), img)
  img = gaussian_blur(img, params.blur_sigma, config.blur_kernel_size)
  img = rotate(img, params.angle)
  return jnp.clip(img, 0.0, 1.0)


def sample_batch_params(key, batch: int, height: int, width: int,
                        config: AugmentConfig = DEFAULT_CONFIG) -> AugParams:
  """Independent parameters for each of `batch` images (the ones `augment_batch` uses)."""
  keys = jax.random.split(key, batch)
  return jax.vmap(lambda k: sample_params(k, height, width, config))(keys)


@functools.partial(jax.jit, static_argnames=("config", "size"))
def augment_batch(key, images: jax.Array, config: AugmentConfig = DEFAULT_CONFIG,
                  size: tuple[int, int] | None = None) -> jax.Array:
  """Augmented views of `images` float32 `[B, H, W, 3]` in [0, 1]; same shape/dtype, in [0, 1].

  Deterministic for a key; each image gets its own parameters (one split key per image).
  `size`: the views' (smaller) size when `images` are the larger source images they are
  cut from; the crop box is drawn on the source, as RandomResizedCrop on the full file.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected [B, H, W, 3] images, got shape {images.shape}")
  b, h, w, _ = images.shape
  params = sample_batch_params(key, b, h, w, config)
  out = jax.vmap(lambda im, p: apply_params(im, p, config, size))(images, params)
  return out.astype(images.dtype) if jnp.issubdtype(images.dtype, jnp.floating) else out

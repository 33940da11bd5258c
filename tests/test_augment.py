"""Tests for ccl_jax.ccl.augment against independent numpy / scipy / PIL / colorsys references."""
import colorsys
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ccl_jax.ccl import augment as A
from ccl_jax import models
from ccl_jax.models import frozen

S = 32  # image size used by the pipeline tests (> 11, so 23-tap reflect padding is valid)


def _rand_img(seed, h=S, w=S):
  return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def _np_gray(img):
  return 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


# ----------------------------------------------------------------------------- colour ops


@pytest.mark.parametrize("f", [0.0, 0.6, 1.0, 1.4, 2.5])
def test_brightness_matches_formula(f):
  img = _rand_img(0)
  out = np.asarray(A.adjust_brightness(jnp.asarray(img), f))
  np.testing.assert_allclose(out, np.clip(img * f, 0, 1), atol=1e-6)


@pytest.mark.parametrize("f", [0.0, 0.6, 1.0, 1.4, 3.0])
def test_contrast_matches_formula(f):
  img = _rand_img(1)
  mean = _np_gray(img).mean()
  out = np.asarray(A.adjust_contrast(jnp.asarray(img), f))
  np.testing.assert_allclose(out, np.clip(f * img + (1 - f) * mean, 0, 1), atol=1e-6)


@pytest.mark.parametrize("f", [0.0, 0.6, 1.0, 1.4, 3.0])
def test_saturation_matches_formula(f):
  img = _rand_img(2)
  gray = _np_gray(img)[..., None]
  out = np.asarray(A.adjust_saturation(jnp.asarray(img), f))
  np.testing.assert_allclose(out, np.clip(f * img + (1 - f) * gray, 0, 1), atol=1e-6)


@pytest.mark.parametrize("delta", [-0.5, -0.1, -0.037, 0.0, 0.05, 0.1, 0.5])
def test_hue_matches_colorsys(delta):
  rng = np.random.default_rng(3)
  img = rng.random((6, 7, 3), dtype=np.float32)
  # Edge cases: grays, black, white, primaries, ties between max channels.
  img[0, :7] = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                [0.8, 0.8, 0.2]]
  img[1, :3] = [[0.2, 0.8, 0.8], [0.8, 0.2, 0.8], [0.3, 0.3, 0.9]]
  ref = np.empty_like(img)
  for i in range(img.shape[0]):
    for j in range(img.shape[1]):
      h, s, v = colorsys.rgb_to_hsv(*img[i, j].astype(np.float64))
      ref[i, j] = colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
  out = np.asarray(A.adjust_hue(jnp.asarray(img), delta))
  np.testing.assert_allclose(out, ref, atol=1e-4)


def test_grayscale_weights():
  prim = jnp.asarray([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]], jnp.float32)
  np.testing.assert_allclose(np.asarray(A.rgb_to_grayscale(prim))[0, :, 0],
                             [0.299, 0.587, 0.114], atol=1e-7)
  img = _rand_img(4)
  out = np.asarray(A.to_grayscale(jnp.asarray(img)))
  assert out.shape == img.shape
  for c in range(3):
    np.testing.assert_allclose(out[..., c], _np_gray(img), atol=1e-6)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)])
def test_color_jitter_applies_ops_in_given_order(order):
  img = jnp.asarray(_rand_img(5, 12, 10))
  b, c, s, h = 1.3, 0.7, 1.35, 0.08
  ops = {0: lambda x: A.adjust_brightness(x, b), 1: lambda x: A.adjust_contrast(x, c),
         2: lambda x: A.adjust_saturation(x, s), 3: lambda x: A.adjust_hue(x, h)}
  ref = img
  for op in order:
    ref = ops[op](ref)
  out = A.color_jitter(img, jnp.asarray(order), b, c, s, h)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)


# ----------------------------------------------------------------------------- blur


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_scipy_mirror(sigma):
  img = _rand_img(6, 24, 20)
  x = np.linspace(-11, 11, 23)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  k /= k.sum()
  ref = ndimage.correlate1d(img.astype(np.float64), k, axis=0, mode="mirror")
  ref = ndimage.correlate1d(ref, k, axis=1, mode="mirror")
  out = np.asarray(A.gaussian_blur(jnp.asarray(img), sigma, 23))
  np.testing.assert_allclose(out, ref, atol=2e-6)


def test_blur_kernel_is_normalised_and_tiny_sigma_is_identity():
  k = np.asarray(A.gaussian_kernel1d(23, 1.3))
  assert k.shape == (23,) and abs(k.sum() - 1) < 1e-6 and np.allclose(k, k[::-1])
  img = _rand_img(7)
  np.testing.assert_allclose(np.asarray(A.gaussian_blur(jnp.asarray(img), 0.1)), img, atol=1e-6)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("n", [16, 15])
def test_rotate_right_angles_match_rot90(n):
  img = _rand_img(8, n, n)
  for angle, k in [(90, 1), (-90, -1), (180, 2), (270, 3), (0, 0)]:
    out = np.asarray(A.rotate(jnp.asarray(img), float(angle)))
    # np.rot90(k=1) turns the picture counter-clockwise, torchvision's positive direction.
    np.testing.assert_array_equal(out, np.rot90(img, k))


def test_rotate_15_zero_fill_and_matches_pil():
  img = np.ones((S, S, 3), np.float32)
  out = np.asarray(A.rotate(jnp.asarray(img), 15.0))
  for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
    assert np.all(out[corner] == 0)
  assert np.all(out[S // 2 - 4:S // 2 + 4, S // 2 - 4:S // 2 + 4] == 1)
  # Content check against PIL (counter-clockwise, centre, nearest, fill 0); allow rare ties.
  rng = np.random.default_rng(9)
  u8 = rng.integers(1, 256, (S, S), dtype=np.uint8)
  ref = np.asarray(Image.fromarray(u8).rotate(15.0, resample=Image.NEAREST)).astype(np.float32)
  src = np.repeat(u8[..., None].astype(np.float32), 3, axis=-1)
  got = np.asarray(A.rotate(jnp.asarray(src), 15.0))[..., 0]
  assert np.mean(got != ref) < 0.02


def test_flips():
  img = _rand_img(10, 9, 11)
  np.testing.assert_array_equal(np.asarray(A.hflip(jnp.asarray(img))), np.fliplr(img))
  np.testing.assert_array_equal(np.asarray(A.vflip(jnp.asarray(img))), np.flipud(img))


def _np_bilinear_crop(img, top, left, h, w, out_h, out_w):
  """torch upsample_bilinear2d(align_corners=False) on img[top:top+h, left:left+w]."""
  crop = img[top:top + h, left:left + w].astype(np.float64)
  out = np.zeros((out_h, out_w, img.shape[2]))
  for oy in range(out_h):
    sy = max((oy + 0.5) * h / out_h - 0.5, 0.0)
    y0 = int(sy)
    y1 = min(y0 + 1, h - 1)
    ly = sy - y0
    for ox in range(out_w):
      sx = max((ox + 0.5) * w / out_w - 0.5, 0.0)
      x0 = int(sx)
      x1 = min(x0 + 1, w - 1)
      lx = sx - x0
      out[oy, ox] = ((1 - ly) * ((1 - lx) * crop[y0, x0] + lx * crop[y0, x1])
                     + ly * ((1 - lx) * crop[y1, x0] + lx * crop[y1, x1]))
  return out


def test_resized_crop_full_box_is_identity():
  img = _rand_img(11, 20, 24)
  out = A.resized_crop(jnp.asarray(img), jnp.asarray([0, 0, 20, 24]))
  np.testing.assert_allclose(np.asarray(out), img, atol=1e-7)


@pytest.mark.parametrize("box", [(0, 0, 10, 12), (5, 7, 10, 12), (3, 1, 17, 13)])
def test_resized_crop_matches_numpy_bilinear(box):
  img = _rand_img(12, 20, 24)
  out = np.asarray(A.resized_crop(jnp.asarray(img), jnp.asarray(box)))
  np.testing.assert_allclose(out, _np_bilinear_crop(img, *box, 20, 24), atol=1e-5)


def test_resized_crop_half_box_matches_pil_upsampling():
  # PIL's bilinear upsampling coincides with torch's align_corners=False convention.
  img = _rand_img(13, 16, 16)
  out = np.asarray(A.resized_crop(jnp.asarray(img), jnp.asarray([4, 2, 8, 8])))
  for c in range(3):
    ref = Image.fromarray(img[4:12, 2:10, c], mode="F").resize((16, 16), Image.BILINEAR)
    np.testing.assert_allclose(out[..., c], np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("box", [(5, 7, 80, 70), (0, 0, 96, 96), (10, 20, 30, 50)])
def test_antialiased_resized_crop_matches_pil(box):
  # torchvision's RandomResizedCrop on a PIL image: crop, then PIL's bilinear resize, which
  # antialiases when it shrinks (PIL rounds to uint8 after each of its two passes: <= 1
  # level).
  img = np.random.default_rng(4).integers(0, 256, (96, 96, 3), dtype=np.uint8)
  top, left, height, width = box
  expected = np.asarray(Image.fromarray(img).crop((left, top, left + width, top + height))
                        .resize((40, 40), Image.Resampling.BILINEAR), np.float32)
  got = A.antialiased_resized_crop(jnp.asarray(img, jnp.float32), jnp.asarray(box), (40, 40))
  assert np.abs(np.asarray(got) - expected).max() <= 1.001


def test_augment_batch_from_larger_sources_draws_the_crop_on_the_source():
  images = jnp.asarray(np.random.default_rng(5).random((3, 64, 64, 3)), jnp.float32)
  key = jax.random.key(9)
  views = A.augment_batch(key, images, size=(32, 32))
  assert views.shape == (3, 32, 32, 3)
  params = A.sample_batch_params(key, 3, 64, 64)
  assert int(jnp.min(params.crop_box[:, 2])) > 32  # crop boxes in source pixels
  expected = jax.vmap(lambda im, p: A.apply_params(im, p, size=(32, 32)))(images, params)
  np.testing.assert_allclose(views, expected, atol=1e-6)


def test_normalize_with_the_resnet_encoders_imagenet_statistics():
  u8 = np.random.default_rng(14).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  ref = (u8 / 255.0 - mean) / std
  stats = models.input_normalisation(models.build_encoder("resnet18"))
  out_u8 = frozen.normalize(u8, *stats)
  out_f = frozen.normalize(u8.astype(np.float32) / 255.0, *stats)
  assert out_u8.dtype == jnp.float32 and out_f.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out_u8), ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out_f), ref, atol=1e-5)



def test_imagenet_statistics_are_defined_once():
  # Two copies could drift apart; ccl_jax.models owns the encoders' input normalisation.
  package = pathlib.Path(models.__file__).parents[1]
  defining = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                    if "0.485, 0.456, 0.406" in p.read_text())
  assert defining == ["models/__init__.py"]

# ----------------------------------------------------------------------------- pipeline


def test_identity_params_give_identity():
  img = _rand_img(15)
  p = A.AugParams(crop_box=jnp.asarray([0, 0, S, S]), hflip=jnp.asarray(False),
                  vflip=jnp.asarray(False), jitter_order=jnp.asarray([3, 1, 0, 2]),
                  brightness=jnp.float32(1), contrast=jnp.float32(1), saturation=jnp.float32(1),
                  hue=jnp.float32(0), grayscale=jnp.asarray(False), blur_sigma=jnp.float32(0.1),
                  angle=jnp.float32(0))
  np.testing.assert_allclose(np.asarray(A.apply_params(jnp.asarray(img), p)), img, atol=1e-5)


def test_apply_params_composes_ops_in_pipeline_order():
  img = jnp.asarray(_rand_img(16))
  p = A.sample_params(jax.random.key(3), S, S)
  p = p._replace(hflip=jnp.asarray(True), vflip=jnp.asarray(True), grayscale=jnp.asarray(True))
  ref = A.resized_crop(img, p.crop_box)
  ref = A.vflip(A.hflip(ref))
  ref = A.color_jitter(ref, p.jitter_order, p.brightness, p.contrast, p.saturation, p.hue)
  ref = A.to_grayscale(ref)
  ref = A.rotate(A.gaussian_blur(ref, p.blur_sigma), p.angle)
  np.testing.assert_allclose(np.asarray(A.apply_params(img, p)), np.asarray(ref), atol=1e-6)


@pytest.fixture(scope="module")
def batch():
  return jnp.asarray(np.stack([_rand_img(20 + i) for i in range(4)]))


def test_augment_batch_shape_dtype_range_determinism(batch):
  out1 = A.augment_batch(jax.random.key(0), batch)
  out2 = A.augment_batch(jax.random.key(0), batch)
  out3 = A.augment_batch(jax.random.key(1), batch)
  assert out1.shape == batch.shape and out1.dtype == jnp.float32
  o = np.asarray(out1)
  assert np.isfinite(o).all() and o.min() >= 0.0 and o.max() <= 1.0
  np.testing.assert_array_equal(o, np.asarray(out2))
  assert not np.allclose(o, np.asarray(out3))
  assert not np.allclose(o, np.asarray(batch))


def test_augment_batch_per_image_independence():
  img = _rand_img(30)
  same = jnp.asarray(np.stack([img, img, img]))
  out = np.asarray(A.augment_batch(jax.random.key(7), same))
  assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])
  # ... and each image's view is exactly the one its own split key draws.
  keys = jax.random.split(jax.random.key(7), 3)
  for i in range(3):
    single = np.asarray(A.apply_params(jnp.asarray(img), A.sample_params(
        keys[i], img.shape[0], img.shape[1], A.DEFAULT_CONFIG), A.DEFAULT_CONFIG))
    np.testing.assert_allclose(out[i], single, atol=1e-6)


def test_augment_batch_under_outer_jit(batch):
  f = jax.jit(lambda k, x: A.augment_batch(k, x))
  out = np.asarray(f(jax.random.key(5), batch))
  assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
  np.testing.assert_allclose(out, np.asarray(A.augment_batch(jax.random.key(5), batch)),
                             atol=1e-6)
  # Extreme inputs (all black / all white / a constant gray) stay finite.
  ext = jnp.asarray(np.stack([np.zeros((S, S, 3)), np.ones((S, S, 3)),
                              np.full((S, S, 3), 0.5), _rand_img(31)]).astype(np.float32))
  out = np.asarray(f(jax.random.key(6), ext))
  assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def _torchvision_crop_boxes(rng, n, size, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)):
  """RandomResizedCrop.get_params, transcribed as a Python loop (square images)."""
  boxes = []
  for _ in range(n):
    for _ in range(10):
      target = size * size * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
      w = int(round(math.sqrt(target * aspect)))
      h = int(round(math.sqrt(target / aspect)))
      if 0 < w <= size and 0 < h <= size:
        boxes.append((rng.integers(0, size - h + 1), rng.integers(0, size - w + 1), h, w))
        break
    else:
      boxes.append((0, 0, size, size))
  return np.asarray(boxes, np.float64)


def test_sampled_parameter_statistics():
  n, size = 20000, 224
  p = jax.jit(lambda k: A.sample_batch_params(k, n, size, size))(jax.random.key(42))
  p = jax.tree.map(np.asarray, p)
  tol = 4 * math.sqrt(0.25 / n)  # 4 sigma of a Bernoulli fraction
  assert abs(p.grayscale.mean() - 0.2) < tol
  assert abs(p.hflip.mean() - 0.5) < tol and abs(p.vflip.mean() - 0.5) < tol
  for name in ("brightness", "contrast", "saturation"):
    v = getattr(p, name)
    assert v.min() >= 0.6 and v.max() <= 1.4 and v.min() < 0.61 and v.max() > 1.39
    assert abs(v.mean() - 1.0) < 0.01
  assert p.hue.min() >= -0.1 and p.hue.max() <= 0.1 and abs(p.hue.mean()) < 0.003
  assert p.blur_sigma.min() >= 0.1 and p.blur_sigma.max() <= 2.0
  assert abs(p.blur_sigma.mean() - 1.05) < 0.02
  assert p.angle.min() >= -15 and p.angle.max() <= 15 and abs(p.angle.mean()) < 0.3
  assert p.angle.min() < -14.9 and p.angle.max() > 14.9
  # Jitter order: always a permutation, hue equally likely at each position.
  np.testing.assert_array_equal(np.sort(p.jitter_order, axis=1), np.tile(np.arange(4), (n, 1)))
  hue_pos = np.argmax(p.jitter_order == A.HUE, axis=1)
  np.testing.assert_allclose(np.bincount(hue_pos, minlength=4) / n, 0.25, atol=tol)
  # Crop boxes: inside the image, area fraction and aspect ratio in range (up to rounding).
  top, left, h, w = p.crop_box.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= size).all() and (left + w <= size).all()
  frac = h * w / size**2
  ratio = w / h
  full = (h == size) & (w == size)
  sampled = ~full  # full boxes can also be the central-crop fallback
  assert frac.min() > 0.8 - 0.02 and frac.max() <= 1.0
  assert ratio[sampled].min() > 0.75 - 0.02 and ratio[sampled].max() < 4 / 3 + 0.02
  assert full.mean() < 0.01  # the fallback is rare with 10 tries
  # Same distribution as torchvision's sequential retry loop (simulated in numpy).
  ref = _torchvision_crop_boxes(np.random.default_rng(0), n, size)
  ref_frac = ref[:, 2] * ref[:, 3] / size**2
  assert abs(frac.mean() - ref_frac.mean()) < 0.003
  assert abs(frac.std() - ref_frac.std()) < 0.003
  assert abs(ratio.mean() - (ref[:, 3] / ref[:, 2]).mean()) < 0.005
  # Crop position uniform over the valid range: mean of top / (size - h) near 0.5.
  slack = size - h
  rel = top[slack > 0] / slack[slack > 0]
  assert abs(rel.mean() - 0.5) < 0.02

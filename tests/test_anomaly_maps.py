"""Anomaly maps against scipy's blur and an align_corners=True bilinear reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from ccl_jax.models import anomaly_maps


def bilinear_align_corners(x, out_h, out_w):
  """Reference resize of one 2-D map, pixel by pixel (PyTorch align_corners=True)."""
  h, w = x.shape
  out = np.zeros((out_h, out_w))
  for i in range(out_h):
    for j in range(out_w):
      y = i * (h - 1) / (out_h - 1)
      xx = j * (w - 1) / (out_w - 1)
      y0, x0 = min(int(np.floor(y)), h - 2), min(int(np.floor(xx)), w - 2)
      dy, dx = y - y0, xx - x0
      out[i, j] = ((1 - dy) * (1 - dx) * x[y0, x0] + (1 - dy) * dx * x[y0, x0 + 1]
                   + dy * (1 - dx) * x[y0 + 1, x0] + dy * dx * x[y0 + 1, x0 + 1])
  return out


def _cos_distance(e, d):
  return 1 - np.sum(e * d, -1) / (np.linalg.norm(e, axis=-1) * np.linalg.norm(d, axis=-1))


def test_upsampling_matches_align_corners_reference():
  rng = np.random.default_rng(0)
  enc = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
  dec = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
  got = np.asarray(anomaly_maps.anomaly_map([enc], [dec], (20, 23), blur=False))
  distance = _cos_distance(enc, dec)
  want = np.stack([bilinear_align_corners(m, 20, 23) for m in distance])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_full_map_matches_scipy_blur_of_summed_upsampled_distances():
  rng = np.random.default_rng(1)
  sizes = [(16, 16, 8), (8, 8, 16), (4, 4, 32)]
  enc = [rng.normal(size=(2,) + s).astype(np.float32) for s in sizes]
  dec = [rng.normal(size=(2,) + s).astype(np.float32) for s in sizes]
  got = np.asarray(anomaly_maps.anomaly_map(enc, dec, 64))
  for b in range(2):
    summed = sum(bilinear_align_corners(_cos_distance(e[b], d[b]), 64, 64)
                 for e, d in zip(enc, dec))
    want = scipy.ndimage.gaussian_filter(summed, sigma=4)  # 33 taps, mode='reflect'
    np.testing.assert_allclose(got[b], want, atol=1e-5)


def test_blur_matrix_handles_signals_shorter_than_the_kernel():
  x = np.random.default_rng(2).random(7)
  np.testing.assert_allclose(anomaly_maps.blur_matrix(7) @ x, scipy.ndimage.gaussian_filter1d(x, 4),
                             atol=1e-12)


def test_anomaly_map_is_jittable_and_image_score_is_max():
  rng = np.random.default_rng(3)
  enc = [jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32)]
  dec = [jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32)]
  maps = jax.jit(anomaly_maps.anomaly_map, static_argnums=2)(enc, dec, 32)
  assert maps.shape == (3, 32, 32) and maps.dtype == jnp.float32
  np.testing.assert_allclose(anomaly_maps.image_score(maps), np.max(np.asarray(maps), axis=(1, 2)))
  identical = anomaly_maps.anomaly_map(enc, enc, 32)
  np.testing.assert_allclose(identical, 0.0, atol=1e-5)


def test_anomaly_map_rejects_bad_input():
  a = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="per scale"):
    anomaly_maps.anomaly_map([a, a], [a], 16)
  with pytest.raises(ValueError, match="same shape"):
    anomaly_maps.anomaly_map([a], [jnp.zeros((1, 4, 4, 3))], 16)
  with pytest.raises(ValueError, match="image_size"):
    anomaly_maps.anomaly_map([a], [a], (16, 16, 3))
  with pytest.raises(ValueError, match=r"\[B, H, W\]"):
    anomaly_maps.image_score(jnp.zeros((4, 4)))

"""Heatmap figures: input image | image with ground-truth contour | anomaly-map overlay."""
from __future__ import annotations

import numpy as np
import scipy.ndimage

# Anchor colours of a perceptually ordered blue -> cyan -> yellow -> red map.
_COLORMAP_ANCHORS = np.array([[0, 0, 128], [0, 96, 255], [0, 224, 224], [255, 230, 0],
                              [255, 64, 0], [160, 0, 0]], np.float64)


def colorize(values: np.ndarray, low: float, high: float) -> np.ndarray:
  """Float map -> uint8 RGB, `low`/`high` mapped to the ends of the colour map."""
  t = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0) * (len(_COLORMAP_ANCHORS) - 1)
  i = np.minimum(np.floor(t).astype(int), len(_COLORMAP_ANCHORS) - 2)
  f = (t - i)[..., None]
  return np.round((1 - f) * _COLORMAP_ANCHORS[i] + f * _COLORMAP_ANCHORS[i + 1]).astype(np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
  """Boundary pixels of a binary mask (8-connected inner border)."""
  mask = mask.astype(bool)
  return mask & ~scipy.ndimage.binary_erosion(mask, structure=np.ones((3, 3)))


def heatmap_figure(image: np.ndarray, mask: np.ndarray, anomaly_map: np.ndarray,
                   low: float, high: float) -> np.ndarray:
  """[H, 3W, 3] uint8 panel. `low`/`high` fix the colour scale so that figures of one
  class are comparable (use the class's score range, not each image's own)."""
  image = image.astype(np.uint8)
  with_contour = image.copy()
  with_contour[contour(mask)] = (255, 0, 0)
  overlay = (0.5 * image + 0.5 * colorize(anomaly_map, low, high)).astype(np.uint8)
  return np.concatenate([image, with_contour, overlay], axis=1)

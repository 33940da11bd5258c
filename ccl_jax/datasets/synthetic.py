"""Procedural multi-class anomaly-detection dataset in MVTec AD layout.

This is the project's built-in default dataset: small, deterministic, needing
no download. It mixes four texture classes and three object classes, each with
realistic normal variation (pose, lighting, colour, sensor noise) and two or
three defect types with pixel-exact masks:

=========  =======  =============================================
class      kind     defect types
=========  =======  =============================================
carpet     texture  hole, stain, thread
grid       texture  broken, contamination
wood       texture  scratch, hole, color
tile       texture  crack, oil, glue
washer     object   scratch, cut, contamination
chip       object   missing_pin, bent_pin, scratch
capsule    object   crack, poke, faulty_color
=========  =======  =============================================

Layout written by :func:`generate` (identical to MVTec AD)::

    <root>/<class>/train/good/000.png ...
    <root>/<class>/test/good/000.png ...
    <root>/<class>/test/<defect>/000.png ...
    <root>/<class>/ground_truth/<defect>/000_mask.png   (L, values 0/255)

Mask exactness: a defect is rendered by compositing defect content over the
clean image inside a region ``M``; pixels outside ``M`` are copied from the
clean image bit for bit, and every pixel inside ``M`` is forced to differ from
the clean image by at least ``MIN_CONTRAST`` grey levels in every channel
where the blend alone changed it less. Hence ``mask == (defective != clean)
.any(-1)`` holds exactly, which :func:`render` lets callers check.

Everything is derived from ``numpy.random.default_rng([seed, class, split,
index])`` so each image is reproducible on its own, independent of counts.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "CLASS_NAMES",
    "DEFECT_TYPES",
    "MARKER_NAME",
    "MIN_CONTRAST",
    "SyntheticDatasetError",
    "generate",
    "render",
]

#: Bumped whenever the rendered pixels change, so stale datasets are detected.
GENERATOR_VERSION = 1
MARKER_NAME = ".ccl_synthetic_complete.json"
#: Minimum per-channel change (grey levels) of a pixel inside a defect mask.
MIN_CONTRAST = 10

_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}


class SyntheticDatasetError(ValueError):
  """The target directory holds something that must not be reused."""


# --------------------------------------------------------------------------
# Small vectorised helpers. Images are float32 HxWx3 in [0, 1] until the end.
# --------------------------------------------------------------------------


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  v, u = np.meshgrid(c, c, indexing="ij")  # u: x (columns), v: y (rows)
  return u, v


def _rotate(u, v, angle, cx=0.5, cy=0.5):
  """Coordinates of (u, v) in a frame rotated by ``angle`` around (cx, cy)."""
  c, s = np.cos(angle), np.sin(angle)
  du, dv = u - cx, v - cy
  return (c * du + s * dv).astype(np.float32), (-s * du + c * dv).astype(
      np.float32)


def _noise(rng, size, sigma, aniso=1.0):
  """Zero-mean unit-std smooth noise; sigma in pixels (rows: sigma*aniso)."""
  n = rng.standard_normal((size, size)).astype(np.float32)
  n = ndimage.gaussian_filter(n, (max(sigma * aniso, 0.3), max(sigma, 0.3)),
                              mode="wrap")
  n -= n.mean()
  return n / (n.std() + 1e-8)


def _illumination(rng, u, v, strength=0.12):
  """Smooth lighting field around 1: random gradient + mild vignetting."""
  gain = rng.uniform(0.9, 1.1)
  gx, gy = rng.normal(0.0, strength, 2)
  vig = rng.uniform(0.0, 0.25)
  r2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
  return (gain * (1 + gx * (u - 0.5) + gy * (v - 0.5) - vig * r2)).astype(
      np.float32)


def _jitter_colour(rng, base, std=0.025):
  base = np.asarray(base, np.float32)
  return np.clip(base + rng.normal(0.0, std, 3).astype(np.float32), 0, 1)


def _to_u8(img):
  return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _aa(signed_dist_px):
  """Anti-aliased coverage from a signed distance in pixels (<0 inside)."""
  return np.clip(0.5 - signed_dist_px, 0.0, 1.0).astype(np.float32)


def _wobble(rng, u, v, cx, cy, irregularity):
  """Offsets (du, dv) of each pixel from (cx, cy), and a random radius factor
  around 1 that varies smoothly with the angle (harmonics 2 to 5): the outline
  of an irregular blob."""
  du, dv = u - cx, v - cy
  theta = np.arctan2(dv, du)
  r = np.ones_like(u)
  for k in range(2, 6):
    r += (rng.uniform(0, irregularity / k) *
          np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
  return du, dv, r


def _blob(rng, u, v, cx, cy, radius, irregularity=0.25, fray=0.0, size=128):
  """Coverage in [0,1] of an irregular blob (radius in image units)."""
  du, dv, r = _wobble(rng, u, v, cx, cy, irregularity)
  rad = radius * r
  if fray > 0:
    rad = rad * (1 + fray * _noise(rng, size, 0.8))
  d = np.sqrt(du * du + dv * dv)
  return _aa((d - rad) * size)


def _soft_blob(rng, u, v, cx, cy, radius, irregularity=0.3, softness=0.35):
  """Smooth-edged blob (stains): 1 in the core, fading out over the rim."""
  du, dv, r = _wobble(rng, u, v, cx, cy, irregularity)
  d = np.sqrt(du * du + dv * dv) / (radius * r)
  return np.clip((1.0 - d) / softness, 0.0, 1.0).astype(np.float32)


def _polyline_dist(u, v, pts):
  """Distance (image units) from each pixel to a polyline pts[K, 2]."""
  a = pts[:-1, :, None, None].astype(np.float32)
  b = pts[1:, :, None, None].astype(np.float32)
  ab = b - a
  pu, pv = u[None] - a[:, 0], v[None] - a[:, 1]
  denom = ab[:, 0] ** 2 + ab[:, 1] ** 2 + 1e-12
  t = np.clip((pu * ab[:, 0] + pv * ab[:, 1]) / denom, 0.0, 1.0)
  du, dv = pu - t * ab[:, 0], pv - t * ab[:, 1]
  return np.sqrt((du * du + dv * dv).min(axis=0))


def _random_walk(rng, start, angle, length, steps, wiggle):
  pts = [np.asarray(start, np.float32)]
  step = length / steps
  for _ in range(steps):
    angle += rng.normal(0.0, wiggle)
    pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)],
                                         np.float32))
  return np.stack(pts)


def _bezier(p0, p1, p2, n=48):
  t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _contrasting(clean, cov, dark, bright):
  """Whichever of two colours stands out more where ``cov`` is set."""
  w = cov[..., None] / max(float(cov.sum()), 1e-6)
  local = (clean * w).sum((0, 1))
  dark, bright = np.float32(dark), np.float32(bright)
  return dark if np.abs(local - dark).sum() > np.abs(
      local - bright).sum() else bright


def _line_coverage(dist, width_px, size):
  return _aa((dist * size) - width_px / 2.0)


def _rounded_box_sdf(x, y, hw, hh, rc):
  """Signed distance (image units) to a rounded rectangle centred at 0."""
  qx = np.abs(x) - (hw - rc)
  qy = np.abs(y) - (hh - rc)
  outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
  inside = np.minimum(np.maximum(qx, qy), 0)
  return outside + inside - rc


# --------------------------------------------------------------------------
# Scenes. A scene holds the clean image as layers so that defects can
# re-render parts of it (e.g. reveal the background under a missing piece).
# --------------------------------------------------------------------------


class _Scene:

  def __init__(self, size, u, v, bg, fg, alpha, noise, **extra):
    self.size, self.u, self.v = size, u, v
    self.bg, self.fg, self.alpha, self.noise = bg, fg, alpha, noise
    self.extra = extra
    self.clean = self.compose(fg, alpha)

  def compose(self, fg=None, alpha=None, bg=None):
    bg = self.bg if bg is None else bg
    fg = self.fg if fg is None else fg
    a = (self.alpha if alpha is None else alpha)[..., None]
    return bg * (1 - a) + fg * a + self.noise

  @property
  def px(self):
    """One pixel of the native 128 px resolution, in pixels."""
    return self.size / 128.0


def _sensor_noise(rng, size, std=0.014):
  return rng.normal(0.0, std, (size, size, 3)).astype(np.float32)


def _random_point(rng, margin=0.15):
  return rng.uniform(margin, 1 - margin, 2).astype(np.float32)


def _random_stain(rng, sc, irregularity=0.3, softness=0.35):
  """Coverage of a stain-sized soft blob somewhere on the image."""
  c = _random_point(rng)
  return _soft_blob(rng, sc.u, sc.v, *c, rng.uniform(0.08, 0.15),
                    irregularity, softness)


def _random_curve(rng, sc, length_range, bend, width_range):
  """Coverage of a gently curved stroke (a quadratic Bezier) somewhere on the
  image: its length, how far its middle strays (std) and its width in
  pixels are drawn from the given ranges."""
  p0 = _random_point(rng, 0.1)
  ang = rng.uniform(0, 2 * np.pi)
  length = rng.uniform(*length_range)
  p2 = p0 + length * np.float32([np.cos(ang), np.sin(ang)])
  p1 = (p0 + p2) / 2 + rng.normal(0, bend, 2).astype(np.float32)
  dist = _polyline_dist(sc.u, sc.v, _bezier(p0, p1, p2))
  return _line_coverage(dist, rng.uniform(*width_range) * sc.px, sc.size)


def _pick_colour(rng, choices, std=0.03):
  """One of `choices`, drawn uniformly, then jittered."""
  return _jitter_colour(rng, choices[rng.integers(len(choices))], std)


# ---- carpet: twill weave of warp/weft threads -----------------------------


def _carpet(rng, size):
  u, v = _coords(size)
  ur, vr = _rotate(u, v, rng.uniform(-0.06, 0.06))
  n = rng.uniform(15.0, 17.0)
  a = ur * n + rng.uniform(0, 4)
  b = vr * n + rng.uniform(0, 4)
  ia, ib = np.floor(a), np.floor(b)
  fa, fb = a - ia, b - ib
  warp_top = ((ia + ib) % 4) < 2  # 2/2 twill -> diagonal ribs
  prof_w = np.sin(np.pi * fa) ** 0.6 * (0.7 + 0.3 * np.sin(np.pi * fb))
  prof_f = np.sin(np.pi * fb) ** 0.6 * (0.7 + 0.3 * np.sin(np.pi * fa))
  shade = np.where(warp_top, prof_w, prof_f)
  fib_w = _noise(rng, size, 0.6 * size / 128, aniso=6.0)
  fib_f = _noise(rng, size, 0.6 * size / 128, aniso=1 / 6.0)
  fibre = np.where(warp_top, fib_w, fib_f)
  base = _jitter_colour(rng, [0.56, 0.25, 0.22], 0.03)
  weft = np.clip(base * np.float32([0.85, 1.05, 1.1]), 0, 1)
  col = np.where(warp_top[..., None], base, weft)
  mottle = 1 + 0.06 * _noise(rng, size, 0.1 * size)
  inten = (0.35 + 0.65 * shade + 0.07 * fibre) * mottle
  light = _illumination(rng, u, v)
  fg = col * (inten * light)[..., None]
  return _Scene(size, u, v, fg, fg, np.zeros_like(u),
                _sensor_noise(rng, size))


def _dark_hole(rng, sc, radius_range, irregularity, fray, colour, depth_shading):
  """A hole: an irregular blob replaced by a dark colour, darker towards its centre."""
  c = _random_point(rng)
  r = rng.uniform(*radius_range)
  cov = _blob(rng, sc.u, sc.v, *c, r, irregularity, fray=fray, size=sc.size)
  depth = np.clip(1 - np.hypot(sc.u - c[0], sc.v - c[1]) / r, 0, 1)
  dark = np.float32(colour) * (1 - depth_shading * depth)[..., None]
  out = sc.clean * (1 - cov[..., None]) + (dark + sc.noise) * cov[..., None]
  return out, cov > 0.3


def _carpet_hole(rng, sc):
  return _dark_hole(rng, sc, (0.05, 0.1), 0.35, 0.12, [0.07, 0.05, 0.05], 0.5)


def _carpet_stain(rng, sc):
  cov = _random_stain(rng, sc)
  if rng.random() < 0.5:  # dark liquid
    tint = _jitter_colour(rng, [0.5, 0.55, 0.2], 0.05)
    out = sc.clean * (1 - cov[..., None] * (1 - tint))
  else:  # bleached
    col = _jitter_colour(rng, [0.85, 0.78, 0.62], 0.03)
    out = sc.clean + (col - sc.clean) * 0.7 * cov[..., None]
  return out, cov > 0.08


def _carpet_thread(rng, sc):
  cov = _random_curve(rng, sc, (0.3, 0.55), 0.12, (1.5, 2.5))
  col = _pick_colour(rng, [[0.55, 0.75, 0.95], [0.92, 0.92, 0.88],
                           [0.3, 0.7, 0.3]])
  out = sc.clean * (1 - cov[..., None]) + (col + sc.noise) * cov[..., None]
  return out, cov > 0.25


# ---- grid: woven metal mesh on a dark backing -----------------------------


def _grid(rng, size):
  u, v = _coords(size)
  ur, vr = _rotate(u, v, rng.uniform(-0.08, 0.08))
  period = rng.uniform(1 / 11.0, 1 / 9.5)  # image units
  hw = 0.17 * period
  a = ur / period + rng.uniform(0, 1)
  b = vr / period + rng.uniform(0, 1)
  ka, kb = np.rint(a), np.rint(b)
  da = np.abs(a - ka) * period
  db = np.abs(b - kb) * period
  wire_x = _aa((da - hw) * size)  # vertical wires (constant a)
  wire_y = _aa((db - hw) * size)
  prof_x = np.sqrt(np.clip(1 - (da / hw) ** 2, 0, 1))
  prof_y = np.sqrt(np.clip(1 - (db / hw) ** 2, 0, 1))
  x_on_top = ((ka + kb) % 2) == 0
  use_x = np.where((wire_x > 0) & (wire_y > 0), x_on_top, wire_x >= wire_y)
  shade = np.where(use_x, prof_x, prof_y)
  alpha = np.maximum(wire_x, wire_y)
  metal = _jitter_colour(rng, [0.74, 0.74, 0.72], 0.02)
  light = _illumination(rng, u, v, 0.15)
  fg = metal * ((0.4 + 0.6 * shade) * light)[..., None]
  back = _jitter_colour(rng, [0.12, 0.12, 0.14], 0.01)
  bg = back * ((1 + 0.15 * _noise(rng, size, 2 * size / 128)) *
               light)[..., None]
  return _Scene(size, u, v, bg, fg, alpha, _sensor_noise(rng, size),
                a=a, b=b, ka=ka, kb=kb, wire_x=wire_x, wire_y=wire_y)


def _grid_broken(rng, sc):
  e = sc.extra
  vertical = rng.random() < 0.5
  k_along, k_across = (e["ka"], e["b"]) if vertical else (e["kb"], e["a"])
  own, other = (e["wire_x"], e["wire_y"]) if vertical else (e["wire_y"],
                                                           e["wire_x"])
  # pick a visible wire pixel away from the border, cut 1-3 segments there
  inner = ((sc.u > 0.15) & (sc.u < 0.85) & (sc.v > 0.15) & (sc.v < 0.85))
  cand = np.flatnonzero((own > 0.5) & (other == 0) & inner)
  pick = cand[rng.integers(len(cand))]
  wire = k_along.flat[pick]
  nseg = int(rng.integers(1, 4))
  start = np.floor(k_across.flat[pick]) - rng.integers(nseg)
  cut = ((k_along == wire) & (k_across > start + 0.02) &
         (k_across < start + nseg - 0.02))
  new_alpha = np.where(cut & (other == 0), 0.0, sc.alpha).astype(np.float32)
  return sc.compose(alpha=new_alpha), cut & (other == 0) & (own > 0)


def _grid_contamination(rng, sc):
  c = _random_point(rng)
  cov = _blob(rng, sc.u, sc.v, *c, rng.uniform(0.035, 0.07), 0.4,
              size=sc.size)
  col = _pick_colour(rng, [[0.85, 0.82, 0.7], [0.45, 0.3, 0.15]])
  tex = 1 + 0.08 * _noise(rng, sc.size, 1.5 * sc.px)
  out = sc.clean + (col * tex[..., None] + sc.noise - sc.clean) * (
      0.9 * cov[..., None])
  return out, cov > 0.2


# ---- wood: warped grain lines with fibres ---------------------------------


def _wood(rng, size):
  u, v = _coords(size)
  ur, vr = _rotate(u, v, rng.uniform(-0.05, 0.05))
  warp = (rng.uniform(0.25, 0.45) * _noise(rng, size, 0.15 * size, 3.0) +
          0.05 * _noise(rng, size, 0.04 * size, 3.0))
  g = ur * rng.uniform(5.0, 8.0) + warp + rng.uniform(0, 1)
  lines = (0.5 + 0.5 * np.cos(2 * np.pi * g)) ** rng.uniform(4, 8)
  fibres = _noise(rng, size, 0.5 * size / 128, aniso=12.0)
  light_c = _jitter_colour(rng, [0.78, 0.58, 0.38], 0.03)
  dark_c = light_c * np.float32([0.6, 0.52, 0.46])
  col = light_c + (dark_c - light_c) * (0.85 * lines)[..., None]
  inten = (1 + 0.05 * fibres) * _illumination(rng, u, v)
  fg = col * inten[..., None]
  return _Scene(size, u, v, fg, fg, np.zeros_like(u),
                _sensor_noise(rng, size, 0.012))


def _wood_scratch(rng, sc):
  cov = _random_curve(rng, sc, (0.3, 0.6), 0.03, (1.2, 2.0))
  col = _jitter_colour(rng, [0.95, 0.88, 0.74], 0.02)
  out = sc.clean + (col - sc.clean) * (0.75 * cov[..., None])
  return out, cov > 0.25


def _wood_hole(rng, sc):
  return _dark_hole(rng, sc, (0.035, 0.065), 0.2, 0.0, [0.2, 0.12, 0.07], 0.6)


def _wood_color(rng, sc):
  cov = _random_stain(rng, sc)
  col = _pick_colour(rng, [[0.35, 0.4, 0.5], [0.45, 0.12, 0.1],
                           [0.2, 0.2, 0.18]])
  out = sc.clean + (col * (sc.clean.mean(-1, keepdims=True) / 0.55) -
                    sc.clean) * (0.7 * cov[..., None])
  return out, cov > 0.08


# ---- tile: terrazzo stone with embedded chips ------------------------------


def _tile(rng, size):
  u, v = _coords(size)
  base = _jitter_colour(rng, [0.8, 0.78, 0.74], 0.02)
  img = base * (1 + 0.04 * _noise(rng, size, 0.06 * size) +
                0.03 * _noise(rng, size, 0.015 * size))[..., None]
  palette = np.float32([[0.3, 0.3, 0.32], [0.52, 0.44, 0.36],
                        [0.95, 0.94, 0.92], [0.62, 0.42, 0.36],
                        [0.18, 0.18, 0.2]])
  for _ in range(int(rng.integers(35, 55))):
    cx, cy = rng.uniform(-0.05, 1.05, 2)
    rx, ry = rng.uniform(0.012, 0.04, 2)
    ur, vr = _rotate(u, v, rng.uniform(0, np.pi), cx, cy)
    th = np.arctan2(vr, ur)
    wob = 1 + 0.15 * np.cos(3 * th + rng.uniform(0, 6))
    d = np.sqrt((ur / rx) ** 2 + (vr / ry) ** 2) / wob
    cov = _aa((d - 1) * min(rx, ry) * size)
    col = _jitter_colour(rng, palette[rng.integers(len(palette))], 0.04)
    img = img + (col - img) * cov[..., None]
  fg = img * _illumination(rng, u, v, 0.1)[..., None]
  return _Scene(size, u, v, fg, fg, np.zeros_like(u),
                _sensor_noise(rng, size))


def _tile_crack(rng, sc):
  p0 = _random_point(rng, 0.15)
  pts = _random_walk(rng, p0, rng.uniform(0, 2 * np.pi),
                     rng.uniform(0.3, 0.55), 18, 0.35)
  dist = _polyline_dist(sc.u, sc.v, pts)
  if rng.random() < 0.5:  # a short branch
    j = int(rng.integers(4, 14))
    br = _random_walk(rng, pts[j], rng.uniform(0, 2 * np.pi), 0.15, 8, 0.4)
    dist = np.minimum(dist, _polyline_dist(sc.u, sc.v, br))
  cov = _line_coverage(dist, rng.uniform(1.0, 1.8) * sc.px, sc.size)
  col = np.float32([0.12, 0.11, 0.1])
  out = sc.clean + (col + sc.noise - sc.clean) * (0.9 * cov[..., None])
  return out, cov > 0.25


def _tile_oil(rng, sc):
  cov = _random_stain(rng, sc, 0.4, 0.3)
  tint = _jitter_colour(rng, [0.5, 0.46, 0.32], 0.03)
  out = sc.clean * (1 - cov[..., None] * (1 - tint))
  return out, cov > 0.08


def _tile_glue(rng, sc):
  c = _random_point(rng)
  r = rng.uniform(0.05, 0.1)
  cov = _soft_blob(rng, sc.u, sc.v, *c, r, 0.5, 0.2)
  spec = np.exp(-(((sc.u - c[0] + 0.3 * r) ** 2 +
                   (sc.v - c[1] + 0.3 * r) ** 2) / (0.3 * r) ** 2))
  col = _jitter_colour(rng, [0.82, 0.62, 0.25], 0.03)  # amber glue
  out = (sc.clean + (col - sc.clean) * (0.6 * cov[..., None]) +
         (0.25 * spec * cov)[..., None])
  return out, cov > 0.08


# ---- washer: metal ring on a matte surface ---------------------------------


def _washer_layers(p, size, bite=None):
  u, v = _coords(size)
  du, dv = u - p["cx"], v - p["cy"]
  d = np.sqrt(du * du + dv * dv)
  theta = np.arctan2(dv, du)
  alpha = _aa((d - p["R"]) * size) * _aa((p["r"] - d) * size)
  if bite is not None:
    alpha = alpha * (1 - bite)
  t = np.clip((d - p["r"]) / (p["R"] - p["r"]), 0, 1)
  prof = 0.5 + 0.5 * np.sin(np.pi * t)
  hl = 1 + 0.35 * np.cos(theta - p["light_dir"])
  brush = np.interp(d * size, np.arange(len(p["brush"])), p["brush"])
  fg = p["metal"] * (prof * hl * (1 + 0.06 * brush))[..., None]
  return fg.astype(np.float32), alpha.astype(np.float32), d, theta


def _washer(rng, size):
  u, v = _coords(size)
  R = 0.34 * rng.uniform(0.95, 1.05)
  p = dict(cx=0.5 + rng.uniform(-0.05, 0.05),
           cy=0.5 + rng.uniform(-0.05, 0.05), R=R,
           r=R * rng.uniform(0.42, 0.48),
           light_dir=rng.uniform(0, 2 * np.pi),
           metal=_jitter_colour(rng, [0.74, 0.75, 0.78], 0.02),
           brush=rng.standard_normal(2 * size).astype(np.float32))
  fg, alpha, d, theta = _washer_layers(p, size)
  surface = _jitter_colour(rng, [0.22, 0.26, 0.32], 0.02)
  light = _illumination(rng, u, v)
  shadow_a = ndimage.shift(alpha, (2.5 * size / 128, 2.5 * size / 128),
                           order=1)
  shadow = 1 - 0.45 * ndimage.gaussian_filter(shadow_a, 2.5 * size / 128)
  bg = surface * ((1 + 0.05 * _noise(rng, size, 0.05 * size)) * light *
                  shadow)[..., None]
  fg = fg * light[..., None]
  return _Scene(size, u, v, bg, fg, alpha, _sensor_noise(rng, size),
                p=p, light=light, d=d, theta=theta)


def _washer_scratch(rng, sc):
  p = sc.extra["p"]
  ang = rng.uniform(0, 2 * np.pi)
  rad = rng.uniform(p["r"] + 0.02, p["R"] - 0.02)
  c = np.float32([p["cx"] + rad * np.cos(ang), p["cy"] + rad * np.sin(ang)])
  dirn = ang + np.pi / 2 + rng.normal(0, 0.5)
  half = rng.uniform(0.08, 0.14)
  e = half * np.float32([np.cos(dirn), np.sin(dirn)])
  dist = _polyline_dist(sc.u, sc.v, np.stack([c - e, c + e]))
  cov = _line_coverage(dist, rng.uniform(1.0, 1.6) * sc.px, sc.size)
  cov = cov * (sc.alpha > 0.99)
  col = _contrasting(sc.clean, cov, [0.12, 0.12, 0.13], [1.0, 1.0, 1.0])
  out = sc.clean + (col - sc.clean) * (0.85 * cov[..., None])
  return out, cov > 0.25


def _washer_cut(rng, sc):
  p = sc.extra["p"]
  ang = rng.uniform(0, 2 * np.pi)
  edge = p["R"] if rng.random() < 0.7 else p["r"]
  c = (p["cx"] + edge * np.cos(ang), p["cy"] + edge * np.sin(ang))
  bite = _blob(rng, sc.u, sc.v, *c, rng.uniform(0.05, 0.09), 0.3,
               size=sc.size)
  _, alpha, _, _ = _washer_layers(p, sc.size, bite=bite)
  out = sc.compose(alpha=alpha)
  changed = np.abs(alpha - sc.alpha) > 0.02
  return out, changed


def _washer_contamination(rng, sc):
  p = sc.extra["p"]
  ang = rng.uniform(0, 2 * np.pi)
  rad = rng.uniform(p["r"] + 0.03, p["R"] - 0.03)
  c = (p["cx"] + rad * np.cos(ang), p["cy"] + rad * np.sin(ang))
  cov = _blob(rng, sc.u, sc.v, *c, rng.uniform(0.03, 0.055), 0.5, fray=0.1,
              size=sc.size) * sc.alpha
  col = _jitter_colour(rng, [0.28, 0.18, 0.1], 0.03)
  tex = 1 + 0.15 * _noise(rng, sc.size, 1.0 * sc.px)
  out = sc.clean + (col * tex[..., None] - sc.clean) * (0.85 * cov[..., None])
  return out, cov > 0.2


# ---- chip: IC package with pins on a PCB -----------------------------------

_CHIP_PINS = 6


def _chip_layers(p, size, missing=None, bent=None):
  u, v = _coords(size)
  x, y = _rotate(u, v, p["angle"], p["cx"], p["cy"])
  W, H = p["W"], p["H"]
  pin_w, pin_l = 0.022, 0.085
  pin_alpha = np.zeros_like(u)
  pin_shade = np.zeros_like(u)
  for side in (-1, 1):
    for i in range(_CHIP_PINS):
      if missing == (side, i):
        continue
      xi = -W + (i + 0.5) * (2 * W / _CHIP_PINS)
      px_, py_ = x - xi, side * y - (H - 0.01)
      if bent is not None and bent[0] == (side, i):
        px_, py_ = _rotate(px_, py_, bent[1], 0.0, 0.0)
      sdf = np.maximum(np.abs(px_) - pin_w, np.abs(py_ - pin_l / 2) -
                       pin_l / 2)
      cov = _aa(sdf * size)
      pin_alpha = np.maximum(pin_alpha, cov)
      prof = np.sqrt(np.clip(1 - (px_ / pin_w) ** 2, 0, 1))
      pin_shade = np.where(cov > 0, 0.55 + 0.45 * prof, pin_shade)
  body = _aa(_rounded_box_sdf(x, y, W, H, 0.015) * size)
  dot = _aa((np.hypot(x + W * 0.72, y + H * 0.55) - 0.022) * size)
  body_col = p["body"] * (1 + 0.25 * (y / H * -0.3 + 0.3))[..., None]
  body_col = body_col + (0.12 * dot)[..., None]
  pin_col = p["pin"] * pin_shade[..., None]
  # body composited over the pins ("over" operator, premultiplied)
  alpha = body + pin_alpha * (1 - body)
  premult = (body[..., None] * body_col +
             (pin_alpha * (1 - body))[..., None] * pin_col)
  fg = premult / np.maximum(alpha, 1e-6)[..., None]
  return fg.astype(np.float32), alpha.astype(np.float32), body


def _chip(rng, size):
  u, v = _coords(size)
  p = dict(cx=0.5 + rng.uniform(-0.04, 0.04),
           cy=0.5 + rng.uniform(-0.04, 0.04),
           angle=rng.uniform(-0.06, 0.06), W=0.26 * rng.uniform(0.97, 1.03),
           H=0.17 * rng.uniform(0.97, 1.03),
           body=_jitter_colour(rng, [0.14, 0.14, 0.15], 0.01),
           pin=_jitter_colour(rng, [0.8, 0.8, 0.82], 0.02))
  fg, alpha, body = _chip_layers(p, size)
  light = _illumination(rng, u, v, 0.1)
  pcb = _jitter_colour(rng, [0.12, 0.38, 0.2], 0.025)
  weave = (0.5 + 0.5 * np.sin(2 * np.pi * u * 40) *
           np.sin(2 * np.pi * v * 40))
  bg = pcb * ((1 + 0.06 * _noise(rng, size, 0.04 * size) + 0.04 * weave) *
              light)[..., None]
  fg = fg * light[..., None]
  return _Scene(size, u, v, bg, fg, alpha, _sensor_noise(rng, size),
                p=p, light=light, body=body)


def _chip_missing_pin(rng, sc):
  p = sc.extra["p"]
  which = (int(rng.choice([-1, 1])), int(rng.integers(_CHIP_PINS)))
  fg, alpha, _ = _chip_layers(p, sc.size, missing=which)
  out = sc.compose(fg=fg * sc.extra["light"][..., None], alpha=alpha)
  return out, np.abs(alpha - sc.alpha) > 0.02


def _chip_bent_pin(rng, sc):
  p = sc.extra["p"]
  which = (int(rng.choice([-1, 1])), int(rng.integers(_CHIP_PINS)))
  angle = rng.choice([-1, 1]) * rng.uniform(0.5, 0.9)
  fg, alpha, _ = _chip_layers(p, sc.size, bent=(which, angle))
  out = sc.compose(fg=fg * sc.extra["light"][..., None], alpha=alpha)
  changed = np.abs(out - sc.clean).max(-1) > 0.02
  return out, changed


def _chip_scratch(rng, sc):
  p = sc.extra["p"]
  c = np.float32([p["cx"], p["cy"]]) + rng.uniform(-0.1, 0.1, 2).astype(
      np.float32)
  ang = rng.uniform(0, np.pi)
  e = rng.uniform(0.08, 0.15) * np.float32([np.cos(ang), np.sin(ang)])
  mid = (c + rng.normal(0, 0.02, 2)).astype(np.float32)
  dist = _polyline_dist(sc.u, sc.v, _bezier(c - e, mid, c + e))
  cov = _line_coverage(dist, rng.uniform(1.0, 1.6) * sc.px, sc.size)
  cov = cov * (sc.extra["body"] > 0.99)
  col = np.float32([0.75, 0.75, 0.75])
  out = sc.clean + (col - sc.clean) * (0.8 * cov[..., None])
  return out, cov > 0.25


# ---- capsule: two-tone pharmaceutical capsule ------------------------------


def _capsule(rng, size):
  u, v = _coords(size)
  cx, cy = 0.5 + rng.uniform(-0.04, 0.04, 2)
  x, y = _rotate(u, v, rng.uniform(-0.12, 0.12), cx, cy)
  half_len = 0.33 * rng.uniform(0.97, 1.03)
  rc = 0.12 * rng.uniform(0.96, 1.04)
  qx = np.maximum(np.abs(x) - (half_len - rc), 0)
  sdf = np.sqrt(qx * qx + y * y) - rc
  alpha = _aa(sdf * size)
  seam = 0.06 * half_len
  col_a = _jitter_colour(rng, [0.85, 0.3, 0.12], 0.03)
  col_b = _jitter_colour(rng, [0.95, 0.92, 0.84], 0.015)
  col = np.where((x < seam)[..., None], col_a, col_b)
  yy = np.clip(y / rc, -1, 1)
  shade = 0.55 + 0.45 * np.sqrt(np.clip(1 - yy ** 2, 0, 1))
  ridge = 1 - 0.25 * np.exp(-((x - seam) * size / (1.2 * size / 128)) ** 2)
  spec = 0.3 * np.exp(-((yy + 0.45) / 0.14) ** 2) * (np.abs(x) < half_len -
                                                      rc * 0.6)
  light = _illumination(rng, u, v, 0.1)
  fg = (col * (shade * ridge)[..., None] + spec[..., None]) * light[..., None]
  back = _jitter_colour(rng, [0.52, 0.58, 0.66], 0.015)  # blue-grey tray
  shadow_a = ndimage.shift(alpha, (3 * size / 128, 1.5 * size / 128),
                           order=1)
  shadow = 1 - 0.3 * ndimage.gaussian_filter(shadow_a, 3 * size / 128)
  bg = back * ((1 + 0.03 * _noise(rng, size, 0.05 * size)) * light *
               shadow)[..., None]
  return _Scene(size, u, v, bg, fg.astype(np.float32), alpha,
                _sensor_noise(rng, size, 0.01), cx=cx, cy=cy, x=x, y=y,
                half_len=half_len, rc=rc)


def _capsule_point(rng, sc, inset=0.6):
  e = sc.extra
  lx = rng.uniform(-(e["half_len"] - e["rc"]), e["half_len"] - e["rc"])
  ly = rng.uniform(-inset, inset) * e["rc"]
  # local -> image: find the pixel whose local coords are closest
  idx = np.argmin((e["x"] - lx) ** 2 + (e["y"] - ly) ** 2)
  return np.float32([sc.u.flat[idx], sc.v.flat[idx]])


def _capsule_crack(rng, sc):
  p0 = _capsule_point(rng, sc)
  pts = _random_walk(rng, p0, rng.uniform(0, 2 * np.pi),
                     rng.uniform(0.12, 0.22), 12, 0.4)
  dist = _polyline_dist(sc.u, sc.v, pts)
  cov = _line_coverage(dist, rng.uniform(1.0, 1.6) * sc.px, sc.size)
  cov = cov * (sc.alpha > 0.99)
  col = np.float32([0.2, 0.1, 0.06])
  out = sc.clean + (col - sc.clean) * (0.85 * cov[..., None])
  return out, cov > 0.25


def _capsule_poke(rng, sc):
  c = _capsule_point(rng, sc, 0.5)
  r = rng.uniform(0.02, 0.035)
  cov = _blob(rng, sc.u, sc.v, *c, r, 0.25, size=sc.size) * (sc.alpha > 0.99)
  dd = np.hypot(sc.u - c[0], sc.v - c[1]) / r
  dent = np.clip(0.35 + 0.5 * dd, 0, 1)[..., None]
  out = sc.clean * (1 - cov[..., None]) + (sc.clean * dent * 0.6) * cov[
      ..., None]
  return out, cov > 0.3


def _capsule_faulty_color(rng, sc):
  c = _capsule_point(rng, sc, 0.4)
  cov = _soft_blob(rng, sc.u, sc.v, *c, rng.uniform(0.035, 0.06), 0.4, 0.4)
  cov = cov * (sc.alpha > 0.99)
  col = _pick_colour(rng, [[0.35, 0.15, 0.45], [0.3, 0.22, 0.12],
                           [0.15, 0.35, 0.6]])
  out = sc.clean + (col - sc.clean) * (0.8 * cov[..., None])
  return out, cov > 0.1


# --------------------------------------------------------------------------
# Registry, rendering, writing.
# --------------------------------------------------------------------------


class _ClassSpec(NamedTuple):
  render: Callable
  defects: dict[str, Callable]


_CLASSES: dict[str, _ClassSpec] = {
    "carpet": _ClassSpec(_carpet, {"hole": _carpet_hole,
                                   "stain": _carpet_stain,
                                   "thread": _carpet_thread}),
    "grid": _ClassSpec(_grid, {"broken": _grid_broken,
                               "contamination": _grid_contamination}),
    "wood": _ClassSpec(_wood, {"scratch": _wood_scratch, "hole": _wood_hole,
                               "color": _wood_color}),
    "tile": _ClassSpec(_tile, {"crack": _tile_crack, "oil": _tile_oil,
                               "glue": _tile_glue}),
    "washer": _ClassSpec(_washer, {"scratch": _washer_scratch,
                                   "cut": _washer_cut,
                                   "contamination": _washer_contamination}),
    "chip": _ClassSpec(_chip, {"missing_pin": _chip_missing_pin,
                               "bent_pin": _chip_bent_pin,
                               "scratch": _chip_scratch}),
    "capsule": _ClassSpec(_capsule, {"crack": _capsule_crack,
                                     "poke": _capsule_poke,
                                     "faulty_color": _capsule_faulty_color}),
}

CLASS_NAMES: tuple[str, ...] = tuple(_CLASSES)
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    name: tuple(spec.defects) for name, spec in _CLASSES.items()}


def _apply_defect(clean_f, clean_u8, defect_f, region):
  """Composites defect pixels inside ``region`` with guaranteed contrast."""
  out = clean_u8.copy()
  out[region] = _to_u8(defect_f)[region]
  diff = np.abs(out.astype(np.int16) - clean_u8).max(-1)
  weak = region & (diff < MIN_CONTRAST)
  if weak.any():
    direction = np.where((defect_f - clean_f).mean(-1, keepdims=True) >= 0,
                         1, -1).astype(np.int16)
    base = clean_u8.astype(np.int16)
    push = base + direction * MIN_CONTRAST
    push = np.where((push > 255) | (push < 0),
                    base - direction * MIN_CONTRAST, push)
    out[weak] = push[weak].astype(np.uint8)
  return out


def _check_size(image_size):
  if not isinstance(image_size, (int, np.integer)) or image_size < 32:
    raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")


def render(class_name: str, kind: str, index: int, *, seed: int = 0,
           image_size: int = 128, defect_type: str | None = None):
  """Renders one sample.

  Args:
    class_name: one of ``CLASS_NAMES``.
    kind: 'train', 'test_good' or 'test_defect'.
    index: sample index within ``kind`` (for 'test_defect' the index over
      all defect images of the class; the type cycles through the class's
      defect types unless ``defect_type`` is given).
    seed, image_size: as for :func:`generate`.

  Returns:
    ``(image, mask, clean, defect_type)``: uint8 HxWx3 image, bool HxW mask
    (all False for good samples), uint8 HxWx3 defect-free rendering of the
    same sample (equal to ``image`` for good samples), and the defect type
    ('good' for good samples).
  """
  if class_name not in _CLASSES:
    raise ValueError(f"unknown synthetic class {class_name!r}; known "
                     f"classes: {', '.join(CLASS_NAMES)}")
  if kind not in _SPLIT_CODES:
    raise ValueError(f"kind must be one of {list(_SPLIT_CODES)}")
  _check_size(image_size)
  spec = _CLASSES[class_name]
  rng = np.random.default_rng(
      [int(seed), CLASS_NAMES.index(class_name), _SPLIT_CODES[kind],
       int(index)])
  scene = spec.render(rng, image_size)
  clean_f = scene.clean
  clean_u8 = _to_u8(clean_f)
  if kind != "test_defect":
    return clean_u8, np.zeros(clean_u8.shape[:2], bool), clean_u8, "good"
  names = tuple(spec.defects)
  dtype = names[index % len(names)] if defect_type is None else defect_type
  min_area = max(6, int(0.0015 * image_size * image_size))
  for _ in range(50):
    defect_f, region = spec.defects[dtype](rng, scene)
    region = np.asarray(region, bool)
    if region.sum() >= min_area:
      break
  else:  # pragma: no cover - defect parameters always reach the area
    raise RuntimeError(f"could not place a {dtype} defect on {class_name}")
  image = _apply_defect(clean_f, clean_u8, defect_f, region)
  return image, region, clean_u8, dtype


def _params(seed, image_size, num_train, num_test_good, num_test_defect):
  return {"generator": "ccl_jax.datasets.synthetic",
          "generator_version": GENERATOR_VERSION, "seed": int(seed),
          "image_size": int(image_size), "num_train": int(num_train),
          "num_test_good": int(num_test_good),
          "num_test_defect": int(num_test_defect),
          "classes": list(CLASS_NAMES)}


def _save_png(path, array):
  Image.fromarray(array).save(path, format="PNG", compress_level=3)


def _write_class(root, class_name, seed, image_size, num_train,
                 num_test_good, num_test_defect):
  cdir = root / class_name
  (cdir / "train" / "good").mkdir(parents=True)
  (cdir / "test" / "good").mkdir(parents=True)
  for i in range(num_train):
    img, _, _, _ = render(class_name, "train", i, seed=seed,
                          image_size=image_size)
    _save_png(cdir / "train" / "good" / f"{i:03d}.png", img)
  for i in range(num_test_good):
    img, _, _, _ = render(class_name, "test_good", i, seed=seed,
                          image_size=image_size)
    _save_png(cdir / "test" / "good" / f"{i:03d}.png", img)
  counters: dict[str, int] = {}
  for i in range(num_test_defect):
    img, mask, _, dtype = render(class_name, "test_defect", i, seed=seed,
                                 image_size=image_size)
    j = counters.get(dtype, 0)
    counters[dtype] = j + 1
    if j == 0:
      (cdir / "test" / dtype).mkdir(parents=True)
      (cdir / "ground_truth" / dtype).mkdir(parents=True)
    _save_png(cdir / "test" / dtype / f"{j:03d}.png", img)
    _save_png(cdir / "ground_truth" / dtype / f"{j:03d}_mask.png",
              mask.astype(np.uint8) * 255)


def read_marker(root) -> dict | None:
  """Parameters of a complete synthetic dataset at ``root``, else None."""
  try:
    return json.loads((pathlib.Path(root) / MARKER_NAME).read_text())
  except (OSError, ValueError):
    return None


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale_partials(root):
  prefix = f".{root.name}.partial-"
  for tmp in root.parent.glob(prefix + "*"):
    try:
      pid = int(tmp.name[len(prefix):].split("-")[0])
    except ValueError:
      pid = -1
    if pid == os.getpid() or pid < 0 or not _pid_alive(pid):
      shutil.rmtree(tmp, ignore_errors=True)


def _check_existing(root, params):
  """True if ``root`` is a complete dataset with ``params``; raises if it
  holds something else; False if absent (or an empty directory)."""
  if not root.exists():
    return False
  found = read_marker(root)
  if found == params:
    return True
  if found is not None:
    raise SyntheticDatasetError(
        f"{root} already holds a synthetic dataset generated with "
        f"different parameters.\n  found:     {json.dumps(found)}\n"
        f"  requested: {json.dumps(params)}\nDelete {root} or choose "
        "another directory.")
  if root.is_dir() and not any(root.iterdir()):
    return False
  raise SyntheticDatasetError(
      f"{root} exists but is not a complete synthetic dataset (no "
      f"{MARKER_NAME} marker); refusing to reuse or overwrite it. Delete it "
      f"or choose another directory. Requested: {json.dumps(params)}")


def generate(root, *, seed: int = 0, image_size: int = 128, num_train: int = 40,
             num_test_good: int = 10, num_test_defect: int = 12
             ) -> pathlib.Path:
  """Writes the synthetic dataset (MVTec AD layout) to ``root``.

  Generation happens in a temporary sibling directory that is renamed into
  place once complete, together with a marker file recording the
  parameters. A complete dataset with the same parameters is reused as is;
  anything else at ``root`` raises :class:`SyntheticDatasetError`.

  Returns:
    ``root`` as an absolute ``pathlib.Path``.
  """
  _check_size(image_size)
  for name, n in (("num_train", num_train), ("num_test_good", num_test_good),
                  ("num_test_defect", num_test_defect)):
    if not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f"{name} must be a non-negative int, got {n!r}")
  if num_train < 1 or num_test_good + num_test_defect < 1:
    raise ValueError("need num_train >= 1 and at least one test image")
  root = pathlib.Path(root).expanduser().absolute()
  params = _params(seed, image_size, num_train, num_test_good,
                   num_test_defect)
  if _check_existing(root, params):
    return root
  root.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_partials(root)
  tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
  tmp.mkdir()
  try:
    for class_name in CLASS_NAMES:
      _write_class(tmp, class_name, seed, image_size, num_train,
                   num_test_good, num_test_defect)
    (tmp / MARKER_NAME).write_text(json.dumps(params, indent=1))
    if root.is_dir() and not any(root.iterdir()):
      root.rmdir()
    try:
      os.rename(tmp, root)
    except OSError:
      # Someone else finished first: accept theirs only if identical.
      if not _check_existing(root, params):
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return root

"""Source images to 8-bit RGB, whatever bit depth and PIL mode they were stored in.

Pillow's own ``convert("RGB")`` is right for the 8-bit modes and for the 16-bit PNG colour
types it decodes to 8 bits itself (RGB, RGBA, grey + alpha), but it clips 16-bit grey
('I;16*', and 'I' as some decoders report it) to 255, so a 16-bit grey photograph would
become all white. Those are scaled here instead.

16-bit values become 8-bit ones by their high byte (``v >> 8``), the mapping Pillow applies
to the 16-bit PNG colour types it decodes itself (and libpng's ``png_set_strip_16``), so a
16-bit grey image and its RGB copy give identical pixels. It maps the full 16-bit range
onto the full 8-bit range (0 -> 0, 65535 -> 255; each 8-bit level ``k`` gathers the codes
``256k .. 256k + 255``) and differs from rounding ``v / 257`` by at most one level.

Accepted (see ``SUPPORTED_FORMS``): the 8-bit modes below, CMYK and YCbCr by Pillow's
conversion (CMYK without colour management, so colours are approximate) and 16-bit grey.
Refused with an :class:`UnsupportedImageError` naming the file: modes whose scale is
unknown or that Pillow cannot turn into RGB faithfully, e.g. 32-bit float 'F', signed
16-bit, 'LAB' and 'HSV'.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["SUPPORTED_FORMS", "UnsupportedImageError", "check_mode", "to_rgb"]

SUPPORTED_FORMS = (
    "8-bit grey, RGB, palette, CMYK or YCbCr (alpha, if any, is dropped), 1-bit, 16-bit "
    "grey or 16-bit RGB(A) PNG")

# Modes Pillow converts to RGB faithfully.
_PILLOW_CONVERTS = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
# Unsigned 16-bit grey in its byte orders; 'I' (32-bit signed) is how Pillow reports 16-bit
# grey from some formats, so it is read as 16-bit and refused outside 0..65535.
_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_MODE_NAMES = {"F": "32-bit float", "I;16S": "signed 16-bit", "I;16BS": "signed 16-bit",
               "I;16LS": "signed 16-bit", "LAB": "CIE L*a*b*", "HSV": "HSV"}


class UnsupportedImageError(ValueError):
  """An image whose mode cannot be converted to 8-bit RGB."""


def _refusal(mode: str, path: str | os.PathLike, why: str = "") -> str:
  name = _MODE_NAMES.get(mode, "")
  described = f"mode {mode!r}" + (f" ({name})" if name else "")
  why = why or "cannot be converted to 8-bit RGB"
  return f"{path}: image {described} {why}; expected {SUPPORTED_FORMS}."


def check_mode(image: Image.Image, path: str | os.PathLike) -> str | None:
  """Why `image` cannot become 8-bit RGB (a message naming `path`), or None if it can.

  The mode decides, except for 'I' images, which are also refused when a value falls
  outside 0..65535 (the pixels are read for that).
  """
  mode = image.mode
  if mode in _PILLOW_CONVERTS or mode in _SIXTEEN_BIT_GREY - {"I"}:
    return None
  if mode == "I":
    low, high = image.getextrema()
    if low < 0 or high > 65535:
      return _refusal(mode, path, f"holds values {low}..{high}, outside 0..65535, so it "
                      "is not 16-bit grey")
    return None
  return _refusal(mode, path)


def to_rgb(image: Image.Image, path: str | os.PathLike) -> Image.Image:
  """The image as 8-bit RGB (`image` itself if it already is).

  Args:
    image: a decoded PIL image.
    path: its file, quoted in errors.

  Raises:
    UnsupportedImageError: ``check_mode`` refuses the image.
  """
  problem = check_mode(image, path)
  if problem:
    raise UnsupportedImageError(problem)
  if image.mode == "RGB":
    return image
  if image.mode in _PILLOW_CONVERTS:
    return image.convert("RGB")
  grey = np.asarray(image)  # 16-bit grey
  grey8 = (grey.astype(np.uint32) >> 8).astype(np.uint8)
  return Image.fromarray(grey8).convert("RGB")


def resized(rgb: Image.Image, size: int | None) -> Image.Image:
  """`rgb` at size x size, bilinear (antialiased when shrinking), as every image is prepared;
  unchanged for None or when it already has that size."""
  if size is None or rgb.size == (size, size):
    return rgb
  return rgb.resize((size, size), Image.Resampling.BILINEAR)


def read_resized(path: str | os.PathLike, size: int) -> np.ndarray:
  """The image file at `path` as a prepared dataset stores it: [size, size, 3] uint8.

  8-bit RGB (``to_rgb``), then ``resized``: the same pixels as the image of a prepared
  sample (`builders.encode_sample`, whose PNG is lossless), without the PNG round trip.
  """
  with Image.open(path) as image:
    image.load()
    return np.asarray(resized(to_rgb(image, path), size), np.uint8)

r"""Writes a small real-photograph dataset in MVTec AD's layout, for dataset 'folder'.

  python -m data_prep.photo_parts --output ~/photo_parts [--set parts|lookalike] \
      [--train 60] [--test_good 20] [--test_defective 20] [--size 128] [--seed 0]

Every class is one photograph bundled with scikit-image (`skimage.data`; no download).
Training crops come from the left 60% of the photograph and test crops from the right 40%,
so no test image shares a pixel with a training image. Defective test images carry one
drawn-in defect with its mask (`ground_truth/<kind>/<stem>_mask.png`):

  scratch   a thin straight line, darker or brighter than the surface
  spot      an elliptical blot of a shifted intensity, soft-edged
  stain     a patch of another photograph blended in (foreign material)

Sets:
  parts      five distinct surfaces: brick, grass, gravel, moon (lunar surface), ihc
             (stained tissue, RGB)
  lookalike  two pairs that look alike, each photograph at two scales: brick and
             brick_zoom (2x magnified), gravel and gravel_zoom; routing without labels must
             tell the members of a pair apart
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
from absl import app, flags
from PIL import Image

TRAIN_SHARE = 0.6  # left part of each photograph for training crops; the rest for test crops
DEFECT_KINDS = ("scratch", "spot", "stain")
# set -> class -> (photograph, magnification of the crop)
SETS = {
    "parts": {"brick": ("brick", 1), "grass": ("grass", 1), "gravel": ("gravel", 1),
              "moon": ("moon", 1), "ihc": ("immunohistochemistry", 1)},
    "lookalike": {"brick": ("brick", 1), "brick_zoom": ("brick", 2),
                  "gravel": ("gravel", 1), "gravel_zoom": ("gravel", 2)},
}


def _photo(name: str) -> np.ndarray:
  try:
    import skimage.data  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit("data_prep.photo_parts needs scikit-image: pip install scikit-image") from e
  photo = getattr(skimage.data, name)()
  return np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]


def _crop(photo: np.ndarray, region: str, source_size: int, size: int,
          rng: np.random.Generator) -> np.ndarray:
  """A size x size RGB image from a random source_size square inside the region."""
  h, w = photo.shape[:2]
  split = int(w * TRAIN_SHARE)
  x0, x1 = (0, split) if region == "train" else (split, w)
  if x1 - x0 < source_size or h < source_size:
    raise ValueError(f"a {source_size}px crop does not fit the {region} part "
                     f"({x1 - x0}x{h}) of a {w}x{h} photograph; use a smaller --size")
  y = int(rng.integers(0, h - source_size + 1))
  x = int(rng.integers(x0, x1 - source_size + 1))
  patch = Image.fromarray(photo[y:y + source_size, x:x + source_size])
  return np.asarray(patch.resize((size, size), Image.BICUBIC))


def _defect(image: np.ndarray, kind: str, foreign: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The image with one defect drawn in, and its boolean mask."""
  size = image.shape[0]
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
  out = image.astype(np.float32)
  if kind == "scratch":
    angle = rng.uniform(0, np.pi)
    half_length = rng.uniform(0.15, 0.3) * size
    along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    mask = (np.abs(across) <= max(1.0, size / 96)) & (np.abs(along) <= half_length)
    out[mask] = 25.0 if out[mask].mean() > 110 else 230.0
    alpha = mask.astype(np.float32)
  else:
    ry, rx = rng.uniform(0.06, 0.14, 2) * size
    radius = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    mask = radius <= 1.0
    alpha = np.clip(1.5 * (1.0 - radius), 0.0, 1.0)  # soft edge
    if kind == "spot":
      target = out + rng.choice([-1.0, 1.0]) * 70.0
    else:  # stain
      target = foreign.astype(np.float32)
    out = out * (1 - alpha[..., None]) + target * alpha[..., None]
  return np.clip(out, 0, 255).astype(np.uint8), mask


def _save(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def write_photo_parts(output: str | pathlib.Path, *, photo_set: str = "parts", train: int = 60,
                      test_good: int = 20, test_defective: int = 20, size: int = 128,
                      seed: int = 0) -> tuple[str, ...]:
  """Writes the set's classes under output in MVTec AD's layout; returns the class names.

  Refuses a non-empty output folder, so an earlier dataset is never mixed with a new one.
  """
  if photo_set not in SETS:
    raise ValueError(f"unknown set {photo_set!r}; expected one of {sorted(SETS)}")
  for name, value in (("train", train), ("test_good", test_good),
                      ("test_defective", test_defective), ("size", size)):
    if value < (8 if name == "size" else 0):
      raise ValueError(f"{name} must be >= {8 if name == 'size' else 0}, got {value}")
  output = pathlib.Path(output).expanduser()
  if output.exists() and any(output.iterdir()):
    raise ValueError(f"{output} is not empty; give a new folder")
  rng = np.random.default_rng(seed)
  stain_source = _photo("coffee")
  for class_name, (photo_name, zoom) in SETS[photo_set].items():
    photo = _photo(photo_name)
    source_size = size // zoom
    root = output / class_name
    for i in range(train):
      _save(root / "train/good" / f"{i:03d}.png", _crop(photo, "train", source_size, size, rng))
    for i in range(test_good):
      _save(root / "test/good" / f"{i:03d}.png", _crop(photo, "test", source_size, size, rng))
    for i in range(test_defective):
      kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
      foreign = _crop(stain_source, "train", size, size, rng)
      image, mask = _defect(_crop(photo, "test", source_size, size, rng), kind, foreign, rng)
      _save(root / "test" / kind / f"{i:03d}.png", image)
      _save(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
  return tuple(SETS[photo_set])


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  fv = flag_values
  flags.DEFINE_string("output", None, "New folder for the dataset.", flag_values=fv)
  flags.DEFINE_enum("set", "parts", sorted(SETS), "Which classes.", flag_values=fv)
  flags.DEFINE_integer("train", 60, "Normal training images per class.", flag_values=fv)
  flags.DEFINE_integer("test_good", 20, "Normal test images per class.", flag_values=fv)
  flags.DEFINE_integer("test_defective", 20, "Defective test images per class.",
                       flag_values=fv)
  flags.DEFINE_integer("size", 128, "Image side in pixels.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of crop places and defects.", flag_values=fv)
  flags.mark_flags_as_required(["output"], flag_values=fv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  try:
    classes = write_photo_parts(args.output, photo_set=args.set, train=args.train,
                                test_good=args.test_good, test_defective=args.test_defective,
                                size=args.size, seed=args.seed)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.output}: classes {', '.join(classes)}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)

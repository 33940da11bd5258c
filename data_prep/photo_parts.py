r"""Writes a small real-photograph dataset in MVTec AD's layout, for dataset 'folder'.

  python -m data_prep.photo_parts --output ~/photo_parts [--set parts|lookalike] \
      [--layout blocks|halves] [--train 48] [--test_good 20] [--test_defective 20] \
      [--size 128] [--source_size 64] [--seed 0]

Every class is one photograph bundled with scikit-image (`skimage.data`; no download). Each
image is a source_size square of the photograph resized to size x size. No test image shares
a pixel with a training image. Where they are cut (`--layout`):

  blocks   the photograph is tiled with blocks of 2 x 2 squares; a quarter of the blocks,
           dealt at random, are test blocks, the rest are cut into training squares. Training
           images never overlap one another, and test images (anywhere inside a test block)
           come from all over the photograph: new parts of the same surface, as a production
           line makes them.
  halves   training images anywhere in the left 60 % of the photograph (overlapping one
           another), test images in the right 40 %: new parts that differ from the training
           parts as two regions of one surface do (a shift).

Defective test images carry one drawn-in defect with its mask
(`ground_truth/<kind>/<stem>_mask.png`):

  scratch   a thin straight line in the paint colour least like the surface
  spot      a soft-edged ellipse where the texture is wiped out and the brightness shifted
            (a smear or a dent)
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
from PIL import Image, ImageFilter

LAYOUTS = ("blocks", "halves")
TRAIN_SHARE = 0.6  # 'halves': the left part of each photograph, for training crops
TEST_BLOCK_SHARE = 0.25  # 'blocks': the share of blocks set aside for test crops
DEFECT_KINDS = ("scratch", "spot", "stain")
# Paint or marker colours a scratch can show; each image gets the one least like its pixels.
FOREIGN_COLOURS = np.array([(230, 30, 30), (30, 200, 30), (30, 60, 230), (240, 220, 20)],
                           np.float32)
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


def _cut(photo: np.ndarray, corner: tuple[int, int], source_size: int,
         size: int) -> np.ndarray:
  y, x = corner
  patch = Image.fromarray(photo[y:y + source_size, x:x + source_size])
  return np.asarray(patch.resize((size, size), Image.BICUBIC))


def _inside(box: tuple[int, int, int, int], source_size: int,
            rng: np.random.Generator) -> tuple[int, int]:
  """The corner of a random source_size square inside box = (y0, x0, y1, x1)."""
  y0, x0, y1, x1 = box
  return (int(rng.integers(y0, y1 - source_size + 1)),
          int(rng.integers(x0, x1 - source_size + 1)))


def plan_crops(shape: tuple[int, int], layout: str, source_size: int, train: int,
               rng: np.random.Generator) -> tuple[list[tuple[int, int]],
                                                  list[tuple[int, int, int, int]]]:
  """Where to cut: the corners of the training squares, and the boxes test squares lie in.

  Every test box is disjoint from every training square, so no test image shares a pixel
  with a training image.
  """
  h, w = shape
  if layout == "halves":
    split = int(w * TRAIN_SHARE)
    if min(split, w - split, h) < source_size:
      raise ValueError(f"a {source_size}px square does not fit both parts ({split} and "
                       f"{w - split} px wide) of a {w}x{h} photograph; use a smaller "
                       "--source_size")
    return ([_inside((0, 0, h, split), source_size, rng) for _ in range(train)],
            [(0, split, h, w)])
  block = 2 * source_size
  blocks = [(y, x) for y in range(0, h - block + 1, block)
            for x in range(0, w - block + 1, block)]
  num_test = max(1, round(TEST_BLOCK_SHARE * len(blocks)))
  order = rng.permutation(len(blocks))
  test_blocks = [blocks[i] for i in order[:num_test]]
  squares = [(y + dy, x + dx) for y, x in (blocks[i] for i in order[num_test:])
             for dy in (0, source_size) for dx in (0, source_size)]
  if train > len(squares):
    raise ValueError(f"a {w}x{h} photograph holds {len(squares)} training squares of "
                     f"{source_size}px in layout 'blocks', not --train {train}; use fewer "
                     "training images or a smaller --source_size")
  return ([squares[i] for i in rng.permutation(len(squares))[:train]],
          [(y, x, y + block, x + block) for y, x in test_blocks])


def _most_foreign_colour(image: np.ndarray) -> np.ndarray:
  """Of a few saturated colours, the one farthest from every pixel of the image."""
  pixels = image.reshape(-1, 3).astype(np.float32)
  distance = [np.min(np.sum((pixels - c) ** 2, -1)) for c in FOREIGN_COLOURS]
  return FOREIGN_COLOURS[int(np.argmax(distance))]


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
    mask = (np.abs(across) <= max(1.0, size / 64)) & (np.abs(along) <= half_length)
    out[mask] = _most_foreign_colour(image)
    return out.astype(np.uint8), mask
  ry, rx = rng.uniform(0.08, 0.16, 2) * size
  radius = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
  mask = radius <= 1.0
  alpha = np.clip(1.5 * (1.0 - radius), 0.0, 1.0)[..., None]  # soft edge
  if kind == "spot":
    # The surface's texture wiped out and its brightness shifted, as by a smear or a dent.
    smeared = Image.fromarray(image).filter(ImageFilter.BoxBlur(max(1, size // 16)))
    target = np.asarray(smeared, np.float32) + rng.choice([-1.0, 1.0]) * 60.0
  else:  # stain
    target = foreign.astype(np.float32)
  out = out * (1 - alpha) + target * alpha
  return np.clip(out, 0, 255).astype(np.uint8), mask


def _save(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def write_photo_parts(output: str | pathlib.Path, *, photo_set: str = "parts",
                      layout: str = "blocks", train: int = 48, test_good: int = 20,
                      test_defective: int = 20, size: int = 128, source_size: int = 64,
                      seed: int = 0) -> tuple[str, ...]:
  """Writes the set's classes under output in MVTec AD's layout; returns the class names.

  Refuses a non-empty output folder, so an earlier dataset is never mixed with a new one.
  A magnified class ('lookalike' set) cuts squares of source_size / magnification.
  """
  if photo_set not in SETS:
    raise ValueError(f"unknown set {photo_set!r}; expected one of {sorted(SETS)}")
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
  for name, value, least in (("train", train, 0), ("test_good", test_good, 0),
                             ("test_defective", test_defective, 0), ("size", size, 8),
                             ("source_size", source_size, 8)):
    if value < least:
      raise ValueError(f"{name} must be >= {least}, got {value}")
  output = pathlib.Path(output).expanduser()
  if output.exists() and any(output.iterdir()):
    raise ValueError(f"{output} is not empty; give a new folder")
  rng = np.random.default_rng(seed)
  stain_source = _photo("coffee")
  plans = {}
  for class_name, (photo_name, zoom) in SETS[photo_set].items():
    photo = _photo(photo_name)
    square = source_size // zoom
    plans[class_name] = (photo, square, plan_crops(photo.shape[:2], layout, square, train, rng))
  for class_name, (photo, square, (train_corners, test_boxes)) in plans.items():
    def test_crop():
      box = test_boxes[int(rng.integers(len(test_boxes)))]
      return _cut(photo, _inside(box, square, rng), square, size)
    root = output / class_name
    for i, corner in enumerate(train_corners):
      _save(root / "train/good" / f"{i:03d}.png", _cut(photo, corner, square, size))
    for i in range(test_good):
      _save(root / "test/good" / f"{i:03d}.png", test_crop())
    for i in range(test_defective):
      kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
      h, w = stain_source.shape[:2]
      foreign = _cut(stain_source, _inside((0, 0, h, w), size, rng), size, size)
      image, mask = _defect(test_crop(), kind, foreign, rng)
      _save(root / "test" / kind / f"{i:03d}.png", image)
      _save(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
  return tuple(SETS[photo_set])


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  fv = flag_values
  flags.DEFINE_string("output", None, "New folder for the dataset.", flag_values=fv)
  flags.DEFINE_enum("set", "parts", sorted(SETS), "Which classes.", flag_values=fv)
  flags.DEFINE_enum("layout", "blocks", list(LAYOUTS), "Where training and test images are "
                    "cut from each photograph.", flag_values=fv)
  flags.DEFINE_integer("train", 48, "Normal training images per class.", flag_values=fv)
  flags.DEFINE_integer("test_good", 20, "Normal test images per class.", flag_values=fv)
  flags.DEFINE_integer("test_defective", 20, "Defective test images per class.",
                       flag_values=fv)
  flags.DEFINE_integer("size", 128, "Image side in pixels.", flag_values=fv)
  flags.DEFINE_integer("source_size", 64, "Side in pixels of the photograph's square that "
                       "becomes one image.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of crop places and defects.", flag_values=fv)
  flags.mark_flags_as_required(["output"], flag_values=fv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  try:
    classes = write_photo_parts(args.output, photo_set=args.set, layout=args.layout,
                                train=args.train, test_good=args.test_good,
                                test_defective=args.test_defective, size=args.size,
                                source_size=args.source_size, seed=args.seed)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.output}: classes {', '.join(classes)}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)

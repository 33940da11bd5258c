"""Reading your own images: any class names, in MVTec AD's layout or a flat one.

Each class is one sub-folder of ``manual_dir`` (hidden folders are ignored) in
one of two layouts, told apart by what the class folder holds:

MVTec AD's layout (the class folder has ``train/``)::

    <class>/train/good/*                      normal training images (required)
    <class>/test/good/*                       normal test images (optional)
    <class>/test/<type>/*                     defective test images (optional)
    <class>/ground_truth/<type>/<stem>_mask.* their masks (optional; '<stem>.*'
                                              is accepted too)

Flat layout, like anomalib's ``Folder`` (the class folder has ``normal/``)::

    <class>/normal/*                          normal images (required)
    <class>/abnormal/*                        defective images (optional; in
                                              sub-folders, the folder names the
                                              defect type, else it is 'abnormal')
    <class>/mask/[<type>/]<stem>[_mask].*     their masks (optional)

In the flat layout, a share ``normal_test_share`` of the normal images (rounded
half up, at most all but one) are test normals and the rest train; which ones
depends only on each image's file name (the smallest SHA-256 digests of the
names relative to manual_dir), so adding or removing other images does not
move an image between splits unless the count itself changes, and the split is
the same on every machine.

Masks pair with their image by stem (any extension of
``common.IMAGE_EXTENSIONS``); any non-zero value is foreground. Masks are
optional, but within a class either every defective image has one or none
does: a defective image without a mask is then stored with an all-zero mask,
and the pixel metrics of that class are reported as skipped. A class with no
defective test images (or no test images at all) is valid: it trains, and
evaluation skips what needs defective images.

Class names become TFDS config names and folder names (``<class>_<size>``),
are written comma-separated in ``dataset.classes`` and prefixed with
``<dataset>/`` in mixtures, so only ASCII letters, digits, '_', '-' and '.'
are accepted, starting with a letter or digit (``common.CLASS_NAME_RULE``); any
other name is refused, naming the folder.
"""

from __future__ import annotations

import hashlib
import pathlib

from ccl_jax.datasets.common import (
    IMAGE_EXTENSIONS, Sample, class_name_problem, images_in, subfolders)

__all__ = ["DEFAULT_NORMAL_TEST_SHARE", "LAYOUT_DESCRIPTION", "list_classes", "parse_share",
           "scan_folder", "held_out_normals"]

DEFAULT_NORMAL_TEST_SHARE = 0.2
LAYOUT_DESCRIPTION = (
    "Expected layout (one folder per class, either form): <manual_dir>/<class>/"
    "train/good/*, optional <class>/test/{good,<type>}/* and <class>/ground_truth/"
    "<type>/<stem>_mask.*; or <manual_dir>/<class>/normal/*, optional <class>/"
    "abnormal/[<type>/]* and <class>/mask/[<type>/]<stem>[_mask].*")


def list_classes(manual_dir) -> tuple[str, ...]:
  """Every non-hidden sub-folder of `manual_dir`, sorted (names are checked later)."""
  return tuple(d.name for d in subfolders(pathlib.Path(manual_dir)))


def parse_share(value) -> float:
  """`value` as a share in [0, 1); raises ValueError otherwise."""
  share = float(value)
  if not 0.0 <= share < 1.0:
    raise ValueError(f"{value!r} is not in [0, 1)")
  return share


def held_out_normals(file_names: list[str], share: float) -> set[str]:
  """The file names of normal images held out as test normals (see module doc)."""
  n = len(file_names)
  k = min(int(share * n + 0.5), max(n - 1, 0))
  ranked = sorted(file_names, key=lambda f: (hashlib.sha256(f.encode()).digest(), f))
  return set(ranked[:k])


def _find_mask(folders: list[pathlib.Path], stem: str) -> pathlib.Path | None:
  for folder in folders:
    for candidate_stem in (f"{stem}_mask", stem):
      for ext in IMAGE_EXTENSIONS:
        for cand in (folder / f"{candidate_stem}{ext}",
                     folder / f"{candidate_stem}{ext.upper()}"):
          if cand.is_file():
            return cand
  return None


def _pair_masks(defective: list[tuple[str, pathlib.Path, list[pathlib.Path]]],
                rel, problems: list) -> list[Sample]:
  """Test samples of the defective images: all with masks, or all without.

  `defective` holds (defect type, image, folders searched for its mask).
  """
  found = [(t, img, _find_mask(folders, img.stem)) for t, img, folders in defective]
  with_mask = [f for f in found if f[2] is not None]
  if with_mask and len(with_mask) != len(found):
    for (_, img, folders), (_, _, mask) in zip(defective, found):
      if mask is None:
        wanted = ", ".join(str(f / f"{img.stem}_mask.png") for f in folders)
        problems.append((img, "defective image has no mask while other images of its "
                         "class have one (give every defective image of a class a mask, "
                         f"or none); expected {wanted}"))
    return []
  return [Sample("test", img, mask, 1, t, rel(img)) for t, img, mask in found]


def _scan_mvtec_form(cdir: pathlib.Path, class_name: str,
                     problems: list, rel) -> list[Sample]:
  train = images_in(cdir / "train" / "good")
  if not train:
    problems.append((cdir / "train" / "good", f"class {class_name!r} has no training "
                     "images (expected train/good/*)"))
  samples = [Sample("train", p, None, 0, "good", rel(p)) for p in train]
  samples += [Sample("test", p, None, 0, "good", rel(p))
              for p in images_in(cdir / "test" / "good")]
  defective = [(d.name, img, [cdir / "ground_truth" / d.name])
               for d in subfolders(cdir / "test") if d.name != "good"
               for img in images_in(d)]
  return samples + _pair_masks(defective, rel, problems)


def _scan_flat_form(cdir: pathlib.Path, class_name: str,
                    problems: list, rel, share: float) -> list[Sample]:
  normal = images_in(cdir / "normal")
  names = [rel(p) for p in normal]
  held_out = held_out_normals(names, share)
  if len(normal) - len(held_out) < 1:
    problems.append((cdir / "normal", f"class {class_name!r} has no normal images "
                     "(expected normal/*)"))
  train = [Sample("train", p, None, 0, "good", n)
           for p, n in zip(normal, names) if n not in held_out]
  test = [Sample("test", p, None, 0, "good", n)
          for p, n in zip(normal, names) if n in held_out]
  abnormal, mask_dir = cdir / "abnormal", cdir / "mask"
  defective = [("abnormal", img, [mask_dir]) for img in images_in(abnormal)]
  defective += [(d.name, img, [mask_dir / d.name, mask_dir])
                for d in subfolders(abnormal) for img in images_in(d)]
  return train + test + _pair_masks(defective, rel, problems)


def scan_folder(manual_dir: pathlib.Path, class_name: str, problems: list, *,
                normal_test_share: str = str(DEFAULT_NORMAL_TEST_SHARE)
                ) -> list[Sample]:
  """Samples of one class folder in either layout; appends every problem found.

  Order: train by file name, then test normals, then defective images by (type, file
  name); file_name is the path relative to manual_dir.
  """
  root = pathlib.Path(manual_dir)
  cdir = root / class_name

  def rel(p):
    return p.relative_to(root).as_posix()

  problem = class_name_problem(class_name)
  if problem:
    problems.append((cdir, problem))
    return []
  if not cdir.is_dir():
    problems.append((cdir, f"class folder for {class_name!r} is missing"))
    return []
  mvtec_form, flat_form = (cdir / "train").is_dir(), (cdir / "normal").is_dir()
  if mvtec_form and flat_form:
    problems.append((cdir, "holds both train/ (MVTec AD layout) and normal/ (flat "
                     "layout); keep one"))
    return []
  if not (mvtec_form or flat_form):
    problems.append((cdir, "is neither a class in MVTec AD's layout (no train/good/) "
                     "nor in the flat layout (no normal/)"))
    return []
  if mvtec_form:
    samples = _scan_mvtec_form(cdir, class_name, problems, rel)
  else:
    samples = _scan_flat_form(cdir, class_name, problems, rel,
                              parse_share(normal_test_share))
  return sorted(samples, key=lambda s: (s.split != "train", s.label,
                                        s.defect_type if s.label else "", s.file_name))

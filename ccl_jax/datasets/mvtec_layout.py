"""Reading and validating class folders in MVTec AD layout.

Layout of one class folder (``<manual_dir>/<class>``)::

    train/good/*.png                       normal training images
    test/good/*.png                        normal test images
    test/<defect>/*.png                    anomalous test images
    ground_truth/<defect>/<stem>_mask.png  their masks (0 = normal)

:func:`scan_classes` collects every problem it finds (missing folders, missing
masks, unreadable or truncated images, images that cannot become 8-bit RGB
(see :mod:`.images`), mask/image size mismatches) and raises
a single :class:`DatasetError` listing each offending path, so a bad input is
reported in full before anything gets written.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import os
import pathlib
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from PIL import Image

from ccl_jax.datasets import images

__all__ = [
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "Sample",
    "check_manual_dir",
    "check_unique_names",
    "fingerprint",
    "ordered_map",
    "scan_class",
    "scan_classes",
    "verify_samples",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

LAYOUT_DESCRIPTION = (
    "Expected layout (MVTec AD): <manual_dir>/<class>/train/good/*.png, "
    "<manual_dir>/<class>/test/{good,<defect>}/*.png and "
    "<manual_dir>/<class>/ground_truth/<defect>/<stem>_mask.png")


class DatasetError(ValueError):
  """Invalid or missing dataset input. ``problems`` lists (path, message)."""

  def __init__(self, summary: str, problems: Sequence[tuple[str, str]] = (),
               hint: str = ""):
    self.summary = summary
    self.problems = [(str(p), m) for p, m in problems]
    self.hint = hint
    lines = [summary]
    lines += [f"  - {p}: {m}" for p, m in self.problems]
    if hint:
      lines.append(hint)
    super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of a class folder."""
  split: str                     # 'train' or 'test'
  image_path: pathlib.Path
  mask_path: pathlib.Path | None  # None for good images
  label: int                     # 0 good, 1 anomalous
  defect_type: str               # 'good' for normal images
  file_name: str                 # image path relative to manual_dir (posix)
  # (k, n): the sample is the k-th (0-based) of n equal-width vertical
  # strips of the image file (and of its mask), e.g. one view of a
  # multi-view strip; None: the whole image.
  view: tuple[int, int] | None = None


def _images_in(folder: pathlib.Path) -> list[pathlib.Path]:
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".")
                and p.suffix.lower() in IMAGE_EXTENSIONS)


def _subdirs(folder: pathlib.Path) -> list[pathlib.Path]:
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir()
                if p.is_dir() and not p.name.startswith("."))


def _find_mask(gt_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
  """``gt_dir/<stem><ext>`` for any image extension (either case)."""
  for ext in IMAGE_EXTENSIONS:
    for cand in (gt_dir / f"{stem}{ext}", gt_dir / f"{stem}{ext.upper()}"):
      if cand.is_file():
        return cand
  return None


def check_manual_dir(manual_dir, *, title: str, instructions: str
                     ) -> pathlib.Path:
  """Returns manual_dir as a Path; raises DatasetError if unusable."""
  if manual_dir is None or str(manual_dir) == "":
    raise DatasetError(
        f"{title}: no manual_dir given; it must point at the extracted "
        "dataset.", hint=instructions)
  path = pathlib.Path(manual_dir).expanduser()
  if not path.exists():
    raise DatasetError(f"{title}: manual_dir {path} does not exist.",
                       [(path, "missing")], hint=instructions)
  if not path.is_dir():
    raise DatasetError(f"{title}: manual_dir {path} is not a directory.",
                       [(path, "not a directory")], hint=instructions)
  if not any(p for p in path.iterdir() if not p.name.startswith(".")):
    raise DatasetError(f"{title}: manual_dir {path} is empty.",
                       [(path, "empty directory")], hint=instructions)
  return path.absolute()


def scan_class(manual_dir: pathlib.Path, class_name: str,
               problems: list[tuple[str, str]], *, good: str = "good",
               mask_suffix: str = "_mask") -> list[Sample]:
  """Lists the samples of one class folder; appends layout problems.

  Order: train images sorted by name, then test/good, then each defect
  type in sorted order, images sorted by name.

  ``good`` names the folder of normal images (``train/<good>``,
  ``test/<good>``; BTAD: 'ok') and ``mask_suffix`` the suffix of mask stems
  in ``ground_truth/<defect>/`` (BTAD: '', masks named like their image);
  masks may have any of ``IMAGE_EXTENSIONS``.
  """
  manual_dir = pathlib.Path(manual_dir)
  cdir = manual_dir / class_name

  def rel(p):
    return p.relative_to(manual_dir).as_posix()

  if not cdir.is_dir():
    problems.append((cdir, f"class folder for {class_name!r} is missing"))
    return []
  samples = []
  train = _images_in(cdir / "train" / good)
  if not train:
    problems.append((cdir / "train" / good,
                     f"class {class_name!r} has no training images "
                     f"(expected train/{good}/*.png)"))
  samples += [Sample("train", p, None, 0, "good", rel(p)) for p in train]
  test_dir = cdir / "test"
  n_test = 0
  for ddir in sorted(_subdirs(test_dir),
                     key=lambda d: (d.name != good, d.name)):
    defect = ddir.name
    for img in _images_in(ddir):
      n_test += 1
      if defect == good:
        samples.append(Sample("test", img, None, 0, "good", rel(img)))
        continue
      gt_dir = cdir / "ground_truth" / defect
      mask = _find_mask(gt_dir, img.stem + mask_suffix)
      if mask is None:
        problems.append(
            (img, "defective test image has no mask (expected "
             f"{gt_dir / (img.stem + mask_suffix + '.png')})"))
        continue
      samples.append(Sample("test", img, mask, 1, defect, rel(img)))
  if n_test == 0:
    problems.append((test_dir, f"class {class_name!r} has no test images "
                     f"(expected test/{good}/*.png, test/<defect>/*.png)"))
  return samples


def _verify_one(sample: Sample) -> list[tuple[str, str]]:
  found = []

  def load(path, *, is_image: bool):
    try:
      with Image.open(path) as im:
        im.load()  # full decode: catches truncated files
        # Masks need only numbers: any non-zero value is foreground.
        problem = images.check_mode(im, path) if is_image else None
        if problem:
          found.append((path, problem.removeprefix(f"{path}: ")))
          return None
        return im.size
    except Exception as e:  # noqa: BLE001 - any decoder failure
      found.append((path, "unreadable or truncated image "
                    f"({type(e).__name__}: {e})"))
      return None

  size = load(sample.image_path, is_image=True)
  if sample.view is not None and size is not None:
    k, n = sample.view
    if size[0] < n:
      found.append((sample.image_path,
                    f"image width {size[0]} is too small to split into "
                    f"{n} views"))
  if sample.mask_path is not None:
    msize = load(sample.mask_path, is_image=False)
    if size is not None and msize is not None and msize != size:
      found.append((sample.mask_path,
                    f"mask size {msize[0]}x{msize[1]} differs from "
                    f"image size {size[0]}x{size[1]} of "
                    f"{sample.image_path}"))
  return found


def _num_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T],
                workers: int | None = None) -> Iterator[R]:
  """Thread-pool map yielding results in input order, bounded look-ahead."""
  workers = workers or _num_workers()
  it = iter(items)
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    pending = collections.deque(
        ex.submit(fn, x) for x in itertools.islice(it, 2 * workers))
    try:
      while pending:
        result = pending.popleft().result()
        for x in itertools.islice(it, 1):
          pending.append(ex.submit(fn, x))
        yield result
    finally:
      for fut in pending:
        fut.cancel()


def verify_samples(samples: Sequence[Sample],
                   problems: list[tuple[str, str]]) -> None:
  """Fully decodes every image and mask, checks mask sizes.

  Each file is checked once, even when several samples (views) use it.
  """
  seen, unique = set(), []
  for s in samples:
    key = (s.image_path, s.mask_path)
    if key not in seen:
      seen.add(key)
      unique.append(s)
  for found in ordered_map(_verify_one, unique):
    problems.extend(found)


def check_unique_names(samples: Sequence[Sample],
                       problems: list[tuple[str, str]]) -> None:
  """File names are the TFDS keys: each may appear once per split."""
  seen = set()
  for s in samples:
    if (s.split, s.file_name) in seen:
      problems.append((s.image_path, f"listed more than once in the "
                       f"{s.split} split"))
    seen.add((s.split, s.file_name))


ScanFn = Callable[[pathlib.Path, str, list], list]


def scan_classes(manual_dir, class_names: Sequence[str], *, title: str,
                 instructions: str, verify: bool = True,
                 scan: ScanFn | None = None,
                 layout: str = LAYOUT_DESCRIPTION
                 ) -> dict[str, list[Sample]]:
  """Scans (and optionally verifies) several classes; one error for all.

  ``scan(manual_dir, class_name, problems)`` lists one class's samples
  (default: :func:`scan_class`, MVTec AD layout); ``layout`` describes the
  expected layout in the error message.
  """
  scan = scan or scan_class
  manual_dir = check_manual_dir(manual_dir, title=title,
                                instructions=instructions)
  problems: list[tuple[str, str]] = []
  out = {c: scan(manual_dir, c, problems) for c in class_names}
  for c in class_names:
    check_unique_names(out[c], problems)
  if verify:
    verify_samples([s for c in class_names for s in out[c]], problems)
  if problems:
    raise DatasetError(
        f"{title}: {len(problems)} problem(s) in {manual_dir} "
        f"(classes: {', '.join(class_names)}):", problems,
        hint=layout + ". " + instructions)
  return out


def fingerprint(samples: Sequence[Sample]) -> str:
  """Cheap identity of a class's source files (names and byte sizes)."""
  h = hashlib.sha256()
  for s in samples:
    h.update(f"{s.split}|{s.file_name}|{s.image_path.stat().st_size}|"
             .encode())
    if s.mask_path is not None:
      h.update(f"{s.mask_path.name}|{s.mask_path.stat().st_size}|"
               .encode())
  return h.hexdigest()[:32]

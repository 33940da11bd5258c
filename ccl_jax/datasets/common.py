"""What every raw-layout reader of datasets shares.

A reader (``mvtec_layout``, ``layouts``, ``folder_layout``) lists the
:class:`Sample` objects of one class and appends every problem it finds to a
``problems`` list; :func:`scan_classes` runs it over several classes, fully
decodes every image and mask (:func:`verify_samples`) and raises a single
:class:`DatasetError` naming each offending path, so a bad input is reported
in full before anything gets written.

Class names of datasets whose classes are whatever folders hold (``folder``,
``manta``) follow one rule (:func:`class_name_problem`): they become TFDS
config and folder names (``<class>_<size>``), are written comma-separated in
``dataset.classes`` and prefixed with ``<dataset>/`` in mixtures.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import os
import pathlib
import re
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from PIL import Image

from ccl_jax.datasets import images

__all__ = [
    "CLASS_NAME_RULE", "DatasetError", "IMAGE_EXTENSIONS", "Sample", "check_manual_dir",
    "check_unique_names", "class_name_problem", "fingerprint", "images_in", "ordered_map",
    "scan_classes", "subfolders", "verify_samples",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CLASS_NAME_RULE = ("ASCII letters, digits, '_', '-' and '.', starting with a letter or "
                   "digit")
_CLASS_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


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


def images_in(folder: pathlib.Path) -> list[pathlib.Path]:
  """The image files of `folder` (by extension, hidden ones skipped), sorted; [] if absent."""
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".")
                and p.suffix.lower() in IMAGE_EXTENSIONS)


def subfolders(folder: pathlib.Path) -> list[pathlib.Path]:
  """The non-hidden sub-folders of `folder`, sorted; [] if absent."""
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir()
                if p.is_dir() and not p.name.startswith("."))


def class_name_problem(name: str) -> str | None:
  """Why `name` cannot be a class name, or None if it can."""
  if isinstance(name, str) and _CLASS_NAME_RE.fullmatch(name):
    return None
  return (f"class name {name!r} refused: it becomes a TFDS config and folder name and "
          f"is listed comma-separated in dataset.classes, so it may hold only "
          f"{CLASS_NAME_RULE}")


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
                 instructions: str, scan: ScanFn, layout: str,
                 verify: bool = True) -> dict[str, list[Sample]]:
  """Scans (and optionally verifies) several classes; one error for all.

  ``scan(manual_dir, class_name, problems)`` lists one class's samples in
  a dataset's layout; ``layout`` describes that layout in the error message.
  """
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

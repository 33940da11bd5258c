"""Readers of VisA, BTAD, Real-IAD and MANTA as distributed.

Each ``scan_*`` function lists the :class:`~.common.Sample` objects of
one class and appends every problem it finds to ``problems`` as
``(path, message)`` pairs; nothing is raised here, so that
:func:`~.common.scan_classes` can report all problems of all requested
classes in a single :class:`~.common.DatasetError`. Images are fully
decoded (and mask sizes checked) later, by ``verify_samples``.

Sample order is deterministic and documented per reader: train sorted by
``file_name``, then test normal images, then anomalous ones (sorted by defect
type, then ``file_name``).
"""

from __future__ import annotations

import csv
import json
import pathlib
import re
from typing import Sequence

from ccl_jax.datasets import mvtec_layout
from ccl_jax.datasets.common import Sample, images_in, subfolders

__all__ = [
    "BTAD_CLASSES", "MANTA_NUM_VIEWS", "MANTA_VIEW_MODES", "REAL_IAD_CLASSES",
    "REAL_IAD_RESOLUTIONS", "REAL_IAD_VIEWS", "VISA_CLASSES",
    "find_manta_class", "list_manta_classes", "realiad_view", "scan_btad",
    "scan_manta", "scan_real_iad", "scan_visa", "sort_samples",
]

VISA_CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum",
                "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
                "pipe_fryum")
BTAD_CLASSES = ("01", "02", "03")
REAL_IAD_CLASSES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser",
    "fire_hood", "mint", "mounts", "pcb", "phone_battery", "plastic_nut",
    "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
    "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy",
    "toy_brick", "transistor1", "u_block", "usb", "usb_adaptor", "vcpill",
    "wooden_beads", "woodstick", "zipper")
REAL_IAD_RESOLUTIONS = ("256", "512", "1024", "raw")
REAL_IAD_VIEWS = ("all", "C1", "C2", "C3", "C4", "C5")
MANTA_NUM_VIEWS = 5
MANTA_VIEW_MODES = ("split", "stacked")

VISA_SPLIT_FILE = ("split_csv", "1cls.csv")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def _rel(root: pathlib.Path, path: pathlib.Path) -> str:
  return path.relative_to(root).as_posix()


def sort_samples(samples: Sequence[Sample]) -> list[Sample]:
  """Train by file name, then test normal, then test anomalous by
  (defect type, file name)."""
  return sorted(samples, key=lambda s: (
      s.split != "train", s.label, s.defect_type if s.label else "",
      s.file_name))


def _settled_without_mask(root: pathlib.Path, split: str, image: pathlib.Path,
                          normal: bool, anomalous: str, where: str,
                          samples: list[Sample], problems: list) -> bool:
  """Keeps a normal image as a sample, or reports an anomalous one that the
  split file puts in the train split (training must see normal images only).

  Returns whether the row is settled; an anomalous test image is not, since
  the caller still has to find its mask. `anomalous` names the image in the
  problem ('anomalous image', maybe with its defect).
  """
  if normal:
    samples.append(Sample(split, image, None, 0, "good", _rel(root, image)))
    return True
  if split == "train":
    problems.append((image, f"{anomalous} in the train split ({where})"))
    return True
  return False


# --------------------------------------------------------------------- VisA


def scan_visa(manual_dir: pathlib.Path, class_name: str,
              problems: list) -> list[Sample]:
  """VisA: rows of ``split_csv/1cls.csv`` whose ``object`` is the class.

  Columns ``object,split,label,image,mask``; ``split`` is 'train' or
  'test', ``label`` 'normal' or 'anomaly'; ``image``/``mask`` are paths
  relative to the VisA root (masks: non-zero label values, binarised with
  ``!= 0`` when encoding). defect_type is 'good' or 'anomaly' (the CSV has
  no per-image defect names); file_name is the CSV's image path.
  """
  root = pathlib.Path(manual_dir)
  csv_path = root.joinpath(*VISA_SPLIT_FILE)
  if not csv_path.is_file():
    problems.append((csv_path, "VisA split file is missing (expected "
                     "split_csv/1cls.csv from the VisA archive)"))
    return []
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      columns = [c.strip() for c in (reader.fieldnames or [])]
      rows = [{(k or "").strip(): (v or "").strip()
               for k, v in row.items()} for row in reader]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    problems.append((csv_path, f"unreadable split file ({e})"))
    return []
  absent = [c for c in VISA_COLUMNS if c not in columns]
  if absent:
    problems.append((csv_path, f"split file lacks column(s) "
                     f"{', '.join(absent)} (found: {', '.join(columns)}; "
                     f"expected {','.join(VISA_COLUMNS)})"))
    return []
  samples = []
  n_rows = 0
  for line, row in enumerate(rows, start=2):
    if row["object"] != class_name:
      continue
    n_rows += 1
    where = f"{csv_path}:{line}"
    split, label = row["split"].lower(), row["label"].lower()
    if split not in ("train", "test"):
      problems.append((where, f"split {row['split']!r} is neither "
                       "'train' nor 'test'"))
      continue
    if label not in ("normal", "anomaly"):
      problems.append((where, f"label {row['label']!r} is neither "
                       "'normal' nor 'anomaly'"))
      continue
    if not row["image"]:
      problems.append((where, "empty image path"))
      continue
    image = root / row["image"]
    if not image.is_file():
      problems.append((image, f"image listed in {where} is missing"))
      continue
    if _settled_without_mask(root, split, image, label == "normal",
                             "anomalous image", where, samples, problems):
      continue
    mask = root / row["mask"] if row["mask"] else None
    if mask is None or not mask.is_file():
      problems.append((mask or image, f"mask of anomalous image "
                       f"{row['image']} ({where}) is missing"))
      continue
    samples.append(Sample("test", image, mask, 1, "anomaly",
                          _rel(root, image)))
  if n_rows == 0:
    problems.append((csv_path, f"no rows for class {class_name!r} in the "
                     "split file"))
    return []
  if not any(s.split == "train" for s in samples):
    problems.append((csv_path, f"class {class_name!r} has no training "
                     "images in the split file"))
  if not any(s.split == "test" for s in samples):
    problems.append((csv_path, f"class {class_name!r} has no test "
                     "images in the split file"))
  return sort_samples(samples)


# --------------------------------------------------------------------- BTAD
# BTAD is MVTec-like: see mvtec_layout.scan_class(good='ok', mask_suffix='').


def scan_btad(manual_dir: pathlib.Path, class_name: str,
              problems: list) -> list[Sample]:
  """BTAD: ``NN/train/ok``, ``NN/test/{ok,ko}``, ``NN/ground_truth/ko``;
  masks paired by stem (any image extension: bmp or png)."""
  return mvtec_layout.scan_class(manual_dir, class_name, problems,
                                 good="ok", mask_suffix="")


# ----------------------------------------------------------------- Real-IAD

_VIEW_RE = re.compile(r"_(C\d+)(?=[_.])")


def realiad_view(file_name: str) -> tuple[str, str | None]:
  """``(object_dir, view)`` of a Real-IAD record's ``file_name``.

  ``object_dir`` is the folder holding one object's five views, relative
  to the resolution folder minus the class: e.g. ``'OK/S0001'`` or
  ``'NG/AK/S0020'`` (the ``S....`` number alone is not unique within a
  class); ``view`` is 'C1'..'C5' (None if the name carries none).
  """
  path = pathlib.PurePosixPath(file_name)
  parts = path.parent.parts
  object_dir = "/".join(parts[2:]) if len(parts) > 2 else str(path.parent)
  found = _VIEW_RE.findall(path.name)
  return object_dir, (found[-1] if found else None)


def _realiad_json(root: pathlib.Path, class_name: str) -> pathlib.Path:
  cands = [root / "realiad_jsons" / f"{class_name}.json",
           root / "realiad_jsons" / "realiad_jsons" / f"{class_name}.json"]
  for c in cands:
    if c.is_file():
      return c
  return cands[0]


def scan_real_iad(manual_dir: pathlib.Path, class_name: str, problems: list,
                  *, resolution: str = "256", views: str = "all"
                  ) -> list[Sample]:
  """Real-IAD from ``realiad_jsons/<class>.json``.

  The JSON has ``meta{prefix, normal_class}``, ``train`` and ``test``
  lists of ``{category, anomaly_class, image_path, mask_path}``; images
  live in ``realiad_<resolution>/<prefix>/<image_path>`` (``mask_path``
  likewise, null for normal samples). ``views``: 'all' keeps the five
  views C1..C5 (each a sample), 'C1'..'C5' keeps that view only. The
  defect type is ``anomaly_class`` ('good' for ``normal_class``);
  file_name is the image path relative to manual_dir, which names the
  object folder and the view (see :func:`realiad_view`). Anomalous samples
  listed without mask get an all-zero mask.
  """
  root = pathlib.Path(manual_dir)
  json_path = _realiad_json(root, class_name)
  if not json_path.is_file():
    problems.append((json_path, f"Real-IAD split file for "
                     f"{class_name!r} is missing (expected "
                     f"realiad_jsons/{class_name}.json)"))
    return []
  try:
    data = json.loads(json_path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError) as e:
    problems.append((json_path, f"unreadable JSON ({e})"))
    return []
  if not isinstance(data, dict) or not all(
      k in data for k in ("meta", "train", "test")):
    problems.append((json_path, "JSON lacks the keys meta, train, test"))
    return []
  meta = data["meta"] if isinstance(data["meta"], dict) else {}
  # The official JSONs' prefix ends with '/' ('audiojack/').
  prefix = str(meta.get("prefix") or class_name).strip("/")
  normal = str(meta.get("normal_class") or "OK")
  res_dir = root / f"realiad_{resolution}"
  class_dir = res_dir / prefix
  if not class_dir.is_dir():
    problems.append((class_dir, f"image folder of {class_name!r} at "
                     f"resolution {resolution} is missing (expected "
                     f"realiad_{resolution}/{prefix}/)"))
    return []
  samples = []
  for split in ("train", "test"):
    entries = data[split]
    if not isinstance(entries, list):
      problems.append((json_path, f"{split!r} is not a list"))
      continue
    for i, e in enumerate(entries):
      where = f"{json_path} [{split}][{i}]"
      if not isinstance(e, dict) or not e.get("image_path"):
        problems.append((where, "entry without image_path"))
        continue
      image = class_dir / e["image_path"]
      view = realiad_view(_rel(root, image))[1]
      if views != "all":
        if view is None:
          problems.append((image, "cannot tell the camera view "
                           "(no _C<k>_ in the file name)"))
          continue
        if view != views:
          continue
      if not image.is_file():
        problems.append((image, f"image listed in {where} is missing"))
        continue
      anomaly = str(e.get("anomaly_class") or normal)
      if _settled_without_mask(root, split, image, anomaly == normal,
                               f"anomalous image ({anomaly})", where, samples,
                               problems):
        continue
      mask = None
      if e.get("mask_path"):
        mask = class_dir / e["mask_path"]
        if not mask.is_file():
          problems.append((mask, f"mask listed in {where} is "
                           "missing"))
          continue
      samples.append(Sample("test", image, mask, 1, anomaly,
                            _rel(root, image)))
  for split in ("train", "test"):
    if not any(s.split == split for s in samples):
      problems.append((json_path, f"class {class_name!r} has no {split} "
                       f"images (views={views})"))
  return sort_samples(samples)


# -------------------------------------------------------------------- MANTA

MANTA_SPLITS = (("train", ("train",)),
                ("test", ("test-pixel", "test_pixel")))
MANTA_MASK_DIR = "mask"


def _manta_class_dirs(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """Class name -> candidate folders (``<cls>`` or ``<domain>/<cls>``)."""
  found: dict[str, list[pathlib.Path]] = {}
  for d in subfolders(root):
    if (d / "train").is_dir():
      found.setdefault(d.name, []).append(d)
      continue
    for c in subfolders(d):
      if (c / "train").is_dir():
        found.setdefault(c.name, []).append(c)
  return found


def list_manta_classes(manual_dir) -> tuple[str, ...]:
  """Class names found in a MANTA folder (sorted)."""
  return tuple(sorted(_manta_class_dirs(pathlib.Path(manual_dir))))


def find_manta_class(manual_dir, class_name: str, problems: list
                     ) -> pathlib.Path | None:
  root = pathlib.Path(manual_dir)
  dirs = _manta_class_dirs(root).get(class_name, [])
  if len(dirs) > 1:
    problems.append((root, f"class {class_name!r} found more than once: "
                     + ", ".join(str(d) for d in dirs)))
    return None
  if not dirs:
    problems.append((root / class_name, f"MANTA class {class_name!r} not "
                     f"found as {root}/{class_name}/train or "
                     f"{root}/<domain>/{class_name}/train"))
    return None
  return dirs[0]


def _manta_split(root, cdir, split, folder, problems, views):
  """Samples (whole images, not yet split into views) of one split."""
  sdir = cdir / folder
  images, masks_by_defect = [], {}
  for d in sorted(subfolders(sdir), key=lambda d: (d.name != "good", d.name)):
    if d.name == MANTA_MASK_DIR:
      continue
    imgs = images_in(d)
    if d.name != "good" and split == "train":
      problems.append((d, "anomalous images in the train split"))
      continue
    images += [(d.name, p) for p in imgs]
  defects = sorted({name for name, _ in images if name != "good"})
  mdir = sdir / MANTA_MASK_DIR
  if defects:
    per_defect = [d for d in defects if (mdir / d).is_dir()]
    if per_defect:  # mask/<defect>/*, paired within each defect
      for d in defects:
        masks_by_defect[d] = images_in(mdir / d)
    else:  # flat mask/*, paired with all defect images in sorted order
      flat = images_in(mdir)
      ordered = [p for name, p in images if name != "good"]
      if len(flat) != len(ordered):
        problems.append((mdir, f"{len(flat)} mask(s) for "
                         f"{len(ordered)} anomalous image(s) in "
                         f"{sdir} (masks pair with the images by "
                         "sorted order, so the counts must match)"))
        return []
      it = iter(flat)
      masks_by_defect = {d: [next(it) for name, _ in images
                             if name == d] for d in defects}
  samples = []
  for d in defects:
    imgs = [p for name, p in images if name == d]
    masks = masks_by_defect.get(d, [])
    if len(masks) != len(imgs):
      problems.append((mdir / d, f"{len(masks)} mask(s) for "
                       f"{len(imgs)} image(s) of defect {d!r} (masks "
                       "pair with images by sorted order)"))
      continue
    samples += [(d, img, m) for img, m in zip(imgs, masks)]
  samples = [("good", p, None) for name, p in images
             if name == "good"] + samples
  out = []
  for defect, img, mask in samples:
    label = 0 if defect == "good" else 1
    rel = _rel(root, img)
    if views == "stacked":  # the builder encodes the views of each
      out.append(Sample(split, img, mask, label, defect, rel))
      continue
    for k in range(MANTA_NUM_VIEWS):
      out.append(Sample(split, img, mask, label, defect,
                        f"{rel}#view{k + 1}", view=(k, MANTA_NUM_VIEWS)))
  return out


def scan_manta(manual_dir: pathlib.Path, class_name: str,
               problems: list, *, views: str = "split") -> list[Sample]:
  """MANTA: ``<cls>/train/good`` and ``<cls>/test-pixel/{good,<defect>}``
  (the class folder may sit in a domain folder), masks in
  ``<split>/mask/`` (flat, or one folder per defect) paired with the
  anomalous images by sorted order. Each image holds five views side by
  side; each view becomes a sample, file_name ``<path>#view<k>`` (k =
  1..5), its mask is the same strip of the mask, and a view of an
  anomalous image whose mask strip is empty is stored as good.
  ``views='stacked'``: one sample per image (file_name = its path); the
  builder stacks its views.
  """
  root = pathlib.Path(manual_dir)
  cdir = find_manta_class(root, class_name, problems)
  if cdir is None:
    return []
  out = []
  for split, folders in MANTA_SPLITS:
    folder = next((f for f in folders if (cdir / f).is_dir()), None)
    if folder is None:
      problems.append((cdir / folders[0], f"MANTA class {class_name!r} "
                       f"has no {folders[0]}/ folder"))
      continue
    before = len(problems)
    part = _manta_split(root, cdir, split, folder, problems, views)
    if not part and len(problems) == before:
      problems.append((cdir / folder, f"no images for the {split} split "
                       f"(expected {folder}/good/*"
                       + (", <defect>/*, mask/*" if split == "test"
                          else "") + ")"))
    out += part
  return out


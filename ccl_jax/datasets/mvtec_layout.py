"""Reading class folders in MVTec AD layout (also the synthetic data's and BTAD's).

Layout of one class folder (``<manual_dir>/<class>``)::

    train/good/*.png                       normal training images
    test/good/*.png                        normal test images
    test/<defect>/*.png                    anomalous test images
    ground_truth/<defect>/<stem>_mask.png  their masks (0 = normal)

:func:`scan_class` lists one class's samples and its layout problems; the
shared driver (:func:`ccl_jax.datasets.common.scan_classes`) verifies every
file and reports all problems at once.
"""

from __future__ import annotations

import pathlib

from ccl_jax.datasets.common import IMAGE_EXTENSIONS, Sample, images_in, subfolders

__all__ = ["LAYOUT_DESCRIPTION", "scan_class"]

LAYOUT_DESCRIPTION = (
    "Expected layout (MVTec AD): <manual_dir>/<class>/train/good/*.png, "
    "<manual_dir>/<class>/test/{good,<defect>}/*.png and "
    "<manual_dir>/<class>/ground_truth/<defect>/<stem>_mask.png")


def _find_mask(gt_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
  """``gt_dir/<stem><ext>`` for any image extension (either case)."""
  for ext in IMAGE_EXTENSIONS:
    for cand in (gt_dir / f"{stem}{ext}", gt_dir / f"{stem}{ext.upper()}"):
      if cand.is_file():
        return cand
  return None


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
  train = images_in(cdir / "train" / good)
  if not train:
    problems.append((cdir / "train" / good,
                     f"class {class_name!r} has no training images "
                     f"(expected train/{good}/*.png)"))
  samples += [Sample("train", p, None, 0, "good", rel(p)) for p in train]
  test_dir = cdir / "test"
  n_test = 0
  for ddir in sorted(subfolders(test_dir),
                     key=lambda d: (d.name != good, d.name)):
    defect = ddir.name
    for img in images_in(ddir):
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

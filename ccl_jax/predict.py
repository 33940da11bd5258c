r"""Anomaly decisions for new images with a trained model and its decision file.

  python -m ccl_jax.predict --workdir ~/runs/demo --images ~/photos --output preds.csv \
      --overlay_dir ~/photos_overlays
  python -m ccl_jax.predict --model ~/models/demo [--backend onnx] --images ~/photos ...

--workdir scores with the run directory itself; --model with a model directory written by
`python -m ccl_jax.export` (its groups and thresholds are the run's), through jax.export
(--backend jax), ONNX Runtime (--backend onnx) or OpenVINO (--backend openvino). All give
the same rows for a float32 model; a reduced-precision model (OpenVINO only) carries
thresholds estimated at its own precision.

--images (repeatable) is a folder (searched recursively for .png/.jpg/.jpeg/.bmp/.tif/.tiff,
sorted), an image file, or a .txt file listing image paths one per line (blank lines and
lines starting with '#' skipped; relative paths are relative to the list's folder).
Images are converted to RGB (grey replicated, an alpha channel dropped) and resized to the
model's image size by the dataset pipeline's own function (ccl_jax.datasets.images.
read_resized: bilinear, antialiased), so they look like what the model saw in training.

Each image is embedded, routed to the nearest group of the workdir's decision.json (or put
in --class_name's group), scored, and called 'anomalous' when its score is above the
threshold: its group's (--threshold classwise, the default) or the single class-agnostic
one (--threshold agnostic). The output (.csv or .json, chosen by extension, written
atomically) has one row per input image, in input order, with the columns of `COLUMNS`:

  path          the image file
  class         the group's name (a class name when the groups came from labels)
  class_source  'given' (--class_name) or 'routed' (nearest group centroid)
  score         image anomaly score (the maximum of the anomaly map)
  threshold     the threshold the score was compared with
  decision      'anomalous' (score > threshold), 'normal', or 'error'
  overlay       the overlay PNG ('' without --overlay_dir)
  error         why the image could not be read ('' otherwise)

An unreadable image stops the run with an error naming it; with --skip_unreadable it gets
a row with decision 'error' and the reason instead (score and threshold empty).

Overlays (--overlay_dir; <index>_<stem>.png, index = the row's 0-based position, so names
never collide): the image at its original size with the anomaly map (bilinearly resized to
it) blended at 50% opacity. The colour scale is fixed relative to the threshold used, not
to the image's own range, so overlays are comparable across images: map value 0 is the
blue end, 2 x threshold (and above) the red end, so the threshold itself sits at the middle
of the scale, between cyan and yellow. Warm pixels are above the threshold; since the image
score is the map's maximum, an image is anomalous exactly when some pixel is warm.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import app, flags
from PIL import Image

from ccl_jax.decisions import grouping, thresholds
from ccl_jax.deploy import loader
from ccl_jax.results import visualize
from ccl_jax.runtime import files
from ccl_jax.datasets import common, images
from ccl_jax.runtime.files import atomic_write
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.models.detector import Detector
from ccl_jax.runs.loading import load_detector

COLUMNS = ("path", "class", "class_source", "score", "threshold", "decision", "overlay",
           "error")
OUTPUT_FORMATS = (".csv", ".json")
OVERLAY_OPACITY = 0.5

class UnreadableImageError(ValueError):
  """An input image that cannot be decoded."""

  def __init__(self, path: str, reason: str):
    self.path, self.reason = path, reason
    super().__init__(f"Cannot read image {path}: {reason}. Fix or remove it, or pass "
                     "--skip_unreadable to list it in the output as an 'error' row.")


def list_images(specs: Sequence[str]) -> list[str]:
  """Image paths of --images entries (folders, image files, .txt lists), in order."""
  paths: list[str] = []
  for spec in specs:
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
      found = sorted(str(p) for p in path.rglob("*")
                     if p.is_file() and p.suffix.lower() in common.IMAGE_EXTENSIONS)
      if not found:
        raise FileNotFoundError(f"--images {spec}: no {'/'.join(common.IMAGE_EXTENSIONS)}"
                                " files in this folder or below.")
      paths += found
    elif path.suffix.lower() == ".txt" and path.is_file():
      listed = [line.strip() for line in path.read_text().splitlines()]
      listed = [line for line in listed if line and not line.startswith("#")]
      if not listed:
        raise ValueError(f"--images {spec}: the list names no images.")
      paths += [str(path.parent / pathlib.Path(p).expanduser()) for p in listed]
    elif path.is_file():
      paths.append(str(path))
    else:
      raise FileNotFoundError(f"--images {spec}: no such file or folder.")
  return paths


@dataclasses.dataclass
class _Loaded:
  path: str
  image: np.ndarray | None = None     # [S, S, 3] uint8, the model's input
  original: np.ndarray | None = None  # [H, W, 3] uint8, for the overlay
  error: str = ""


def read_image(path: str, image_size: int, keep_original: bool) -> _Loaded:
  """The model's input of the image file `path` (and the image at its own size, for the
  overlay, if `keep_original`), or the reason it cannot be read in `error`."""
  try:
    # The dataset's own conversion and resize, so inputs match what training saw.
    image = images.read_resized(path, image_size)
    original = None
    if keep_original:
      with Image.open(path) as im:
        original = np.asarray(images.to_rgb(im, path), np.uint8)
  except Exception as e:  # noqa: BLE001 - PIL raises many unrelated types on bad files
    return _Loaded(path, error=f"{type(e).__name__}: {e}")
  return _Loaded(path, image, original)


def _batches(paths: Sequence[str], image_size: int, batch_size: int,
             keep_original: bool) -> Iterator[list[_Loaded]]:
  """Loaded images in input order, `batch_size` at a time (decoded by a thread pool ahead
  of the model)."""
  batch = []
  for loaded in common.ordered_map(lambda p: read_image(p, image_size, keep_original), paths):
    batch.append(loaded)
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
  """[H, W, 3] uint8: `image` with `anomaly_map` (any size) coloured on [0, 2 x threshold]
  and blended at OVERLAY_OPACITY."""
  height, width = image.shape[:2]
  resized = np.asarray(Image.fromarray(anomaly_map.astype(np.float32))
                       .resize((width, height), Image.Resampling.BILINEAR))
  colours = visualize.colorize(resized, 0.0, 2.0 * threshold)
  return np.round((1 - OVERLAY_OPACITY) * image + OVERLAY_OPACITY * colours).astype(np.uint8)


def run_batched(fn: Callable[..., dict[str, Any]], batch_size: int,
                outputs: tuple[str, ...], *arrays: np.ndarray) -> dict[str, np.ndarray]:
  """`fn(*batch)` over the leading axis of `arrays` in batches of exactly `batch_size`
  rows, so no batch size ever recompiles; the named `outputs` of `fn`, concatenated, with
  the padding of the last batch removed."""
  count = len(arrays[0])
  if count == 0:
    raise ValueError("run_batched: no rows to process.")
  parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
  for start in range(0, count, batch_size):
    batch = [a[start:start + batch_size] for a in arrays]
    real = len(batch[0])
    if real < batch_size:
      # Zero rows (group 0 for group ids): every model scores images independently
      # (inference-mode BatchNorm, per-image nearest neighbours).
      batch = [np.concatenate([b, np.zeros((batch_size - real,) + b.shape[1:], b.dtype)])
               for b in batch]
    out = fn(*batch)
    for name in outputs:
      parts[name].append(np.asarray(out[name])[:real])
  return {name: np.concatenate(values) for name, values in parts.items()}


Model = Detector | loader.ExportedModel


def score_images(detector: Model, batch_size: int, groups: grouping.Groups,
                 images: np.ndarray, given: np.ndarray
                 ) -> list[tuple[int, float, np.ndarray]]:
  """(group, score, anomaly map) of each image: in group `given[i]`, or routed to the
  nearest group where `given[i]` is -1."""
  group_ids = np.asarray(given, np.int32).copy()
  unknown = np.flatnonzero(group_ids < 0)
  if len(unknown):
    embeddings = run_batched(lambda x: {"embedding": detector.embed(x)}, batch_size,
                             ("embedding",), images[unknown])["embedding"]
    group_ids[unknown] = grouping.route(groups, embeddings)
  outputs = run_batched(lambda x, g: detector.score(x, g)._asdict(), batch_size,
                        ("anomaly_maps", "image_scores"), images, group_ids)
  return list(zip(group_ids, outputs["image_scores"], outputs["anomaly_maps"]))


def given_group(groups: grouping.Groups, class_name: str | None) -> int | None:
  """The group of a class name given with the images (None: route each image)."""
  if class_name is None:
    return None
  if not groups.from_labels:
    raise ValueError(
        f"class name {class_name!r}: this decision file's groups were found by "
        f"clustering ({', '.join(groups.names)}), not given by class labels, so there are "
        "no class names to choose from; leave the class name out to route each image.")
  return groups.index_of(class_name)


def decide(groups: grouping.Groups, decision_thresholds: thresholds.Thresholds,
           threshold_mode: str, group: int, score: float, given: bool) -> dict[str, Any]:
  """The class, class_source, score, threshold and decision of an image's row."""
  score = float(score)
  threshold = float(decision_thresholds.agnostic if threshold_mode == "agnostic"
                    else decision_thresholds.per_group[group])
  return {"class": groups.names[group], "class_source": "given" if given else "routed",
          "score": score, "threshold": threshold,
          "decision": "anomalous" if score > threshold else "normal"}


def predict_images(detector: Model, groups: grouping.Groups,
                   decision_thresholds: thresholds.Thresholds, paths: Sequence[str], *,
                   class_name: str | None = None, threshold_mode: str = "classwise",
                   overlay_dir: str | None = None, skip_unreadable: bool = False,
                   batch_size: int = 16) -> list[dict[str, Any]]:
  """One row (a dict over COLUMNS) per path, in order; see the module docstring."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if threshold_mode not in ("classwise", "agnostic"):
    raise ValueError(
        f"threshold_mode must be 'classwise' or 'agnostic', got {threshold_mode!r}.")
  forced = given_group(groups, class_name)
  if overlay_dir:
    os.makedirs(overlay_dir, exist_ok=True)
  rows: list[dict[str, Any]] = []
  for batch in _batches(paths, detector.image_size, batch_size, bool(overlay_dir)):
    for item in batch:
      if item.error and not skip_unreadable:
        raise UnreadableImageError(item.path, item.error)
    readable = [item for item in batch if not item.error]
    given = np.full(len(readable), -1 if forced is None else forced)
    results = iter(score_images(detector, batch_size, groups,
                                np.stack([item.image for item in readable]), given)
                   if readable else [])
    for item in batch:
      row = dict.fromkeys(COLUMNS, "")
      row["path"] = item.path
      if item.error:
        row.update({"class": class_name or "", "class_source": "given" if forced is not None
                    else "", "score": None, "threshold": None, "decision": "error",
                    "error": item.error})
        rows.append(row)
        continue
      group, score, anomaly_map = next(results)
      row.update(decide(groups, decision_thresholds, threshold_mode, group, score,
                        forced is not None))
      threshold = row["threshold"]
      if overlay_dir:
        stem = os.path.splitext(os.path.basename(item.path))[0]
        row["overlay"] = os.path.join(overlay_dir, f"{len(rows):05d}_{stem}.png")
        figure = overlay(item.original, anomaly_map, threshold)
        atomic_write(row["overlay"], lambda f, figure=figure: Image.fromarray(figure).save(
            f, format="PNG"))
      rows.append(row)
  return rows


def check_output_path(path: str) -> str:
  """The output's format ('.csv' or '.json') from its extension."""
  extension = os.path.splitext(path)[1].lower()
  if extension not in OUTPUT_FORMATS:
    raise ValueError(f"--output {path!r}: unknown format {extension or '(no extension)'!r}; "
                     f"use a file name ending in {' or '.join(OUTPUT_FORMATS)}.")
  return extension


def write_output(path: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
  """CSV (a header of COLUMNS, missing values empty) or JSON ({**meta, 'predictions':
  rows}, missing values null), replacing `path` atomically."""
  extension = check_output_path(path)
  if extension == ".csv":
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())
  else:
    atomic_write(path, json.dumps({**meta, "predictions": list(rows)}, indent=2))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  fv = flag_values
  flags.DEFINE_string("workdir", None, "Training (or HierCore) run with a decision.json.",
                      flag_values=fv)
  flags.DEFINE_string("model", None, "Model directory of `python -m ccl_jax.export` "
                      "(instead of --workdir).", flag_values=fv)
  flags.DEFINE_enum("backend", "jax", list(loader.BACKENDS), "With --model: run the "
                    "jax.export functions, the ONNX graphs (ONNX Runtime) or the OpenVINO IR.",
                    flag_values=fv)
  flags.DEFINE_multi_string("images", None, "Image folder (recursive), image file or .txt "
                            "list of image paths; repeat for several.", flag_values=fv)
  flags.DEFINE_string("output", None, "Output file, .csv or .json.", flag_values=fv)
  flags.DEFINE_string("class_name", None, "Class of every image (skips routing); only for "
                      "decision files whose groups are classes.", flag_values=fv)
  flags.DEFINE_string("overlay_dir", None, "Write an anomaly-map overlay PNG per image here.",
                      flag_values=fv)
  flags.DEFINE_integer("batch_size", 16, "Images per model call.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_enum("threshold", "classwise", ["classwise", "agnostic"], "Per-group "
                    "thresholds or the single class-agnostic one.", flag_values=fv)
  flags.DEFINE_bool("skip_unreadable", False, "List unreadable images as 'error' rows "
                    "instead of stopping.", flag_values=fv)
  flags.mark_flags_as_required(["images", "output"], flag_values=fv)
  flags.mark_flags_as_mutual_exclusive(["workdir", "model"], required=True, flag_values=fv)


def run(flag_values: flags.FlagValues) -> list[dict[str, Any]]:
  """The program on parsed flags: writes the output and returns its rows."""
  check_output_path(flag_values.output)
  files.check_writable(flag_values.output)
  if flag_values.model:
    model = loader.load(flag_values.model, flag_values.backend)
    groups = grouping.Groups.from_json(model.manifest["groups"])
    decision_thresholds = thresholds.Thresholds.from_json(model.manifest["thresholds"])
    meta = {"model": model.model_dir, "backend": model.backend,
            "precision": model.precision}
  else:
    if flag_values["backend"].present:
      raise ValueError("--backend chooses how an exported --model runs; with --workdir the "
                       "run's own model is used. Leave --backend out, or export the run and "
                       "pass --model.")
    workdir = os.path.abspath(os.path.expanduser(flag_values.workdir))
    groups, decision_thresholds, _ = RunDir(workdir).read_decision()
    meta = {"workdir": workdir}
  paths = list_images(flag_values.images)
  detector = model if flag_values.model else load_detector(workdir)
  rows = predict_images(detector, groups, decision_thresholds, paths,
                        class_name=flag_values.class_name,
                        threshold_mode=flag_values.threshold,
                        overlay_dir=flag_values.overlay_dir,
                        skip_unreadable=flag_values.skip_unreadable,
                        batch_size=flag_values.batch_size)
  write_output(flag_values.output, rows, {**meta, "model_kind": detector.name,
                                          "threshold_mode": flag_values.threshold})
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with files.storage_failures_end_the_program(
      lambda: f"{flags.FLAGS.output} was left as it was."):
    rows = run(flags.FLAGS)
  counts = {d: sum(r["decision"] == d for r in rows) for d in ("anomalous", "normal", "error")}
  print(f"{len(rows)} images: {counts['anomalous']} anomalous, {counts['normal']} normal, "
        f"{counts['error']} unreadable -> {flags.FLAGS.output}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)

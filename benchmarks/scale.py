r"""Peak memory and speed of a whole run as the test split grows, on folder datasets.

  python -m benchmarks.scale --points 2x300,6x300 [--image_size 256] [--train_per_class 40]
      [--train_batch_size 4] [--code_dir DIR --label today] [--work_dir /tmp/ccl_scale]
      [--json scale.json]

Each point CxT is a folder dataset (MVTec AD's layout) of C classes with T test images each
(half of them defective), cut from photographs bundled with scikit-image with drawn-in
defects (`data_prep.photo_parts`; class k is photograph k mod 5 of its 'parts' set, crops
seeded by k // 5). For every point two programs run, each alone in a fresh process under
`/usr/bin/time -v` (peak RSS = its "Maximum resident set size"), from `--code_dir` (another
checkout of ccl_jax, e.g. an older one, for a before/after comparison; default this one):

  prepare   python -m data_prep.prepare_dataset (once per point, whichever code runs first)
  run       python -m ccl_jax.main --config configs/photo_parts.py (1 epoch: training, the
            hold-out thresholds, the test-set evaluation, metrics.json, figures)

Images/s: prepared images per second of the whole program; training images per second of
the run's own log (median over its steps after the first, which compiles); test images per
second of the run's evaluation phase, from its last end-of-epoch log line to the program's
exit (hold-out thresholds, the routing pass, scoring with its compilation, metrics, files).
Results are merged into `--json` under '<label>/<point>', so codes and points can be run one
at a time; the table of everything in it is printed at the end, with the projection of the
run's peak to 100,000 test images at 256 and 512 px, in 150 classes and in one (see
`projection`).
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep import photo_parts  # noqa: E402

PROJECTED_TEST_IMAGES = 100_000
# Largest class of each projected test split.
PROJECTED_LAYOUTS = {"150 classes of 667": 667, "one class of 100,000": 100_000}
# The target: tripling the classes at a fixed class size raises the run's peak by < 20 %.
TARGET_RATIO = 1.2
# A held test image costs at least its float32 anomaly map; a smaller growth per image means
# the evaluation's arrays stayed under the run's earlier peak.
MAP_GB_AT_256 = 256 * 256 * 4 / 1e9


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags; defined when it runs, never on import."""
  fv = flag_values
  flags.DEFINE_list("points", ["2x300", "6x300"], "Datasets as <classes>x<test images per "
                    "class>.", flag_values=fv)
  flags.DEFINE_integer("image_size", 256, "Image side in pixels.", lower_bound=32,
                       flag_values=fv)
  flags.DEFINE_integer("train_per_class", 40, "Normal training images per class (10 of "
                       "them are held out for the thresholds).", lower_bound=24,
                       flag_values=fv)
  flags.DEFINE_integer("train_batch_size", 0, "Training batch size (0: the config's, 16); "
                       "a smaller one lowers training's peak below the evaluation's, which "
                       "is measured at the config's batch size either way.", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_string("code_dir", str(REPO), "The ccl_jax checkout whose programs run.",
                      flag_values=fv)
  flags.DEFINE_string("label", "this code", "Name of the code's column.", flag_values=fv)
  flags.DEFINE_string("work_dir", "/tmp/ccl_scale", "Datasets and runs go here.",
                      flag_values=fv)
  flags.DEFINE_string("json", None, "Results file (merged; default <work_dir>/scale.json).",
                      flag_values=fv)
  flags.DEFINE_bool("table_only", False, "Print the table of --json, run nothing.",
                    flag_values=fv)


def parse_point(point: str) -> tuple[int, int]:
  match = re.fullmatch(r"(\d+)x(\d+)", point)
  if not match or min(int(match[1]), int(match[2])) < 2:
    raise app.UsageError(f"--points: {point!r} is not <classes>x<test images per class> "
                         "with both at least 2, e.g. 6x300")
  return int(match[1]), int(match[2])


def write_dataset(folder: pathlib.Path, num_classes: int, test_per_class: int,
                  train_per_class: int, image_size: int) -> None:
  """The point's classes in MVTec AD's layout under `folder` (kept once written)."""
  if folder.exists():
    return
  parts = tuple(photo_parts.SETS["parts"])
  staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent))
  for seed in range(-(-num_classes // len(parts))):
    written = staging / f"seed{seed}"
    photo_parts.write_photo_parts(
        written, train=train_per_class, test_good=test_per_class // 2,
        test_defective=test_per_class - test_per_class // 2, size=image_size, seed=seed)
    for name in parts[:num_classes - seed * len(parts)]:
      (written / name).rename(staging / f"{name}_{seed}")
    shutil.rmtree(written)
  staging.rename(folder)


def timed(command: list[str], cwd: str, log: pathlib.Path) -> dict[str, float]:
  """Runs `command` under /usr/bin/time -v; its peak RSS (GB) and wall seconds."""
  if not os.path.exists("/usr/bin/time"):
    raise SystemExit("needs /usr/bin/time (apt-get install time)")
  started = time.perf_counter()
  with open(log, "w") as out:
    done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, stdout=out,
                          stderr=subprocess.STDOUT)
  seconds = time.perf_counter() - started
  text = log.read_text(errors="replace")
  if done.returncode:
    raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}:\n"
                     + text[-3000:])
  kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1])
  return {"peak_rss_gb": kib * 1024 / 1e9, "seconds": seconds, "ended": time.time()}


def training_ended(log: str) -> float:
  """Time of the run's last end-of-epoch line (absl: 'I<MMDD> <HH:MM:SS.us> ... Epoch n:',
  local time)."""
  stamps = re.findall(r"I(\d{4}) (\d\d:\d\d:\d\d\.\d+) +\d+ train\.py:\d+\] Epoch \d+:",
                      log)
  if not stamps:
    raise SystemExit("no end-of-epoch line in the run's log")
  mmdd, clock = stamps[-1]
  return datetime.datetime.strptime(f"{datetime.date.today().year}{mmdd} {clock}",
                                    "%Y%m%d %H:%M:%S.%f").timestamp()


def batch_size_overrides(train_batch_size: int) -> list[str]:
  """Config overrides that set training's batch size and keep evaluation's at
  configs/photo_parts.py's 16 (its eval_batch_size 0 follows batch_size)."""
  if not train_batch_size:
    return []
  return [f"--config.batch_size={train_batch_size}", "--config.eval_batch_size=16"]


def measure_point(point: str, args) -> dict:
  num_classes, test_per_class = parse_point(point)
  work = pathlib.Path(args.work_dir).expanduser().resolve()
  data = work / f"data_{args.image_size}px_{point}_train{args.train_per_class}"
  work.mkdir(parents=True, exist_ok=True)
  raw, prepared = data / "raw", data / "prepared"
  data.mkdir(exist_ok=True)
  write_dataset(raw, num_classes, test_per_class, args.train_per_class, args.image_size)
  num_images = num_classes * (test_per_class + args.train_per_class)
  num_test = num_classes * test_per_class
  python = sys.executable
  result = {"classes": num_classes, "test_per_class": test_per_class, "test_images": num_test,
            "image_size": args.image_size,
            "train_batch_size": args.train_batch_size or 16}
  prepare_record = data / "prepare.json"
  if not prepare_record.exists():
    prepare = timed([python, "-m", "data_prep.prepare_dataset", "--dataset", "folder",
                     "--manual_dir", str(raw), "--data_dir", str(prepared),
                     "--image_size", str(args.image_size)], args.code_dir, data / "prepare.log")
    del prepare["ended"]
    prepare["images_per_second"] = num_images / prepare["seconds"]
    prepare_record.write_text(json.dumps(prepare))
  result["prepare"] = json.loads(prepare_record.read_text())
  workdir = work / "runs" / f"{re.sub(r'[^A-Za-z0-9]+', '_', args.label)}_{point}"
  shutil.rmtree(workdir, ignore_errors=True)
  log = work / f"{workdir.name}.run.log"
  run = timed([python, "-m", "ccl_jax.main", "--config", "configs/photo_parts.py",
               "--workdir", str(workdir), f"--config.dataset.manual_dir={raw}",
               f"--config.dataset.data_dir={prepared}",
               f"--config.image_size={args.image_size}", "--config.num_epochs=1",
               *batch_size_overrides(args.train_batch_size)],
              args.code_dir, log)
  with open(workdir / "metrics.json") as f:
    steps = json.load(f)["training_log"]
  run["train_images_per_second"] = float(np.median(
      [entry["images_per_second"] for entry in steps[1:]] or [np.nan]))
  run["evaluation_seconds"] = run.pop("ended") - training_ended(log.read_text(errors="replace"))
  run["test_images_per_second"] = num_test / run["evaluation_seconds"]
  result["run"] = run
  return result


def fewest_and_most_classes(rows) -> list[tuple[dict, dict]]:
  """(fewest, most classes) of the points with the same test images per class, for each
  such count measured at two or more class counts."""
  by_per_class: dict[int, list[dict]] = {}
  for row in rows:
    by_per_class.setdefault(row["test_per_class"], []).append(row)
  return [(min(same, key=lambda r: r["classes"]), max(same, key=lambda r: r["classes"]))
          for same in by_per_class.values() if len(same) >= 2]


def growth_per_image(small: dict, large: dict) -> float:
  """GB the run's peak grows per added test image between two points of one code, scaled
  to 256 px by the pixel count (anomaly maps and masks scale with the pixels)."""
  per_image = ((large["run"]["peak_rss_gb"] - small["run"]["peak_rss_gb"])
               / (large["test_images"] - small["test_images"]))
  return max(per_image, 0.0) * (256 / small["image_size"]) ** 2


def projection(small: dict, large: dict, held_image_gb: float) -> dict[str, tuple]:
  """The run's peak for 100,000 test images in each of `PROJECTED_LAYOUTS`, at 256 px and
  the growth x4 at 512 px, added to the smaller point's peak (the model at the measured
  size). A code whose peak grew by >= `TARGET_RATIO` with the classes grows with the whole
  test split at its measured rate, whatever the layout; one below it holds one class's maps
  at a time, so its peak grows with the largest class at `held_image_gb` per image (the
  largest measured growth: what one held map and mask cost)."""
  whole_split = large["run"]["peak_rss_gb"] / small["run"]["peak_rss_gb"] >= TARGET_RATIO
  projected = {}
  for layout, largest_class in PROJECTED_LAYOUTS.items():
    if whole_split:
      grow = growth_per_image(small, large) * (PROJECTED_TEST_IMAGES - small["test_images"])
    else:
      grow = held_image_gb * max(largest_class - small["test_per_class"], 0)
    projected[layout] = (small["run"]["peak_rss_gb"] + grow, 4 * grow)
  return projected


def format_table(results: dict[str, dict]) -> str:
  lines = ["| code | classes x test images | training batch | prepare: peak RSS, images/s "
           "| run: peak RSS | training images/s | evaluation: test images/s |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for key, row in sorted(results.items(), key=lambda kv: (kv[0].split("/")[0],
                                                          kv[1]["test_images"])):
    lines.append(
        f"| {key.split('/')[0]} | {row['classes']} x {row['test_per_class']} at "
        f"{row['image_size']} px | {row.get('train_batch_size', 16)} "
        f"| {row['prepare']['peak_rss_gb']:.2f} GB, "
        f"{row['prepare']['images_per_second']:.0f} | {row['run']['peak_rss_gb']:.2f} GB "
        f"| {row['run']['train_images_per_second']:.1f} "
        f"| {row['run']['test_images_per_second']:.1f} |")
  pairs = {}
  for label in sorted({key.split("/")[0] for key in results}):
    rows = [row for key, row in results.items() if key.split("/")[0] == label]
    pairs[label] = fewest_and_most_classes(rows)
  held_image_gb = max([growth_per_image(*pair) for label_pairs in pairs.values()
                       for pair in label_pairs] or [0.0])
  if pairs and held_image_gb < MAP_GB_AT_256:
    return "\n".join(lines + [
        "", f"- No code's peak grew by one float32 anomaly map ({MAP_GB_AT_256 * 1e3:.3f} MB "
        "at 256 px) per added test image: at these sizes the run's peak is set before the "
        "test split is scored, so nothing is projected; measure with more test images per "
        "class."])
  notes = []
  for label, label_pairs in pairs.items():
    for small, large in label_pairs:
      ratio = large["run"]["peak_rss_gb"] / small["run"]["peak_rss_gb"]
      projected = projection(small, large, held_image_gb)
      notes.append(
          f"- {label}: {small['classes']} -> {large['classes']} classes of "
          f"{small['test_per_class']} test images: run peak x{ratio:.2f} (target < "
          f"x{TARGET_RATIO}: {'met' if ratio < TARGET_RATIO else 'missed'}), "
          f"{growth_per_image(small, large) * 1e3:.3f} MB per added test image at 256 px. "
          f"{PROJECTED_TEST_IMAGES:,} test images, "
          + "; ".join(f"{layout}: about {at_256:.1f} GB at 256 px, +{growth_512:.1f} GB "
                      "over the 512 px model's own peak"
                      for layout, (at_256, growth_512) in projected.items())
          + (" (grows with the whole test split)" if ratio >= TARGET_RATIO else
             f" (grows with the largest class, {held_image_gb * 1e3:.3f} MB per image)"))
  return "\n".join(lines + [""] + notes)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  path = pathlib.Path(args.json or os.path.join(args.work_dir, "scale.json")).expanduser()
  results = json.loads(path.read_text()) if path.exists() else {}
  if not args.table_only:
    for point in args.points:
      parse_point(point)
    for point in args.points:
      results[f"{args.label}/{point}"] = measure_point(point, args)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(results, indent=1))
      print(f"{args.label}/{point}: {json.dumps(results[f'{args.label}/{point}'])}",
            flush=True)
  print(format_table(results))


if __name__ == "__main__":
  define_flags()
  app.run(main)

r"""Inter-class confusion analysis (paper Fig. 1b): t-SNE of neck embeddings + V-measure.

  python -m ccl_jax.confusion --workdirs /tmp/ccl_demo,/tmp/rd_demo --output confusion.png

For each trained workdir (e.g. a CCL run and its RD baseline) the global embeddings (spatial
mean of the neck output) of the test images are clustered with K-means (K = number of
classes) and the V-measure against the true classes is printed (1 = classes perfectly
separated); a t-SNE map of the embeddings, coloured by class, is drawn per run side by side.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import sklearn.cluster
import sklearn.manifold
import sklearn.metrics
from absl import app, flags
from PIL import Image, ImageDraw

from ccl_jax.runtime import inference
from ccl_jax.datasets import selection
from ccl_jax.runtime.files import atomic_write
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.ccl.detector import ReverseDistillationDetector
from ccl_jax.runs.loading import load_detector


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  flags.DEFINE_list("workdirs", None, "Comma-separated training workdirs to compare.",
                    flag_values=flag_values)
  flags.DEFINE_string("output", "confusion.png", "PNG file for the t-SNE panels.",
                      flag_values=flag_values)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                    "Which checkpoint of each workdir.", flag_values=flag_values)
  flags.mark_flags_as_required(["workdirs"], flag_values=flag_values)

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [170, 110, 40],
                     [128, 0, 0], [0, 0, 128], [128, 128, 0], [0, 128, 128]], np.uint8)


def global_embeddings(detector: ReverseDistillationDetector, dataset,
                  global_batch_size: int) -> np.ndarray:
  """The neck's global embeddings [N, D] of every test image."""
  if not isinstance(detector, ReverseDistillationDetector):
    raise ValueError(f"The confusion analysis reads the neck's global embeddings of a CCL or "
                     f"RD run; this workdir holds a {detector.name} model.")
  return inference.run_inference(
      lambda images: {"embedding": detector.global_embedding(images)}, dataset.test,
      np.arange(len(dataset.test)), outputs=("embedding",),
      global_batch_size=global_batch_size,
      batch_sharding=inference.batch_sharding())["embedding"]


def v_measure(embeddings: np.ndarray, class_ids: np.ndarray, seed: int = 0) -> float:
  """V-measure of K-means clusters (K = number of classes) against the true classes."""
  k = len(np.unique(class_ids))
  clusters = sklearn.cluster.KMeans(k, n_init=10, random_state=seed).fit_predict(
      embeddings.astype(np.float64))
  return float(sklearn.metrics.v_measure_score(class_ids, clusters))


def scatter_panel(points: np.ndarray, class_ids: np.ndarray, title: str,
                  size: int = 420) -> Image.Image:
  panel = Image.new("RGB", (size, size + 24), "white")
  draw = ImageDraw.Draw(panel)
  draw.text((8, 6), title, fill="black")
  low, high = points.min(axis=0), points.max(axis=0)
  xy = (points - low) / np.maximum(high - low, 1e-9) * (size - 20) + 10
  for (x, y), c in zip(xy, class_ids):
    colour = tuple(int(v) for v in _PALETTE[c % len(_PALETTE)])
    draw.ellipse((x - 3, y + 24 - 3, x + 3, y + 24 + 3), fill=colour)
  return panel


def compare(workdirs: list[str], output: str, checkpoint: str = "best") -> dict[str, float]:
  """V-measure of each run's test embeddings; their t-SNE panels side by side in `output`."""
  panels, scores = [], {}
  for workdir in workdirs:
    run_settings = RunDir(workdir).read_settings()
    detector = load_detector(workdir, checkpoint=checkpoint)
    dataset = selection.load_selected(run_settings.dataset,
                                      image_size=run_settings.image_size,
                                      is_main=jax.process_index() == 0)
    embeddings = global_embeddings(detector, dataset, run_settings.global_eval_batch_size)
    score = v_measure(embeddings, dataset.test_class_ids)
    points = sklearn.manifold.TSNE(2, random_state=0, init="pca",
                                   perplexity=min(30.0, len(embeddings) / 4)).fit_transform(
                                       embeddings.astype(np.float64))
    name = os.path.basename(os.path.normpath(workdir))
    print(f"{name}: V-measure {score:.3f} ({len(dataset.class_names)} classes, "
          f"{len(embeddings)} test images)")
    panels.append(scatter_panel(points, dataset.test_class_ids, f"{name}  V={score:.3f}"))
    scores[workdir] = score
  sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
  x = 0
  for p in panels:
    sheet.paste(p, (x, 0))
    x += p.width
  atomic_write(output, lambda f: sheet.save(f, format="PNG"))
  print(f"wrote {output}")
  return scores


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  compare(flags.FLAGS.workdirs, flags.FLAGS.output, flags.FLAGS.checkpoint)


if __name__ == "__main__":
  define_flags()
  app.run(main)

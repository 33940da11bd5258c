r"""Inter-class confusion analysis (paper Fig. 1b): t-SNE of neck embeddings + V-measure.

  python -m ccl_jax.confusion --workdirs /tmp/ccl_demo,/tmp/rd_demo --output confusion.png

For each trained workdir (e.g. a CCL run and its RD baseline) the global embeddings (spatial
mean of the neck output) of the test images are clustered with K-means (K = number of
classes) and the V-measure against the true classes is printed (1 = classes perfectly
separated); a t-SNE map of the embeddings, coloured by class, is drawn per run side by side.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
import sklearn.cluster
import sklearn.manifold
import sklearn.metrics
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw

from ccl_jax import inference, step, train

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Comma-separated training workdirs to compare.")
flags.DEFINE_string("output", "confusion.png", "PNG file for the t-SNE panels.")
flags.DEFINE_string("checkpoint", "best", "Which checkpoint of each workdir: best | latest.")

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [170, 110, 40],
                     [128, 0, 0], [0, 0, 128], [128, 128, 0], [0, 128, 128]], np.uint8)


def neck_embedding(variables, encoder_variables, images, *, model, encoder):
  features = step.encode(encoder, encoder_variables, images)
  return {"embedding": model.apply(variables, features, method="embed")}


def embeddings_of(trained: train.TrainedModel, dataset) -> np.ndarray:
  fn = jax.jit(functools.partial(neck_embedding, model=trained.model, encoder=trained.encoder))
  batch_size = trained.config.eval_batch_size or trained.config.batch_size
  return inference.run_inference(
      fn, trained.variables, trained.encoder_variables, dataset.test,
      np.arange(len(dataset.test)), outputs=("embedding",), global_batch_size=batch_size,
      batch_sharding=NamedSharding(step.data_mesh(), P("data")))["embedding"]


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


def main(argv):
  del argv
  panels = []
  for workdir in FLAGS.workdirs:
    trained = train.load_trained(workdir, FLAGS.checkpoint)
    dataset = train.load_dataset(trained.config, jax.process_index() == 0)
    embeddings = embeddings_of(trained, dataset)
    score = v_measure(embeddings, dataset.test_class_ids)
    points = sklearn.manifold.TSNE(2, random_state=0, init="pca",
                                   perplexity=min(30.0, len(embeddings) / 4)).fit_transform(
                                       embeddings.astype(np.float64))
    name = os.path.basename(os.path.normpath(workdir))
    print(f"{name}: V-measure {score:.3f} ({len(dataset.class_names)} classes, "
          f"{len(embeddings)} test images)")
    panels.append(scatter_panel(points, dataset.test_class_ids, f"{name}  V={score:.3f}"))
  sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
  x = 0
  for p in panels:
    sheet.paste(p, (x, 0))
    x += p.width
  sheet.save(FLAGS.output)
  print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdirs"])
  app.run(main)

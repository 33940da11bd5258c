"""report.html and the TensorBoard event files of the session's trained smoke run: their
numbers are the run's own, the page renders in a real browser, TensorBoard reads the events."""
import html.parser
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ccl_jax.evaluation import streaming
from ccl_jax.results import report

INSTALL_CHROMIUM = ("chromium is not installed, so report.html cannot be tested in a browser; "
                    "install it with `apt-get update && apt-get install -y chromium` "
                    "(.ci/run does this)")


class _Page(html.parser.HTMLParser):
  """The table cells, threshold lines, images, charts and external references of a page."""

  def __init__(self):
    super().__init__()
    self.cells, self.thresholds, self.images, self.curves = {}, {}, [], 0
    self.external, self._cell, self._histogram, self.load_check = [], None, None, None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    for name in ("src", "href"):
      if name in attrs and not attrs[name].startswith("data:"):
        self.external.append(attrs[name])
    if tag == "html":
      self.load_check = attrs.get("data-load-check")
    if tag == "td" and "data-metric" in attrs:
      self._cell = (attrs["data-class"], attrs["data-metric"], attrs["data-value"])
    if tag == "img":
      self.images.append(attrs["src"])
    if tag == "svg" and attrs.get("class") == "histogram":
      self._histogram = attrs["data-class"]
    if tag == "svg" and attrs.get("class") == "curve":
      self.curves += 1
    if tag == "line" and attrs.get("class") == "threshold":
      self.thresholds.setdefault((self._histogram, attrs["data-kind"]), []).append(
          float(attrs["data-value"]))

  def handle_data(self, data):
    if self._cell is not None:
      self.cells.setdefault(self._cell[:2], []).append((self._cell[2], data))
      self._cell = None


def _load(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def _parse(text):
  page = _Page()
  page.feed(text)
  return page


def test_report_figures_are_the_runs_own_numbers(trained_smoke_run):
  _, workdir = trained_smoke_run
  saved, decision = _load(workdir, "metrics.json"), _load(workdir, "decision.json")
  with open(os.path.join(workdir, "report.html"), encoding="utf-8") as f:
    page = _parse(f.read())
  rows = {**saved["metrics"]["per_class"], "mean": saved["metrics"]["mean"]}
  # Every metric of metrics.json, per class and mean, shown once in the metrics table (the
  # decision tables reuse some names, e.g. the class names, but not these metrics).
  for name, row in rows.items():
    for metric, value in row.items():
      (shown_value, text), = page.cells[(name, metric)]
      assert float(shown_value) == value and text == f"{100 * value:.1f}"
  for name, row in saved["classwise"]["per_class"].items():
    shown = dict(page.cells[(name, "f1")])
    assert f"{100 * row['f1']:.1f}" in shown.values()
  names = decision["groups"]["names"]
  for name in saved["metrics"]["per_class"]:
    assert page.thresholds[(name, "classwise")] == [
        decision["thresholds"]["per_group"][names.index(name)]]
    assert page.thresholds[(name, "agnostic")] == [decision["thresholds"]["agnostic"]]
  # Self-contained, a bounded gallery, and the training curves of the run.
  assert not page.external
  assert 0 < len(page.images) <= report.GALLERY_PER_CLASS * len(rows)
  assert all(src.startswith("data:image/jpeg;base64,") for src in page.images)
  assert page.curves == 7  # six terms of the training log + the validation loss


def test_gallery_puts_the_worst_misses_first():
  scores = np.array([0.2, 0.9, 0.5, 0.1, 0.7, 0.4])
  labels = np.array([1, 1, 0, 0, 0, 1])

  class Dataset:
    class_names = ("only",)
    test_class_ids = np.zeros(6, int)
    test = [{"image": np.zeros((4, 4, 3), np.uint8), "file_name": f"{i}.png"}
            for i in range(6)]

  views = streaming.Views({i: np.zeros((4, 4)) for i in range(6)},
                           {i: np.zeros((4, 4), np.uint8) for i in range(6)}, {0: (0.0, 1.0)})
  outputs = {"score": scores, "label": labels, "threshold": np.full(6, 0.45), "views": views}
  items = report.gallery(Dataset(), outputs, per_class=4)
  # Wrong by 0.25 (defect at 0.2), 0.25 (normal at 0.7), 0.05 (defect at 0.4), 0.05 (normal
  # at 0.5); ties keep test order.
  assert [item.file_name for item in items] == ["0.png", "4.png", "2.png", "5.png"]
  assert items[0].figure.shape == (4, 12, 3) and items[0].threshold == 0.45


def _chromium(*args, timeout=120):
  binary = shutil.which("chromium")
  if binary is None:
    pytest.fail(INSTALL_CHROMIUM)
  out = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", *args],
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


def test_report_renders_in_chromium(trained_smoke_run, tmp_path):
  _, workdir = trained_smoke_run
  url = "file://" + os.path.join(workdir, "report.html")
  page = _parse(_chromium("--dump-dom", url))
  assert page.load_check is not None, "the page's load script did not run"
  check = json.loads(page.load_check)
  assert check["errors"] == [] and check["broken"] == 0
  assert check["images"] == len(page.images) > 0
  screenshot = tmp_path / "report.png"
  _chromium(f"--screenshot={screenshot}", "--window-size=1280,2000", url)
  pixels = np.asarray(Image.open(screenshot).convert("RGB"))
  assert pixels.shape == (2000, 1280, 3)
  assert pixels.std() > 20
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


def test_tensorboard_reads_the_curves_and_final_metrics(trained_smoke_run, read_events):
  _, workdir = trained_smoke_run
  saved = _load(workdir, "metrics.json")
  events = read_events(os.path.join(workdir, "events"))
  log = saved["training_log"]
  for term in ("loss", "kd", "local", "global", "grad_norm"):
    scalars = events.Scalars(f"train/{term}")
    assert [s.step for s in scalars] == list(range(1, saved["step"] + 1))
    # log_every_steps=1 in the smoke config: the log's value is the step's.
    assert [s.value for s in scalars] == pytest.approx([r[term] for r in log], rel=1e-6)
  for tag in ("train/images_per_second", "train/learning_rate/rest",
              "train/learning_rate/projector"):
    assert len(events.Scalars(tag)) == len(log)
  assert [s.value for s in events.Scalars("validation/kd_loss")] == pytest.approx(
      [h["validation_loss"] for h in saved["history"]], rel=1e-6)
  final = events.Scalars("final/image_auroc/mean")
  assert [s.step for s in final] == [saved["evaluated_step"]]
  assert final[0].value == pytest.approx(saved["metrics"]["mean"]["image_auroc"], rel=1e-6)
  for name, row in saved["classwise"]["per_class"].items():
    assert events.Scalars(f"final_classwise/f1/{name}")[0].value == pytest.approx(row["f1"])
  images = events.Tags()["images"]
  assert sorted(images) == sorted(f"heatmaps/{name}" for name in saved["metrics"]["per_class"])
  shown = events.Images(images[0])[0]
  assert shown.width == 3 * shown.height  # image | ground truth | anomaly map

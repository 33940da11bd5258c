"""`python -m ccl_jax.predict` and the detectors on a tiny trained model (configs/demo.py:smoke)."""
from __future__ import annotations

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from ccl_jax import hiercore, predict
from ccl_jax.training import runner
from ccl_jax.decisions import grouping, thresholds
from ccl_jax.datasets import selection
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.ccl.detector import rd_outputs
from ccl_jax.models.detector import routing_embedding
from ccl_jax.runs.loading import load_detector

BATCH_SIZE = 3  # does not divide the 7 input images: the last batch is padded
ORIGINAL_SIZE = (48, 40)  # (width, height) of the input files: not the model's 32 x 32


@pytest.fixture(scope="module")
def fitted(trained_smoke_run, tmp_path_factory):
  """A trained smoke model with a decision.json, its detector and 7 input images."""
  root = tmp_path_factory.mktemp("predict")
  run_settings, trained_dir = trained_smoke_run
  workdir = str(root / "run")  # a copy: this fixture rewrites its decision.json
  shutil.copytree(trained_dir, workdir)
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=True)
  detector = load_detector(workdir)

  # Inputs: 3 carpet and 4 washer test images, stored at another size, in subfolders, in
  # several formats and colour modes.
  folder = root / "images"
  paths = []
  picks = [np.flatnonzero(dataset.test_class_ids == c)[:n] for c, n in ((0, 3), (1, 4))]
  for k, index in enumerate(np.concatenate(picks)):
    record = dataset.test[int(index)]
    image = Image.fromarray(record["image"]).resize(ORIGINAL_SIZE, Image.Resampling.BICUBIC)
    sub = folder / record["class_name"]
    sub.mkdir(parents=True, exist_ok=True)
    if k == 1:
      path, image = sub / f"{k}_grey.png", image.convert("L")
    elif k == 4:
      path, image = sub / f"{k}_alpha.png", image.convert("RGBA")
    elif k == 5:
      path = sub / f"{k}.jpg"
    else:
      path = sub / f"{k}.png"
    image.save(path)
    paths.append(str(path))
  (folder / "notes.md").write_text("not an image")
  paths.sort()

  # Expected outputs, independently of predict.py: PIL's bilinear resize (the dataset's)
  # and one unpadded rd_outputs / routing_embedding call over all images.
  images = np.stack([np.asarray(Image.open(p).convert("RGB").resize(
      (run_settings.image_size,) * 2, Image.Resampling.BILINEAR)) for p in paths])
  expected = jax.jit(lambda x: rd_outputs(
      detector.variables, detector.encoder_variables, x, network=detector.network,
      encoder=detector.encoder))(images)
  embed = jax.jit(lambda x: routing_embedding(detector.encoder_variables, x,
                                                        encoder=detector.encoder))
  train_images = np.stack([dataset.train[i]["image"] for i in range(len(dataset.train))])
  groups, _ = grouping.fit_groups(
      np.asarray(embed(train_images)), labels=dataset.train_class_ids,
      class_names=dataset.class_names)
  routed = grouping.route(groups, np.asarray(embed(images)))
  scores = np.asarray(expected["score"])
  # Thresholds inside the inputs' score range, so both decisions occur.
  cutoffs = thresholds.Thresholds(
      per_group=np.array([np.median(scores[routed == g]) if np.any(routed == g)
                          else np.median(scores) for g in range(groups.num_groups)]),
      agnostic=float(np.quantile(scores, 0.25)), rule="quantile", params={})
  RunDir(workdir).write_decision(groups, cutoffs, {"model_kind": detector.name})
  return dict(workdir=workdir, settings=run_settings, images=images, detector=detector,
              folder=str(folder), paths=paths,
              scores=scores, maps=np.asarray(expected["anomaly_map"]), routed=routed,
              groups=groups, thresholds=cutoffs)


def _main(*args: str) -> list[dict]:
  """The program with these flags, in this process (no new JAX start-up)."""
  flag_values = flags.FlagValues()
  predict.define_flags(flag_values)
  flag_values(["predict", *args])
  return predict.run(flag_values)


def _read_csv(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def test_csv_rows_scores_classes_and_decisions(fitted, tmp_path):
  output = tmp_path / "out" / "predictions.csv"
  returned = _main(f"--workdir={fitted['workdir']}", f"--images={fitted['folder']}",
                   f"--output={output}", f"--batch_size={BATCH_SIZE}")
  assert len(returned) == len(fitted["paths"])
  columns, rows = _read_csv(output)
  assert tuple(columns) == predict.COLUMNS
  assert [r["path"] for r in rows] == fitted["paths"]  # notes.md is not an image
  scores = np.array([float(r["score"]) for r in rows])
  np.testing.assert_allclose(scores, fitted["scores"], rtol=1e-5, atol=1e-6)
  names = fitted["groups"].names
  assert [r["class"] for r in rows] == [names[g] for g in fitted["routed"]]
  assert {r["class_source"] for r in rows} == {"routed"}
  used = np.array([float(r["threshold"]) for r in rows])
  np.testing.assert_array_equal(used, fitted["thresholds"].per_group[fitted["routed"]])
  decisions = [r["decision"] for r in rows]
  assert decisions == ["anomalous" if s > t else "normal" for s, t in zip(scores, used)]
  assert set(decisions) == {"anomalous", "normal"}
  assert all(r["overlay"] == "" and r["error"] == "" for r in rows)
  assert os.listdir(output.parent) == ["predictions.csv"]  # no temp file left behind


def test_json_with_a_list_file_and_the_agnostic_threshold(fitted, tmp_path):
  listed = [fitted["paths"][5], fitted["paths"][0], fitted["paths"][5]]
  list_file = tmp_path / "list.txt"
  list_file.write_text("# reversed, with a duplicate\n"
                       + "\n".join(os.path.relpath(p, tmp_path) for p in listed) + "\n\n")
  paths = predict.list_images([str(list_file), fitted["paths"][3]])
  assert [os.path.realpath(p) for p in paths] == [
      os.path.realpath(p) for p in listed + [fitted["paths"][3]]]
  rows = predict.predict_images(fitted["detector"], fitted["groups"], fitted["thresholds"], paths,
                                threshold_mode="agnostic", batch_size=BATCH_SIZE)
  output = tmp_path / "predictions.json"
  predict.write_output(str(output), rows, {"threshold_mode": "agnostic"})
  with open(output) as f:
    saved = json.load(f)
  assert saved["threshold_mode"] == "agnostic"
  rows = saved["predictions"]
  assert [r["path"] for r in rows] == paths
  assert all(tuple(r) == predict.COLUMNS for r in rows)
  np.testing.assert_allclose([r["score"] for r in rows], fitted["scores"][[5, 0, 5, 3]],
                             rtol=1e-5, atol=1e-6)
  agnostic = fitted["thresholds"].agnostic
  assert all(r["threshold"] == agnostic for r in rows)
  assert [r["decision"] for r in rows] == [
      "anomalous" if r["score"] > agnostic else "normal" for r in rows]


def test_class_name_forces_the_group(fitted):
  groups = fitted["groups"]
  for name in groups.names:
    rows = predict.predict_images(fitted["detector"], groups, fitted["thresholds"], fitted["paths"],
                                  class_name=name, batch_size=BATCH_SIZE)
    assert {(r["class"], r["class_source"]) for r in rows} == {(name, "given")}
    assert {r["threshold"] for r in rows} == {fitted["thresholds"].per_group[groups.index_of(name)]}
    np.testing.assert_allclose([r["score"] for r in rows], fitted["scores"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="'nope'.*carpet"):
    predict.predict_images(fitted["detector"], groups, fitted["thresholds"], fitted["paths"],
                           class_name="nope", batch_size=BATCH_SIZE)
  clusters = grouping.Groups(groups.centroids, ("group_0", "group_1"), False)
  with pytest.raises(ValueError, match="found by clustering"):
    predict.predict_images(fitted["detector"], clusters, fitted["thresholds"], fitted["paths"],
                           class_name="group_0", batch_size=BATCH_SIZE)


def test_overlays_are_pngs_of_the_input_size_scaled_to_the_threshold(fitted, tmp_path):
  rows = predict.predict_images(fitted["detector"], fitted["groups"], fitted["thresholds"],
                                fitted["paths"], overlay_dir=str(tmp_path / "overlays"),
                                batch_size=BATCH_SIZE)
  assert len({r["overlay"] for r in rows}) == len(rows)
  for row, path, anomaly_map in zip(rows, fitted["paths"], fitted["maps"]):
    with Image.open(row["overlay"]) as im:
      assert im.format == "PNG" and im.size == ORIGINAL_SIZE and im.mode == "RGB"
      pixels = np.asarray(im)
    original = np.asarray(Image.open(path).convert("RGB"))
    expected = predict.overlay(original, anomaly_map, row["threshold"])
    assert np.abs(pixels.astype(int) - expected).max() <= 2
    assert np.abs(pixels.astype(int) - original).mean() > 5  # the map is visible
  # The colour scale is tied to the threshold: map values 0 and 2 x threshold are the two
  # ends of the colour map whatever the map's own range.
  black = np.zeros((2, 2, 3), np.uint8)
  low = predict.overlay(black, np.zeros((2, 2)), 0.5)
  high = predict.overlay(black, np.full((2, 2), 1.0), 0.5)
  np.testing.assert_array_equal(low[0, 0], [0, 0, 64])     # half of dark blue (0, 0, 128)
  np.testing.assert_array_equal(high[0, 0], [80, 0, 0])    # half of dark red (160, 0, 0)


def test_unreadable_image_is_an_error_or_an_error_row(fitted, tmp_path):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(open(fitted["paths"][0], "rb").read()[:60])
  paths = fitted["paths"][:2] + [str(broken)] + fitted["paths"][2:] + [str(truncated)]
  with pytest.raises(predict.UnreadableImageError, match="broken.png.*--skip_unreadable"):
    predict.predict_images(fitted["detector"], fitted["groups"], fitted["thresholds"], paths,
                           batch_size=BATCH_SIZE)
  rows = predict.predict_images(fitted["detector"], fitted["groups"], fitted["thresholds"], paths,
                                skip_unreadable=True, batch_size=BATCH_SIZE)
  assert [r["path"] for r in rows] == paths
  bad = [r for r in rows if r["decision"] == "error"]
  assert [r["path"] for r in bad] == [str(broken), str(truncated)]
  assert all(r["error"] and r["score"] is None and r["threshold"] is None for r in bad)
  good = [r for r in rows if r["decision"] != "error"]
  np.testing.assert_allclose([r["score"] for r in good], fitted["scores"], rtol=1e-5, atol=1e-6)
  output = tmp_path / "with_errors.csv"
  predict.write_output(str(output), rows, {})
  _, saved = _read_csv(output)
  assert [(r["decision"], r["score"]) for r in saved if r["path"] == str(broken)] == [
      ("error", "")]


def test_bad_arguments_give_clear_errors(fitted, tmp_path):
  # The output format is checked before anything is loaded.
  with pytest.raises(ValueError, match=r"unknown format '\.txt'.*\.csv or \.json"):
    _main(f"--workdir={tmp_path}", f"--images={fitted['folder']}",
          f"--output={tmp_path / 'out.txt'}")
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    predict.list_images([str(tmp_path / "missing")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .png/.jpg"):
    predict.list_images([str(tmp_path / "empty")])
  shutil.copy(os.path.join(fitted["workdir"], "config.json"), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="decision.json not found.*end of training"):
    RunDir(str(tmp_path)).read_decision()


def test_detector_checks_its_inputs(fitted, tmp_path):
  detector = fitted["detector"]
  assert detector.name == "ccl" and detector.image_size == 32
  with pytest.raises(ValueError, match=r"uint8 images \[B, 32, 32, 3\]"):
    detector.score(np.zeros((2, 16, 16, 3), np.uint8), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"group_ids must be \[2\]"):
    detector.score(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3, np.int32))
  with pytest.raises(FileNotFoundError, match="not a ccl_jax workdir"):
    load_detector(str(tmp_path / "nothing"))


def test_hiercore_workdir_scores_each_image_against_its_group(fitted, tmp_path):
  run_settings = fitted["settings"].replace(**{"model.kind": "hiercore"})
  workdir = str(tmp_path / "hiercore")
  runner.run(run_settings, workdir)
  groups, cutoffs, _ = RunDir(workdir).read_decision()
  output = tmp_path / "hiercore.json"
  _main(f"--workdir={workdir}", f"--images={fitted['folder']}", f"--output={output}",
        f"--batch_size={BATCH_SIZE}")
  with open(output) as f:
    saved = json.load(f)
  assert saved["model_kind"] == "hiercore"
  rows = saved["predictions"]
  # Expected: the memory bank scored directly, unbatched, with independently routed groups.
  model = load_detector(workdir)
  embed = jax.jit(lambda x: routing_embedding(model.encoder_variables, x,
                                                        encoder=model.encoder))
  routed = grouping.route(groups, np.asarray(embed(fitted["images"])))
  assert [r["class"] for r in rows] == [groups.names[g] for g in routed]
  feature_dim = run_settings.hiercore.feature_dim or None
  expected = hiercore.score_images(model.bank, model.encoder_variables, fitted["images"],
                                   routed, encoder=model.encoder, feature_dim=feature_dim)
  scores = np.array([r["score"] for r in rows])
  np.testing.assert_allclose(scores, expected["score"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal([r["threshold"] for r in rows], cutoffs.per_group[routed])
  # The group matters for HierCore: forcing the other class changes the scores.
  other = [predict.predict_images(model, groups, cutoffs, fitted["paths"], class_name=name,
                                  batch_size=BATCH_SIZE) for name in groups.names]
  flipped = [other[1 - g][i]["score"] for i, g in enumerate(routed)]
  assert not np.allclose(flipped, scores, rtol=1e-3)
  for name, forced in zip(groups.names, other):
    expected = hiercore.score_images(model.bank, model.encoder_variables, fitted["images"],
                                     np.full(len(routed), groups.index_of(name), np.int32),
                                     encoder=model.encoder, feature_dim=feature_dim)
    np.testing.assert_allclose([r["score"] for r in forced], expected["score"], rtol=1e-5,
                               atol=1e-6)

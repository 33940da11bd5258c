"""`python -m ccl_jax.export`, the standalone loader `ccl_jax.deploy.loader` and predict --model,
on the tiny trained models of configs/demo.py:smoke (CCL and HierCore)."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from ccl_jax import export, predict
from ccl_jax.decisions import thresholds
from ccl_jax.deploy import loader
from ccl_jax.datasets import selection
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.runs.loading import load_detector

NUM_IMAGES = 5  # with --batch_size 2 the last batch is padded


def _export(*args: str) -> dict:
  flag_values = flags.FlagValues()
  export.define_flags(flag_values)
  flag_values(["export", *args])
  return export.run(flag_values)


def _predict(*args: str) -> list[dict]:
  flag_values = flags.FlagValues()
  predict.define_flags(flag_values)
  flag_values(["predict", *args])
  return predict.run(flag_values)


@pytest.fixture(scope="module")
def runs(smoke_runs, tmp_path_factory):
  """Both smoke runs exported (jax and onnx), and test images of the smoke data."""
  root = tmp_path_factory.mktemp("export")
  _, workdirs, dataset = smoke_runs
  ccl_dir, hiercore_dir = workdirs["ccl"], workdirs["hiercore"]
  picks = np.linspace(0, len(dataset.test) - 1, NUM_IMAGES).astype(int)
  images = np.stack([dataset.test[int(i)]["image"] for i in picks])
  folder = root / "images"
  folder.mkdir()
  for k, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{k}.png")
  models = {}
  for name, workdir in (("ccl", ccl_dir), ("hiercore", hiercore_dir)):
    models[name] = str(root / f"model_{name}")
    _export(f"--workdir={workdir}", f"--output={models[name]}", "--format=jax,onnx,openvino")
  return dict(workdirs={"ccl": ccl_dir, "hiercore": hiercore_dir}, models=models,
              images=images, folder=str(folder), group_ids=np.arange(NUM_IMAGES) % 2)


@pytest.mark.parametrize("kind", ["ccl", "hiercore"])
def test_exported_maps_equal_the_workdir_detectors(runs, kind):
  detector = load_detector(runs["workdirs"][kind])
  images, group_ids = runs["images"], runs["group_ids"]
  expected = detector.score(images, group_ids)
  expected_maps = np.asarray(expected.anomaly_maps)
  embedding = np.asarray(detector.embed(images))
  for backend in loader.BACKENDS:
    model = loader.load(runs["models"][kind], backend)
    assert (model.name, model.image_size) == (detector.name, detector.image_size)
    # Any batch size: the functions were exported with a symbolic batch dimension.
    scores = [model.score(images[i:i + 3], group_ids[i:i + 3]) for i in (0, 3)]
    maps = np.concatenate([s.anomaly_maps for s in scores])
    # 1e-4 of the maps' range: the translated ONNX graph (and OpenVINO's conversion of
    # it), in float32 like XLA's.
    tolerance = 1e-4 * np.abs(expected_maps).max()
    np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=tolerance)
    np.testing.assert_allclose(np.concatenate([s.image_scores for s in scores]),
                               np.asarray(expected.image_scores), rtol=1e-4)
    np.testing.assert_allclose(model.embed(images), embedding, rtol=0,
                               atol=1e-4 * np.abs(embedding).max())
  if kind == "hiercore":
    # The group decides the score: the other group's memory bank gives other maps.
    other = loader.load(runs["models"][kind]).score(images, 1 - group_ids).anomaly_maps
    assert np.abs(other - expected_maps).max() > 100 * tolerance


@pytest.mark.parametrize("kind,setting,value", [("ccl", "map_scale", 1 / 9),
                                                ("hiercore", "reweight_neighbours", 3)])
def test_the_serialised_functions_keep_every_scoring_setting(runs, kind, setting, value):
  # `:authors` scales CCL maps by 1/9, `hiercore.reweight_neighbours` reweights HierCore
  # scores: an exported model must score as the run did, or its thresholds would not apply.
  detector = load_detector(runs["workdirs"][kind])
  setattr(detector, setting, value)
  images, group_ids = runs["images"], runs["group_ids"]
  expected = detector.score(images, group_ids)
  weights, _, score = detector.pure_functions()
  maps, image_scores = jax.jit(score)(weights, images, group_ids)
  np.testing.assert_allclose(maps, expected.anomaly_maps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(image_scores, expected.image_scores, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ccl", "hiercore"])
def test_predict_from_the_model_gives_the_workdir_rows(runs, kind, tmp_path):
  common = [f"--images={runs['folder']}", "--batch_size=2"]
  rows = _predict(f"--workdir={runs['workdirs'][kind]}", f"--output={tmp_path / 'w.csv'}",
                  *common)
  assert len(rows) == NUM_IMAGES
  for backend in loader.BACKENDS:
    output = tmp_path / f"{backend}.json"
    got = _predict(f"--model={runs['models'][kind]}", f"--backend={backend}",
                   f"--output={output}", *common)
    for row, expected in zip(got, rows):
      assert {k: v for k, v in row.items() if k != "score"} == {
          k: v for k, v in expected.items() if k != "score"}
      assert row["score"] == pytest.approx(expected["score"], rel=1e-4)
    written = json.loads(output.read_text())
    assert written["backend"] == backend
    assert written["model"] == runs["models"][kind]
  with pytest.raises(ValueError, match="--backend chooses"):
    _predict(f"--workdir={runs['workdirs'][kind]}", "--backend=onnx",
             f"--output={tmp_path / 'x.csv'}", *common)


def test_loader_needs_only_jax_and_numpy(runs, tmp_path, repo_root):
  """The loader in a fresh interpreter where the training stack cannot be imported."""
  model = runs["models"]["hiercore"]
  expected = loader.load(model).score(runs["images"], runs["group_ids"])
  np.savez(tmp_path / "inputs.npz", images=runs["images"], group_ids=runs["group_ids"])
  script = textwrap.dedent(f"""
      import sys
      BLOCKED = ("flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "grain",
                 "sklearn", "torch", "ml_collections", "ccl_jax.training.train",
                 "ccl_jax.training", "ccl_jax.evaluation", "ccl_jax.runs", "ccl_jax.ccl",
                 "ccl_jax.hiercore", "ccl_jax.models", "ccl_jax.datasets", "ccl_jax.config")

      class Block:
        def find_spec(self, name, path=None, target=None):
          if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError("blocked in this test: " + name)
          return None

      sys.meta_path.insert(0, Block())
      import numpy as np
      from ccl_jax.deploy import loader
      inputs = np.load({str(tmp_path / 'inputs.npz')!r})
      scores = loader.load({model!r}).score(inputs["images"], inputs["group_ids"])
      np.save({str(tmp_path / 'maps.npy')!r}, scores.anomaly_maps)
      print(sorted(m for m in sys.modules if m.split(".")[0] in
                   ("flax", "optax", "orbax", "sklearn", "tensorflow")))
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True,
                          text=True, check=False, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == "[]"
  np.testing.assert_array_equal(np.load(tmp_path / "maps.npy"), expected.anomaly_maps)


def _copy(model: str, target: pathlib.Path) -> pathlib.Path:
  shutil.copytree(model, target)
  return target


@pytest.mark.slow
def test_int8_model_has_its_own_thresholds_and_reports_the_metric_changes(runs, tmp_path):
  workdir = runs["workdirs"]["ccl"]
  output = tmp_path / "int8"
  manifest = _export(f"--workdir={workdir}", f"--output={output}", "--format=openvino",
                     "--precision=int8")
  assert manifest["precision"] == "int8"
  assert sorted(manifest["files"]) == ["embed.bin", "embed.xml", "score.bin", "score.xml"]
  # Quantised: NNCF put FakeQuantize nodes into the score graph only.
  assert "FakeQuantize" in (output / "score.xml").read_text()
  assert "FakeQuantize" not in (output / "embed.xml").read_text()
  model = loader.load(str(output), "openvino")
  assert model.precision == "int8"
  for backend in ("jax", "onnx"):
    with pytest.raises(loader.ModelDirError, match=f"no {backend} export"):
      loader.load(str(output), backend)

  # The thresholds are the run's rule applied to the int8 scores of the held-out images.
  run_settings = RunDir(workdir).read_settings()
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=True)
  _, holdout = selection.training_split(run_settings, dataset)
  images = np.stack([dataset.train[int(i)]["image"] for i in holdout])
  group_ids = np.asarray([model.manifest["groups"]["names"].index(dataset.class_names[c])
                          for c in dataset.train_class_ids[holdout]])
  expected = thresholds.estimate_thresholds(
      model.score(images, group_ids).image_scores, group_ids, 2,
      rule=run_settings.decision.rule, **run_settings.decision.rule_kwargs)
  np.testing.assert_allclose(manifest["thresholds"]["per_group"], expected.per_group,
                             rtol=1e-6)
  f32 = loader.load(runs["models"]["ccl"], "openvino").score(images, group_ids)
  assert not np.array_equal(model.score(images, group_ids).image_scores, f32.image_scores)

  check = manifest["precision_check"]
  assert check["test_images"] == len(dataset.test)
  assert sorted(check["mean_over_classes"]) == sorted(
      f"{part}/{metric}" for part, metric in export.PRECISION_METRICS)
  for values in check["mean_over_classes"].values():
    assert values["change_points"] == pytest.approx(values["int8"] - values["f32"])
  # The float32 side is the run's own evaluation.
  run_metrics = RunDir(workdir).read_metrics()["metrics"]["mean"]
  assert check["mean_over_classes"]["metrics/image_auroc"]["f32"] == pytest.approx(
      100 * run_metrics["image_auroc"], abs=1e-6)
  rows = _predict(f"--model={output}", "--backend=openvino", f"--images={runs['folder']}",
                  f"--output={tmp_path / 'p.json'}")
  assert {row["threshold"] for row in rows} <= set(manifest["thresholds"]["per_group"])


def test_reduced_precision_is_refused_where_it_cannot_be_measured(runs, tmp_path):
  with pytest.raises(loader.UnsupportedPrecisionError, match="no BF16 support.*'f32' or "
                     "'int8'"):
    loader.check_cpu_precision("bf16", ["FP32", "INT8"])
  loader.check_cpu_precision("bf16", ["FP32", "INT8", "BF16"])
  output = str(tmp_path / "model")
  if "BF16" not in loader.cpu_capabilities():
    with pytest.raises(export.ExportError, match="--precision bf16: .*no BF16 support"):
      _export(f"--workdir={runs['workdirs']['ccl']}", f"--output={output}",
              "--format=openvino", "--precision=bf16")
  with pytest.raises(export.ExportError, match="--format openvino alone"):
    _export(f"--workdir={runs['workdirs']['ccl']}", f"--output={output}",
            "--format=jax,openvino", "--precision=int8")
  # HierCore's leave-one-out thresholds cannot be scored again through the graph.
  with pytest.raises(export.ExportError, match="thresholds came from cross_fit scores"):
    _export(f"--workdir={runs['workdirs']['hiercore']}", f"--output={output}",
            "--format=openvino", "--precision=int8")
  assert not os.path.exists(output)


def test_damaged_or_incompatible_model_directories_are_clear_errors(runs, tmp_path):
  model = runs["models"]["ccl"]
  corrupted = _copy(model, tmp_path / "corrupted")
  weights = corrupted / loader.WEIGHTS_FILE
  data = bytearray(weights.read_bytes())
  data[len(data) // 2] ^= 0xFF
  weights.write_bytes(bytes(data))
  with pytest.raises(loader.ModelDirError, match=f"{weights} is corrupted"):
    loader.load(str(corrupted))

  missing = _copy(model, tmp_path / "missing")
  (missing / "score.onnx").unlink()
  with pytest.raises(loader.ModelDirError, match="score.onnx is missing"):
    loader.load(str(missing), "onnx")

  for key, value, message in (
      ("format_version", 99, "format_version is 99; this code reads version 1"),
      ("calling_convention_version", 999, "calling convention version 999 .* Install jax==")):
    changed = _copy(model, tmp_path / key)
    manifest_path = changed / loader.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    if key == "format_version":
      manifest[key] = value
    else:
      manifest["functions"]["embed"][key] = value
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(loader.ModelDirError, match=message):
      loader.load(str(changed))

  with pytest.raises(loader.ModelDirError, match="not a model directory"):
    loader.load(str(tmp_path))


def test_export_refuses_to_replace_another_model(runs, tmp_path):
  target = tmp_path / "model"
  args = [f"--workdir={runs['workdirs']['hiercore']}", f"--output={target}", "--format=jax"]
  target.mkdir()
  (target / "notes.txt").write_text("mine")
  with pytest.raises(export.ExportError, match="not an exported model.*--overwrite"):
    _export(*args)
  assert (target / "notes.txt").read_text() == "mine"
  _export(*args, "--overwrite")
  assert sorted(os.listdir(target)) == sorted(
      ["manifest.json", "weights.npz", "embed.jaxexport", "score.jaxexport"])
  _export(*args)  # the same run again replaces it
  with pytest.raises(export.ExportError, match="holds the export of"):
    _export(f"--workdir={runs['workdirs']['ccl']}", f"--output={target}", "--format=jax")
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary left
  with pytest.raises(export.ExportError, match="--format 'tflite'"):
    _export(*args, "--format=tflite")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["", "hiercore"])
def test_demo_onnx_and_openvino_maps_equal_jax_on_every_test_image(variant, tmp_path, repo_root):
  """configs/demo.py (CCL) and :hiercore trained, exported, and scored on all test images."""
  workdir, model_dir = tmp_path / "run", tmp_path / "model"
  config = os.path.join(repo_root, "configs", "demo.py") + (f":{variant}" if variant else "")
  result = subprocess.run(
      [sys.executable, "-m", "ccl_jax.main", "--config", config, "--workdir", str(workdir),
       f"--config.dataset.data_dir={tmp_path / 'data'}"],
      capture_output=True, text=True, cwd=repo_root, timeout=1800, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  export.export_model(str(workdir), str(model_dir), loader.BACKENDS)
  run_settings = RunDir(str(workdir)).read_settings()
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=True)
  images = np.stack([dataset.test[i]["image"] for i in range(len(dataset.test))])
  jax_model, onnx_model, openvino_model = (loader.load(str(model_dir), b)
                                           for b in loader.BACKENDS)
  num_groups = len(jax_model.manifest["groups"]["names"])
  group_ids = np.asarray(dataset.test_class_ids, np.int32) % num_groups
  for start in range(0, len(images), 16):
    batch, groups = images[start:start + 16], group_ids[start:start + 16]
    expected = jax_model.score(batch, groups).anomaly_maps
    for model in (onnx_model, openvino_model):
      np.testing.assert_allclose(model.score(batch, groups).anomaly_maps, expected,
                                 rtol=0, atol=1e-4 * np.abs(expected).max())


def test_predict_takes_either_a_workdir_or_a_model(tmp_path):
  for args in ([], ["--workdir=run", "--model=model"]):
    flag_values = flags.FlagValues()
    predict.define_flags(flag_values)
    with pytest.raises(flags.IllegalFlagValueError, match="workdir.*model"):
      flag_values(["predict", "--images=x", f"--output={tmp_path / 'p.csv'}", *args])

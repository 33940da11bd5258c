"""Your own images (dataset 'folder'): both layouts, validation, normal-only classes, and a
whole run (train, evaluate, thresholds, predict) on crops of real photographs."""
import hashlib
import json
import os

import numpy as np
import pytest
import skimage.data
from absl import flags
from PIL import Image

from ccl_jax import datasets as D
from ccl_jax import predict
from ccl_jax.training import runner
from ccl_jax.datasets import common, folder_layout, selection

SIZE = 32


def _crops(photo, n, seed):
  """n SIZE x SIZE crops of a photograph, at random places (fixed by seed)."""
  rng = np.random.default_rng(seed)
  h, w = photo.shape[:2]
  return [photo[y:y + SIZE, x:x + SIZE].copy()
          for y, x in zip(rng.integers(0, h - SIZE, n), rng.integers(0, w - SIZE, n))]


def _defect(crop, seed, kind):
  """The crop with a dark disk or scratch drawn in, and its 0/255 mask."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  cy, cx = rng.integers(10, SIZE - 10, 2)
  if kind == "disk":
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
  else:  # a thin diagonal scratch
    mask = (np.abs((yy - cy) - (xx - cx)) <= 1) & (np.abs(xx - cx) <= 9)
  out = crop.copy()
  out[mask] = 0
  return out, mask.astype(np.uint8) * 255


def _save(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def _make_folder(root, *, defects=True):
  """Three classes with names no built-in dataset knows, from real photographs:

  brick-wall  MVTec AD layout, 8-bit grey PNG, test good + 'hole' (disks) with masks
  Grass.v2    flat layout, RGB JPEG normals, abnormal/scratch/ BMP, mask/scratch/*_mask
  gravel_16   flat layout, 16-bit grey PNG normals, abnormal/ RGBA PNG with plain-stem masks
  coffee.beans  flat layout, RGB PNG normals only (a class without defects)
  With defects=False the defective images and masks are left out (normal images only) and
  brick-wall has no test/ folder at all.
  """
  brick, grass, gravel = skimage.data.brick(), skimage.data.grass(), skimage.data.gravel()
  for i, c in enumerate(_crops(brick, 10, 0)):
    _save(root / "brick-wall/train/good" / f"{i:03d}.png", c)
  if defects:
    for i, c in enumerate(_crops(brick, 3, 1)):
      _save(root / "brick-wall/test/good" / f"{i:03d}.png", c)
    for i, c in enumerate(_crops(brick, 3, 2)):
      image, mask = _defect(c, i, "disk")
      _save(root / "brick-wall/test/hole" / f"{i:03d}.png", image)
      _save(root / "brick-wall/ground_truth/hole" / f"{i:03d}_mask.png", mask)
  for i, c in enumerate(_crops(grass, 10, 3)):
    _save(root / "Grass.v2/normal" / f"g{i:02d}.jpg", np.stack([c] * 3, -1), quality=95)
  for i, c in enumerate(_crops(gravel, 10, 4)):
    _save(root / "gravel_16/normal" / f"{i:02d}.png", c.astype(np.uint16) * 257)
  for i, c in enumerate(_crops(skimage.data.coffee(), 10, 7)):
    _save(root / "coffee.beans/normal" / f"{i:02d}.png", c)
  if defects:
    for i, c in enumerate(_crops(grass, 3, 5)):
      image, mask = _defect(c, 10 + i, "scratch")
      _save(root / "Grass.v2/abnormal/scratch" / f"s{i}.bmp", np.stack([image] * 3, -1))
      _save(root / "Grass.v2/mask/scratch" / f"s{i}_mask.png", mask)
    for i, c in enumerate(_crops(gravel, 2, 6)):
      image, mask = _defect(c, 20 + i, "disk")
      rgba = np.concatenate([np.stack([image] * 3, -1), np.full((SIZE, SIZE, 1), 200,
                                                                 np.uint8)], -1)
      _save(root / "gravel_16/abnormal" / f"d{i}.png", rgba)
      _save(root / "gravel_16/mask" / f"d{i}.tif", mask)
  return root


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  return _make_folder(tmp_path_factory.mktemp("photos") / "raw")


def _settings(smoke_settings, root, data_dir, **overrides):
  return smoke_settings(**{
      "dataset.name": "folder", "dataset.manual_dir": str(root), "dataset.classes": "all",
      "dataset.data_dir": str(data_dir), "num_epochs": 1, "validation_fraction": 0.3,
      "num_heatmaps_per_class": 1, **overrides})


def _predict(workdir, images, output):
  flag_values = flags.FlagValues()
  predict.define_flags(flag_values)
  flag_values(["predict", f"--workdir={workdir}", f"--images={images}",
               f"--output={output}"])
  return predict.run(flag_values)


# ---------------------------------------------------------------- reading


def test_both_layouts_read_as_documented(photo_folder, tmp_path):
  ds = D.load("folder", manual_dir=photo_folder, data_dir=tmp_path, image_size=SIZE,
              verbose=False)
  assert ds.class_names == ("Grass.v2", "brick-wall", "coffee.beans", "gravel_16")
  test = [ds.test[i] for i in range(len(ds.test))]
  by_class = {c: [r for r in test if r["class_name"] == c] for c in ds.class_names}

  # MVTec AD layout: splits from the folders, masks paired by '<stem>_mask'.
  assert np.sum(ds.train_class_ids == 1) == 10
  assert [(r["defect_type"], r["label"]) for r in by_class["brick-wall"]] == (
      [("good", 0)] * 3 + [("hole", 1)] * 3)
  hole = by_class["brick-wall"][3]
  expected = np.asarray(Image.open(photo_folder / "brick-wall/ground_truth/hole/000_mask.png"))
  np.testing.assert_array_equal(hole["mask"], expected > 0)
  grey = np.asarray(Image.open(photo_folder / "brick-wall/test/hole/000.png"))
  np.testing.assert_array_equal(hole["image"], np.stack([grey] * 3, -1))

  # Flat layout: 20% of the 10 normal images are test normals, the two whose file names
  # have the smallest SHA-256 digests; defect type from the abnormal/ sub-folder.
  names = [f"Grass.v2/normal/g{i:02d}.jpg" for i in range(10)]
  held_out = sorted(names, key=lambda n: hashlib.sha256(n.encode()).digest())[:2]
  grass = by_class["Grass.v2"]
  assert [r["file_name"] for r in grass[:2]] == sorted(held_out)
  assert [(r["defect_type"], r["label"]) for r in grass[2:]] == [("scratch", 1)] * 3
  assert np.sum(ds.train_class_ids == 0) == 8
  scratch = np.asarray(Image.open(photo_folder / "Grass.v2/mask/scratch/s1_mask.png")) > 0
  np.testing.assert_array_equal(grass[3]["mask"], scratch)

  # 16-bit grey normals keep their high byte; RGBA defects lose alpha; TIFF masks pair by
  # their plain stem.
  gravel = by_class["gravel_16"]
  assert [r["defect_type"] for r in gravel] == ["good", "good", "abnormal", "abnormal"]
  sixteen = np.asarray(Image.open(photo_folder / gravel[0]["file_name"]))
  np.testing.assert_array_equal(gravel[0]["image"][..., 0], (sixteen >> 8).astype(np.uint8))
  np.testing.assert_array_equal(
      gravel[2]["mask"], np.asarray(Image.open(photo_folder / "gravel_16/mask/d0.tif")) > 0)
  assert all(r["image"].shape == (SIZE, SIZE, 3) for r in test)
  # A class of normal images only: 8 train, 2 test normals.
  assert [r["label"] for r in by_class["coffee.beans"]] == [0, 0]
  assert np.sum(ds.train_class_ids == 2) == 8


def test_normal_test_share_is_an_option_with_its_own_config(photo_folder, tmp_path):
  ds = D.load("folder", classes=["Grass.v2"], manual_dir=photo_folder, data_dir=tmp_path,
              image_size=SIZE, verbose=False, normal_test_share=0.5)
  assert len(ds.train) == 5 and len(ds.test) == 5 + 3
  assert (tmp_path / "folder" / "Grass.v2_32_normal_test_share0.5").is_dir()
  # The held-out set only grows with the share: the order is fixed by the names.
  small = folder_layout.held_out_normals([f"n{i}" for i in range(10)], 0.2)
  large = folder_layout.held_out_normals([f"n{i}" for i in range(10)], 0.5)
  assert len(small) == 2 and len(large) == 5 and small < large
  with pytest.raises(D.DatasetError, match="normal_test_share"):
    D.load("folder", manual_dir=photo_folder, data_dir=tmp_path, image_size=SIZE,
           verbose=False, normal_test_share=1.5)


def test_validation_names_every_bad_path_at_once(photo_folder, tmp_path, prepared_dirs):
  root = tmp_path / "bad"
  _make_folder(root)
  (root / "my screws/normal").mkdir(parents=True)                 # space in the name
  (root / "empty_class/images").mkdir(parents=True)               # neither layout
  os.remove(root / "Grass.v2/mask/scratch/s1_mask.png")           # masks for some only
  _save(root / "gravel_16/mask/d1.tif", np.zeros((8, 8), np.uint8))  # wrong size
  (root / "brick-wall/test/good/000.png").write_bytes(b"not a png")  # unreadable
  (root / "both/train/good").mkdir(parents=True)                  # both layouts
  (root / "both/normal").mkdir(parents=True)
  with pytest.raises(D.DatasetError) as info:
    D.load("folder", manual_dir=root, data_dir=tmp_path / "tfds", image_size=SIZE,
           verbose=False)
  paths = {p for p, _ in info.value.problems}
  assert {str(root / "my screws"), str(root / "empty_class"),
          str(root / "Grass.v2/abnormal/scratch/s1.bmp"), str(root / "gravel_16/mask/d1.tif"),
          str(root / "brick-wall/test/good/000.png"), str(root / "both")} <= paths
  message = str(info.value)
  assert "'my screws' refused" in message and "neither" in message
  assert "while other images of its class have one" in message
  assert not prepared_dirs(tmp_path / "tfds")


def test_mixture_with_another_dataset(photo_folder, make_mvtec_tree, tmp_path,
                                      smoke_settings):
  mvtec = make_mvtec_tree(tmp_path / "mvtec", classes=("bottle",))
  run_settings = _settings(smoke_settings, f"{photo_folder},{mvtec}", tmp_path / "tfds", **{
      "dataset.name": "folder,mvtec_ad",
      "dataset.classes": "folder/gravel_16,mvtec_ad/bottle"})
  ds = selection.load_selected(run_settings.dataset, image_size=SIZE, is_main=True)
  assert ds.class_names == ("folder/gravel_16", "mvtec_ad/bottle")
  assert {ds.test[i]["class_name"] for i in range(len(ds.test))} == set(ds.class_names)
  assert np.bincount(ds.train_class_ids).tolist() == [8, 3]


# ---------------------------------------------------------------- whole runs


def test_one_command_trains_evaluates_and_predicts(photo_folder, tmp_path, smoke_settings):
  workdir = tmp_path / "run"
  runner.run(_settings(smoke_settings, photo_folder, tmp_path / "tfds", **{
      "loss.local_weight": 0.0, "loss.global_weight": 0.0}), str(workdir))
  saved = json.loads((workdir / "metrics.json").read_text())
  rows = saved["metrics"]["per_class"]
  assert set(rows) == {"Grass.v2", "brick-wall", "coffee.beans", "gravel_16"}
  with_defects = ("Grass.v2", "brick-wall", "gravel_16")
  for name in with_defects:  # both labels and masks: every metric
    assert all(0.0 <= v <= 1.0 for v in rows[name].values())
  # The class without defects is skipped, named with its reason, and out of the means.
  assert set(saved["metrics"]["skipped"]) == {"coffee.beans"}
  assert "2 normal and 0 anomalous" in saved["metrics"]["skipped"]["coffee.beans"]["image_ap"]
  assert all(v is None for v in rows["coffee.beans"].values())
  for key, mean in saved["metrics"]["mean"].items():
    assert mean == pytest.approx(np.mean([rows[c][key] for c in with_defects]))
  assert set(saved["classwise"]["per_class"]) == set(rows)
  # Its decisions: no precision, recall or F1 without defects (not 1.0), so out of the means.
  for block in ("classwise", "agnostic"):
    decided = saved[block]
    assert [decided["per_class"]["coffee.beans"][m] for m in ("precision", "recall", "f1")] \
        == [None] * 3
    assert "no anomalous test images" in decided["skipped"]["coffee.beans"]["recall"]
    assert decided["mean"]["f1"] == pytest.approx(
        np.mean([decided["per_class"][c]["f1"] for c in with_defects]))
  assert "coffee.beans: precision, recall, f1, threshold_efficiency: no anomalous" in (
      workdir / "results.md").read_text()
  assert (workdir / "decision.json").is_file()
  assert (workdir / "heatmaps" / "brick-wall").is_dir()

  predicted = _predict(workdir, photo_folder / "brick-wall" / "test", tmp_path / "out.csv")
  assert len(predicted) == 6
  assert {r["decision"] for r in predicted} <= {"normal", "anomalous"}
  assert {r["class"] for r in predicted} <= set(rows)


def test_normal_images_only_fit_and_report_what_was_skipped(tmp_path, smoke_settings,
                                                            read_events):
  root = _make_folder(tmp_path / "raw", defects=False)
  workdir = tmp_path / "run"
  # HierCore (a memory bank) keeps this short; the run above trains CCL/RD with a class
  # of normal images only.
  runner.run(_settings(smoke_settings, root, tmp_path / "tfds", **{"model.kind": "hiercore"}),
           str(workdir))
  saved = json.loads((workdir / "metrics.json").read_text())
  metrics = saved["metrics"]
  # brick-wall has no test/ folder; the flat classes have 2 test normals each.
  assert metrics["skipped"]["brick-wall"]["image_auroc"] == "no test images"
  for name in ("Grass.v2", "coffee.beans", "gravel_16"):
    reasons = metrics["skipped"][name]
    assert set(reasons) == {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc",
                            "pixel_ap", "pixel_f1_max", "aupro"}
    assert "2 normal and 0 anomalous" in reasons["image_auroc"]
    assert "anomalous test images with masks" in reasons["aupro"]
  # No NaN in the JSON: undefined values are null.
  assert all(v is None for row in metrics["per_class"].values() for v in row.values())
  assert all(v is None for v in metrics["mean"].values())
  results = (workdir / "results.md").read_text()
  assert "Skipped metrics" in results and "- brick-wall: " in results
  assert "nan" not in results.lower()
  page = (workdir / "report.html").read_text()
  assert 'class="na" title="no test images"' in page and ">nan<" not in page.lower()
  # TensorBoard gets what is defined: false-alarm rates, no image metric.
  tags = read_events(str(workdir / "events")).Tags()["scalars"]
  assert "final_classwise/false_alarm_rate/gravel_16" in tags
  assert not [tag for tag in tags if tag.startswith("final/")]
  # Thresholds come from cross-fitted normal scores, so predict works on this run.
  decision = json.loads((workdir / "decision.json").read_text())
  assert decision["meta"]["num_cross_fitted_images"] > 0
  predicted = _predict(workdir, root / "gravel_16" / "normal", tmp_path / "out.json")
  assert len(predicted) == 10
  assert {r["decision"] for r in predicted} <= {"normal", "anomalous"}


@pytest.mark.parametrize("name", ["bottle", "screw_y", "Grass.v2", "brick-wall", "01"])
def test_class_names_within_the_rule_are_accepted(name):
  assert common.class_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "_hidden", ".v2", "my screws", "a,b", "a/b", "nut_é",
                                  "bolt\n"])
def test_every_open_class_set_refuses_names_outside_the_rule(name):
  assert common.CLASS_NAME_RULE in common.class_name_problem(name)
  for builder in (D.Folder, D.Manta):
    with pytest.raises(D.DatasetError, match="refused") as info:
      builder.config_for(name, SIZE)
    assert repr(name) in str(info.value)


"""Tests of ccl_jax.datasets: synthetic generator, MVTec-layout reading,
TFDS builders (array_record, no TensorFlow) and the load() API."""

import json
import os
import pathlib
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from ccl_jax import datasets as D
from ccl_jax.datasets import builders as B
from ccl_jax.datasets import images
from ccl_jax.datasets import synthetic as syn

TINY = dict(seed=3, image_size=64, num_train=3, num_test_good=2,
            num_test_defect=3)


def _files(root):
  root = pathlib.Path(root)
  return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                if p.is_file())


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory):
  return syn.generate(tmp_path_factory.mktemp("raw") / "tiny", **TINY)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_raw, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  classes = ("tile", "carpet", "capsule")
  ds = D.load("synthetic", classes=classes, manual_dir=tiny_raw,
              data_dir=data_dir, image_size=32, verbose=False)
  return ds, data_dir


# ---------------------------------------------------------------- synthetic


def test_synthetic_layout(tiny_raw):
  assert len(syn.CLASS_NAMES) >= 6
  assert json.loads((tiny_raw / syn.MARKER_NAME).read_text())["seed"] == 3
  for c in syn.CLASS_NAMES:
    assert 2 <= len(syn.DEFECT_TYPES[c]) <= 3
    train = sorted((tiny_raw / c / "train" / "good").iterdir())
    assert [p.name for p in train] == ["000.png", "001.png", "002.png"]
    assert len(list((tiny_raw / c / "test" / "good").iterdir())) == 2
    defects = [p for p in (tiny_raw / c / "test").iterdir()
               if p.name != "good"]
    # 3 defect images spread over the class's defect types
    assert sum(len(list(d.iterdir())) for d in defects) == 3
    assert len(defects) == min(3, len(syn.DEFECT_TYPES[c]))
    with Image.open(train[0]) as im:
      assert im.mode == "RGB" and im.size == (64, 64)


def test_synthetic_deterministic(tiny_raw, tmp_path):
  other = syn.generate(tmp_path / "again", **TINY)
  files = _files(tiny_raw)
  assert files == _files(other)
  for f in files:
    assert (tiny_raw / f).read_bytes() == (other / f).read_bytes(), f
  # a different seed changes the pixels
  img, *_ = syn.render("wood", "train", 0, seed=4, image_size=64)
  assert not np.array_equal(
      img, np.asarray(Image.open(tiny_raw / "wood/train/good/000.png")))


def test_synthetic_masks_exact(tiny_raw):
  for c in syn.CLASS_NAMES:
    counters = {}
    for i in range(TINY["num_test_defect"]):
      img, mask, clean, dtype = syn.render(
          c, "test_defect", i, seed=3, image_size=64)
      j = counters.setdefault(dtype, 0)
      counters[dtype] += 1
      stem = f"{j:03d}"
      on_disk = np.asarray(Image.open(tiny_raw / c / "test" / dtype /
                                      f"{stem}.png"))
      m = np.asarray(Image.open(tiny_raw / c / "ground_truth" / dtype /
                                f"{stem}_mask.png"))
      np.testing.assert_array_equal(on_disk, img)
      assert m.ndim == 2 and set(np.unique(m)) == {0, 255}
      # exact: the mask is the set of pixels the defect changed
      changed = (img != clean).any(-1)
      np.testing.assert_array_equal(m > 0, changed)
      np.testing.assert_array_equal(mask, changed)
      diff = np.abs(img.astype(int) - clean).max(-1)[mask]
      assert diff.min() >= syn.MIN_CONTRAST, (c, dtype)
      assert diff.mean() >= 25, (c, dtype, diff.mean())  # visible
    for i in range(TINY["num_test_good"]):
      img, mask, clean, dtype = syn.render(c, "test_good", i, seed=3,
                                           image_size=64)
      assert dtype == "good" and not mask.any()
      np.testing.assert_array_equal(img, clean)


def test_synthetic_classes_distinct():
  """Colour histograms alone separate the classes (nearest centroid)."""
  feats, labels = [], []
  for k, c in enumerate(syn.CLASS_NAMES):
    for i in range(5):
      img, *_ = syn.render(c, "train", i, seed=0, image_size=64)
      h = [np.histogram(img[..., ch], 8, (0, 256))[0] for ch in range(3)]
      feats.append(np.concatenate(h) / img[..., 0].size)
      labels.append(k)
  feats, labels = np.stack(feats), np.array(labels)
  for i in range(len(feats)):  # leave-one-out nearest centroid
    keep = np.arange(len(feats)) != i
    cents = np.stack([feats[keep & (labels == k)].mean(0)
                      for k in range(len(syn.CLASS_NAMES))])
    assert np.argmin(((cents - feats[i]) ** 2).sum(1)) == labels[i]
  # normal variation: two train images of a class are not identical
  a, *_ = syn.render("chip", "train", 0, image_size=64)
  b, *_ = syn.render("chip", "train", 1, image_size=64)
  assert np.abs(a.astype(int) - b).mean() > 2


def test_generate_reuse_and_conflicts(tiny_raw, tmp_path):
  marker = tiny_raw / syn.MARKER_NAME
  before = marker.stat().st_mtime_ns
  t0 = time.time()
  assert syn.generate(tiny_raw, **TINY) == tiny_raw
  assert time.time() - t0 < 0.5 and marker.stat().st_mtime_ns == before
  with pytest.raises(syn.SyntheticDatasetError) as e:
    syn.generate(tiny_raw, **{**TINY, "num_train": 4})
  msg = str(e.value)
  assert str(tiny_raw) in msg and '"num_train": 3' in msg
  assert '"num_train": 4' in msg
  # a folder that is not a complete dataset is never reused
  junk = tmp_path / "junk"
  (junk / "carpet").mkdir(parents=True)
  with pytest.raises(syn.SyntheticDatasetError, match="no .* marker"):
    syn.generate(junk, **TINY)
  # a stale partial directory of a dead process is replaced
  stale = tmp_path / ".fresh.partial-999999999"
  (stale / "garbage").mkdir(parents=True)
  out = syn.generate(tmp_path / "fresh", **{**TINY, "num_test_defect": 1})
  assert not stale.exists() and (out / syn.MARKER_NAME).is_file()
  assert not list(tmp_path.glob(".fresh.partial-*"))


# ------------------------------------------------------------ load/synthetic


def test_load_synthetic_fields(tiny_loaded):
  ds, _ = tiny_loaded
  assert ds.class_names == ("tile", "carpet", "capsule")
  assert len(ds.train) == 3 * 3 and len(ds.test) == 3 * 5
  np.testing.assert_array_equal(ds.train_class_ids, np.repeat([0, 1, 2], 3))
  np.testing.assert_array_equal(ds.test_class_ids, np.repeat([0, 1, 2], 5))
  assert ds.train_class_ids.dtype == np.int32
  for split, ids in ((ds.train, ds.train_class_ids),
                     (ds.test, ds.test_class_ids)):
    labels = []
    for i in range(len(split)):
      r = split[i]
      assert set(r) == {"image", "mask", "class_id", "class_name",
                        "label", "defect_type", "file_name"}
      assert r["image"].dtype == np.uint8
      assert r["image"].shape == (32, 32, 3)
      assert r["mask"].dtype == np.uint8 and r["mask"].shape == (32, 32)
      assert set(np.unique(r["mask"])) <= {0, 1}
      assert isinstance(r["class_id"], np.int32)
      assert isinstance(r["label"], np.int32)
      assert r["class_id"] == ids[i]
      assert ds.class_names[r["class_id"]] == r["class_name"]
      for k in ("class_name", "defect_type", "file_name"):
        assert isinstance(r[k], str)
      assert r["file_name"].startswith(r["class_name"] + "/")
      assert (r["label"] == 1) == (r["defect_type"] != "good")
      assert (r["label"] == 1) == bool(r["mask"].any())
      labels.append(int(r["label"]))
    if split is ds.test:
      assert labels == [0, 0, 1, 1, 1] * 3
  # deterministic documented order: test/good first, then sorted defects
  names = [ds.test[i]["file_name"] for i in range(5)]
  assert names[:2] == ["tile/test/good/000.png", "tile/test/good/001.png"]
  assert names[2:] == sorted(names[2:])


def test_record_source_indexing_and_pickle(tiny_loaded):
  ds, _ = tiny_loaded
  n = len(ds.test)
  assert ds.test[-1]["file_name"] == ds.test[n - 1]["file_name"]
  assert ds.test[np.int64(2)]["file_name"] == ds.test[2]["file_name"]
  for bad in (n, -n - 1):
    with pytest.raises(IndexError):
      ds.test[bad]
  with pytest.raises(TypeError):
    ds.test[1.5]
  copy = pickle.loads(pickle.dumps(ds.test))
  assert len(copy) == n
  a, b = copy[7], ds.test[7]
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["class_id"] == b["class_id"] and a["file_name"] == b["file_name"]
  assert list(iter_slice(ds.train, 2)) == [0, 0]


def iter_slice(source, k):
  return (int(source[i]["class_id"]) for i in range(k))


def test_reload_does_not_rebuild(prepared_dirs, tiny_loaded, tiny_raw):
  ds, data_dir = tiny_loaded
  stamps = {p: p.stat().st_mtime_ns
            for p in pathlib.Path(data_dir).rglob("*") if p.is_file()}
  assert len(prepared_dirs(data_dir)) == 3
  again = D.load("synthetic", classes=["carpet", "tile"],
                 manual_dir=tiny_raw, data_dir=data_dir, image_size=32,
                 verbose=False)
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  assert again.class_names == ("carpet", "tile")
  np.testing.assert_array_equal(again.train_class_ids,
                                np.repeat([0, 1], 3))
  r = again.train[0]
  assert r["class_name"] == "carpet" and r["class_id"] == 0
  np.testing.assert_array_equal(r["image"], ds.train[3]["image"])


def test_prepared_from_other_source_is_refused(tiny_loaded, tmp_path):
  _, data_dir = tiny_loaded
  other = syn.generate(tmp_path / "other", **{**TINY, "num_train": 4})
  with pytest.raises(D.DatasetError, match="prepared from different files"):
    D.load("synthetic", classes=["tile"], manual_dir=other,
           data_dir=data_dir, image_size=32, verbose=False)


def test_load_synthetic_default_generation(tmp_path, capsys):
  ds = D.load("synthetic", classes=["washer", "grid"], data_dir=tmp_path,
              image_size=64)
  raw = tmp_path / "synthetic_raw"
  assert json.loads((raw / syn.MARKER_NAME).read_text())["num_train"] == 40
  assert len(ds.train) == 80 and len(ds.test) == 44
  assert "preparing synthetic/washer_64 (1/2)" in capsys.readouterr().out
  r = ds.test[len(ds.test) - 1]
  assert r["image"].shape == (64, 64, 3) and r["class_id"] == 1
  assert r["class_name"] == "grid" and r["label"] == 1


def test_class_selection_errors(prepared_dirs, tmp_path, tiny_raw):
  with pytest.raises(D.DatasetError, match="known classes: .*bottle.*zipper"):
    D.load("mvtec_ad", classes=["bottle", "bottel"], manual_dir=tiny_raw,
           data_dir=tmp_path, image_size=32)
  with pytest.raises(D.DatasetError, match="more than once: 'carpet'"):
    D.load("synthetic", classes=["carpet", "wood", "carpet"],
           manual_dir=tiny_raw, data_dir=tmp_path, image_size=32)
  with pytest.raises(D.DatasetError, match="known datasets: mvtec_ad"):
    D.load("mvtec", data_dir=tmp_path, image_size=32)
  with pytest.raises(ValueError, match="image_size"):
    D.load("synthetic", manual_dir=tiny_raw, data_dir=tmp_path,
           image_size=0)
  assert not prepared_dirs(tmp_path)


# ------------------------------------------------------------------ mvtec_ad

@pytest.fixture()
def mvtec_root(make_mvtec_tree, tmp_path):
  return make_mvtec_tree(tmp_path / "mvtec_anomaly_detection")


def test_load_mvtec_ad(mvtec_root, tmp_path):
  data_dir = tmp_path / "tfds"
  ds = D.load("mvtec_ad", classes=["grid", "bottle"], manual_dir=mvtec_root,
              data_dir=data_dir, image_size=32, verbose=False)
  assert ds.class_names == ("grid", "bottle")
  assert len(ds.train) == 6 and len(ds.test) == 4 + 5
  np.testing.assert_array_equal(ds.test_class_ids, [0] * 4 + [1] * 5)
  records = [ds.test[i] for i in range(len(ds.test))]
  assert [r["file_name"] for r in records] == [
      "grid/test/good/000.png", "grid/test/good/001.png",
      "grid/test/bent/000.png", "grid/test/bent/001.png",
      "bottle/test/good/000.png", "bottle/test/good/001.png",
      "bottle/test/broken_large/000.png", "bottle/test/broken_large/001.png",
      "bottle/test/contamination/000.png"]
  for r in records:
    assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
    assert r["mask"].shape == (32, 32)
    assert (r["label"] == 1) == bool(r["mask"].any())
  grid_img = records[0]["image"]  # grey input expanded to RGB
  np.testing.assert_array_equal(grid_img[..., 0], grid_img[..., 2])
  # resized once: bilinear (antialiased) image, nearest binary mask
  src = Image.open(mvtec_root / "bottle/test/broken_large/000.png")
  want = np.asarray(src.resize((32, 32), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(records[6]["image"], want)
  m = np.asarray(Image.open(
      mvtec_root / "bottle/ground_truth/broken_large/000_mask.png"))
  want_m = np.asarray(Image.fromarray(m).resize(
      (32, 32), Image.Resampling.NEAREST)) > 0
  np.testing.assert_array_equal(records[6]["mask"], want_m)
  assert records[6]["defect_type"] == "broken_large"
  # the builder's own class id (index in the 15 MVTec classes) is stored
  b = B.MvtecAd(config=B.MvtecAd.config_for("grid", 32),
                data_dir=str(data_dir))
  raw = b.as_data_source()["train"][0]
  assert raw["class_id"] == B.MVTEC_AD_CLASSES.index("grid")
  assert raw["mask"].shape == (32, 32, 1)
  assert b.info.features["label"].names == ["good", "anomalous"]
  # original resolution
  full = D.load("mvtec_ad", classes=["bottle"], manual_dir=mvtec_root,
                data_dir=data_dir, image_size=None, verbose=False)
  r = full.test[2]
  assert r["image"].shape == (48, 48, 3) and r["mask"].shape == (48, 48)
  np.testing.assert_array_equal(r["image"], np.asarray(src))
  np.testing.assert_array_equal(r["mask"], m > 0)


def test_mvtec_manual_dir_errors(prepared_dirs, tmp_path):
  data_dir = tmp_path / "tfds"
  with pytest.raises(D.DatasetError) as e:
    D.load("mvtec_ad", classes=["bottle"], data_dir=data_dir,
           image_size=32)
  assert "no manual_dir" in str(e.value)
  assert "https://www.mvtec.com/company/research/datasets/mvtec-ad" in str(
      e.value)
  missing = tmp_path / "nowhere"
  with pytest.raises(D.DatasetError, match=f"{missing} does not exist"):
    D.load("mvtec_ad", classes=["bottle"], manual_dir=missing,
           data_dir=data_dir, image_size=32)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(D.DatasetError, match=f"{empty} is empty") as e:
    D.load("mvtec_ad", manual_dir=empty, data_dir=data_dir, image_size=32)
  assert "train/good" in str(e.value)  # says which layout is expected
  assert not prepared_dirs(tmp_path)


def test_mvtec_bad_input_reports_all_problems(prepared_dirs, incomplete_dirs, mvtec_root, tmp_path):
  data_dir = tmp_path / "tfds"
  # a good class prepared earlier must survive later failures
  D.load("mvtec_ad", classes=["bottle"], manual_dir=mvtec_root,
         data_dir=data_dir, image_size=32, verbose=False)
  prepared = prepared_dirs(data_dir)
  stamps = {p: p.stat().st_mtime_ns
            for p in data_dir.rglob("*") if p.is_file()}

  bottle, grid = mvtec_root / "bottle", mvtec_root / "grid"
  truncated = bottle / "train/good/001.png"
  truncated.write_bytes(truncated.read_bytes()[:300])
  no_mask = bottle / "test/contamination/000.png"
  (bottle / "ground_truth/contamination/000_mask.png").unlink()
  wrong_mask = bottle / "ground_truth/broken_large/001_mask.png"
  Image.fromarray(np.zeros((40, 48), np.uint8)).save(wrong_mask)
  for p in (grid / "train/good").iterdir():
    p.unlink()
  with pytest.raises(D.DatasetError) as e:
    # bottle_64 and grid_64 need preparing; cable is missing altogether
    D.load("mvtec_ad", classes=["bottle", "grid", "cable"],
           manual_dir=mvtec_root, data_dir=data_dir, image_size=64)
  err = e.value
  assert isinstance(err, ValueError)
  msg = str(err)
  for path in (truncated, no_mask, wrong_mask, grid / "train/good",
               mvtec_root / "cable"):
    assert str(path) in msg, path
  assert "truncated" in msg and "has no mask" in msg
  assert "48x40 differs from image size 48x48" in msg
  assert "no training images" in msg and "'cable' is missing" in msg
  assert len(err.problems) == 5
  # nothing new looks prepared, nothing half-written, bottle_32 untouched
  assert prepared_dirs(data_dir) == prepared
  assert not incomplete_dirs(data_dir)
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  ok = D.load("mvtec_ad", classes=["bottle"], manual_dir=mvtec_root,
              data_dir=data_dir, image_size=32, verbose=False)
  assert len(ok.train) == 3 and ok.train[1]["image"].shape == (32, 32, 3)


def test_builder_validates_class_itself(assert_nothing_prepared, mvtec_root, tmp_path):
  """The builder used directly (no load()) also validates first."""
  import tensorflow_datasets as tfds
  (mvtec_root / "grid/ground_truth/bent/001_mask.png").unlink()
  b = B.MvtecAd(config=B.MvtecAd.config_for("grid", 32),
                data_dir=str(tmp_path / "tfds"))
  with pytest.raises(D.DatasetError, match="bent/001.png: defective"):
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(mvtec_root)))
  assert_nothing_prepared(tmp_path / "tfds")


def test_failure_while_writing_leaves_nothing(prepared_dirs, incomplete_dirs, mvtec_root, tmp_path,
                                              monkeypatch):
  data_dir = tmp_path / "tfds"
  D.load("mvtec_ad", classes=["grid"], manual_dir=mvtec_root,
         data_dir=data_dir, image_size=32, verbose=False)
  prepared = prepared_dirs(data_dir)
  calls = []
  real = B.encode_sample

  def flaky(sample, *args):
    calls.append(sample)
    if len(calls) == 4:
      raise OSError("disk went away")
    return real(sample, *args)

  monkeypatch.setattr(B, "encode_sample", flaky)
  with pytest.raises(OSError, match="disk went away"):
    D.load("mvtec_ad", classes=["grid", "bottle"], manual_dir=mvtec_root,
           data_dir=data_dir, image_size=32, verbose=False)
  assert calls  # TFDS had started writing bottle_32
  assert prepared_dirs(data_dir) == prepared
  assert not incomplete_dirs(data_dir)
  monkeypatch.setattr(B, "encode_sample", real)
  ds = D.load("mvtec_ad", classes=["grid", "bottle"], manual_dir=mvtec_root,
              data_dir=data_dir, image_size=32, verbose=False)
  assert len(ds.train) == 6


def test_config_for_and_names():
  cfg = B.MvtecAd.config_for("bottle", 256)
  assert cfg.name == "bottle_256" and cfg in B.MvtecAd.BUILDER_CONFIGS
  assert B.MvtecAd.config_for("bottle", None).name == "bottle_orig"
  dyn = B.Synthetic.config_for("wood", 96)
  assert (dyn.name, dyn.class_name, dyn.image_size) == ("wood_96", "wood",
                                                        96)
  assert pickle.loads(pickle.dumps(cfg)) is cfg
  assert pickle.loads(pickle.dumps(dyn)).name == "wood_96"
  with pytest.raises(D.DatasetError, match="known classes"):
    B.MvtecAd.config_for("wood_grain", 256)
  assert os.fspath(B.MvtecAd.code_path).endswith("builders.py")


def test_one_registry_names_each_builder_as_its_dataset():
  assert {name: builder.name for name, builder in D.BUILDERS.items()} == {
      name: name for name in D.BUILDERS}
  assert D.BUILDERS["synthetic"] is B.Synthetic
  predefined = B.Synthetic.config_for("wood", 128)
  assert predefined in B.Synthetic.BUILDER_CONFIGS
  assert pickle.loads(pickle.dumps(predefined)) is predefined


def test_read_resized_gives_the_prepared_test_images_bit_for_bit(tiny_raw, tiny_loaded):
  ds, _ = tiny_loaded
  for i in range(len(ds.test)):
    record = ds.test[i]
    got = images.read_resized(pathlib.Path(tiny_raw) / record["file_name"], 32)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, record["image"], err_msg=record["file_name"])

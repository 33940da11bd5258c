"""Tests of the VisA, BTAD, Real-IAD and MANTA readers and builders.

Every dataset is built from a small generated tree in its published layout
(file names, extensions, split-file schemas, mask conventions)."""

import csv
import json
import pathlib
import pickle
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ccl_jax import datasets as D
from ccl_jax.datasets import builders as B
from ccl_jax.datasets import layouts as L

RNG = np.random.default_rng(0)


def _save(path, array, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)
  return path


def _rand(h, w, c=3):
  shape = (h, w, c) if c else (h, w)
  return RNG.integers(0, 256, shape, dtype=np.uint8)


def _all(source):
  return [source[i] for i in range(len(source))]


def _check_records(ds):
  for split, ids in ((ds.train, ds.train_class_ids),
                     (ds.test, ds.test_class_ids)):
    for i, r in enumerate(_all(split)):
      assert r["class_id"] == ids[i]
      assert ds.class_names[r["class_id"]] == r["class_name"]
      assert set(np.unique(r["mask"])) <= {0, 1}
      assert (r["label"] == 1) == (r["defect_type"] != "good")
      if split is ds.train:
        assert r["label"] == 0


# --------------------------------------------------------------------- VisA

VISA_H, VISA_W = 30, 40  # VisA images are not square


def make_visa_tree(root, classes=("candle", "pcb1")):
  """VisA_20220922 layout: <cls>/Data/Images/{Normal,Anomaly}/NNN.JPG,
  <cls>/Data/Masks/Anomaly/NNN.png (label values 1, 2), split_csv."""
  rows = []
  for c in classes:
    base = root / c / "Data"
    for i in range(5):  # 3 train + 2 test normal
      rel = f"{c}/Data/Images/Normal/{i:04d}.JPG"
      _save(root / rel, _rand(VISA_H, VISA_W), "JPEG")
      rows.append([c, "train" if i < 3 else "test", "normal", rel, ""])
    for i in range(2):
      rel = f"{c}/Data/Images/Anomaly/{i:03d}.JPG"
      _save(root / rel, _rand(VISA_H, VISA_W), "JPEG")
      m = np.zeros((VISA_H, VISA_W), np.uint8)
      m[5:15, 8:20] = 1
      m[18:25, 22:30] = 2  # a second defect region, other label
      mrel = f"{c}/Data/Masks/Anomaly/{i:03d}.png"
      _save(root / mrel, m)
      rows.append([c, "test", "anomaly", rel, mrel])
    assert base.is_dir()
  (root / "split_csv").mkdir(parents=True, exist_ok=True)
  with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["object", "split", "label", "image", "mask"])
    w.writerows(rows)
  return root


def test_visa(tmp_path):
  root = make_visa_tree(tmp_path / "VisA")
  ds = D.load("visa", classes=["pcb1", "candle"], manual_dir=root,
              data_dir=tmp_path / "tfds", image_size=16, verbose=False)
  assert ds.class_names == ("pcb1", "candle")
  assert len(ds.train) == 6 and len(ds.test) == 8
  np.testing.assert_array_equal(ds.test_class_ids, [0] * 4 + [1] * 4)
  _check_records(ds)
  test = _all(ds.test)
  assert [r["label"] for r in test[:4]] == [0, 0, 1, 1]
  assert [r["defect_type"] for r in test[:4]] == ["good", "good",
                                                  "anomaly", "anomaly"]
  assert test[2]["file_name"] == "pcb1/Data/Images/Anomaly/000.JPG"
  assert test[0]["file_name"] == "pcb1/Data/Images/Normal/0003.JPG"
  r = test[6]
  assert r["image"].shape == (16, 16, 3) and r["mask"].shape == (16, 16)
  # both label values (1 and 2) are anomalous: binarised with != 0
  m = np.asarray(Image.open(root / "candle/Data/Masks/Anomaly/000.png"))
  assert set(np.unique(m)) == {0, 1, 2}
  want = np.asarray(Image.fromarray(m).resize(
      (16, 16), Image.Resampling.NEAREST)) != 0
  np.testing.assert_array_equal(r["mask"], want)
  # builder-local class id = index among the 12 VisA classes
  b = B.Visa(config=B.Visa.config_for("pcb1", 16),
             data_dir=str(tmp_path / "tfds"))
  assert b.as_data_source()["test"][0]["class_id"] == 7
  assert len(B.Visa.CLASS_NAMES) == 12
  assert "VisA_20220922.tar" in B.Visa.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_visa_bad_input(assert_nothing_prepared, tmp_path):
  root = make_visa_tree(tmp_path / "VisA")
  data_dir = tmp_path / "tfds"
  missing = root / "candle/Data/Images/Normal/0001.JPG"
  missing.unlink()
  wrong = _save(root / "pcb1/Data/Masks/Anomaly/001.png",
                np.zeros((VISA_H, VISA_W + 2), np.uint8))
  corrupt = root / "pcb1/Data/Images/Normal/0000.JPG"
  corrupt.write_bytes(b"not a jpeg at all")
  with pytest.raises(D.DatasetError) as e:
    D.load("visa", classes=["candle", "pcb1"], manual_dir=root,
           data_dir=data_dir, image_size=16)
  msg = str(e.value)
  for path in (missing, wrong, corrupt):
    assert str(path) in msg, path
  assert "1cls.csv:3" in msg and "is missing" in msg
  assert "42x30 differs from image size 40x30" in msg
  assert "unreadable" in msg and len(e.value.problems) == 3
  assert_nothing_prepared(data_dir)
  # the split file itself missing; unknown class name
  (root / "split_csv/1cls.csv").unlink()
  with pytest.raises(D.DatasetError, match="split_csv/1cls.csv") as e:
    D.load("visa", classes=["candle"], manual_dir=root,
           data_dir=data_dir, image_size=16)
  assert "split file is missing" in str(e.value)
  with pytest.raises(D.DatasetError, match="'candel'.*known classes: "
                     "candle, capsules"):
    D.load("visa", classes=["candel"], manual_dir=root,
           data_dir=data_dir, image_size=16)
  assert_nothing_prepared(data_dir)


# --------------------------------------------------------------------- BTAD

BTAD_EXT = {"01": ("bmp", "png"), "02": ("png", "png"), "03": ("bmp", "bmp")}


def make_btad_tree(root):
  """BTAD: NN/train/ok, NN/test/{ok,ko}, NN/ground_truth/ko (same stem)."""
  for c, (iext, mext) in BTAD_EXT.items():
    fmt = {"bmp": "BMP", "png": "PNG"}
    for i in range(2):
      _save(root / c / "train/ok" / f"{i:04d}.{iext}", _rand(24, 32),
            fmt[iext])
    _save(root / c / "test/ok" / f"{0:04d}.{iext}", _rand(24, 32),
          fmt[iext])
    for i in range(2):
      _save(root / c / "test/ko" / f"{i:04d}.{iext}", _rand(24, 32),
            fmt[iext])
      m = np.zeros((24, 32, 3) if mext == "bmp" else (24, 32), np.uint8)
      m[4:12, 6 + i:20] = 255
      _save(root / c / "ground_truth/ko" / f"{i:04d}.{mext}", m,
            fmt[mext])
  return root


def test_btad(tmp_path):
  root = make_btad_tree(tmp_path / "BTech_Dataset_transformed")
  # all three classes: the (tiny) totals are checked against BTAD's
  with pytest.warns(UserWarning) as record:
    ds = D.load("btad", manual_dir=root, data_dir=tmp_path / "tfds",
                image_size=None, verbose=False)
  messages = sorted(str(w.message) for w in record)
  assert len(messages) == 2
  assert messages[0].startswith("BTAD: test split has 9 images, expected "
                                "741")
  assert messages[1].startswith("BTAD: train split has 6 images, "
                                "expected 1799")
  assert ds.class_names == ("01", "02", "03")
  assert len(ds.train) == 6 and len(ds.test) == 9
  _check_records(ds)
  test = _all(ds.test)
  assert [r["label"] for r in test] == [0, 1, 1] * 3
  assert [r["defect_type"] for r in test[:3]] == ["good", "ko", "ko"]
  assert test[1]["file_name"] == "01/test/ko/0000.bmp"
  assert test[8]["file_name"] == "03/test/ko/0001.bmp"
  for k, c in enumerate(ds.class_names):
    r = test[3 * k + 2]
    iext, mext = BTAD_EXT[c]
    np.testing.assert_array_equal(r["image"], np.asarray(
        Image.open(root / c / f"test/ko/0001.{iext}")))
    m = np.asarray(Image.open(root / c / f"ground_truth/ko/0001.{mext}"))
    want = m.any(-1) if m.ndim == 3 else m > 0
    np.testing.assert_array_equal(r["mask"], want)


def test_btad_bad_input(assert_nothing_prepared, tmp_path):
  root = make_btad_tree(tmp_path / "btad")
  data_dir = tmp_path / "tfds"
  no_mask = root / "02/test/ko/0001.png"
  (root / "02/ground_truth/ko/0001.png").unlink()
  truncated = root / "03/train/ok/0000.bmp"
  truncated.write_bytes(truncated.read_bytes()[:200])
  with pytest.raises(D.DatasetError) as e:
    D.load("btad", classes=["02", "03", "04"], manual_dir=root,
           data_dir=data_dir, image_size=16)
  assert "'04'" in str(e.value) and "known classes: 01, 02, 03" in str(
      e.value)
  with pytest.raises(D.DatasetError) as e:
    D.load("btad", classes=["02", "03"], manual_dir=root,
           data_dir=data_dir, image_size=16)
  msg = str(e.value)
  assert str(no_mask) in msg and str(truncated) in msg
  assert "ground_truth/ko/0001.png" in msg and "truncated" in msg
  assert len(e.value.problems) == 2 and "train/ok" in msg
  assert_nothing_prepared(data_dir)


# ----------------------------------------------------------------- Real-IAD


def _realiad_object(res_dir, cls, rel_dir, obj, tag, defect=None):
  """Five views of one object; returns JSON entries."""
  entries = []
  for v in range(1, 6):
    name = (f"{cls}_{obj:04d}_{tag}_C{v}_2023092215154{v}"
            if defect is None else
            f"{cls}_{obj:04d}_{tag}_{defect}_C{v}_2023092215154{v}")
    img = f"{rel_dir}/{name}.jpg"
    _save(res_dir / cls / img, _rand(20, 20), "JPEG")
    mask = None
    if defect is not None and v != 4:  # view 4: listed without mask
      m = np.zeros((20, 20), np.uint8)
      m[2:9, 3:3 + 2 * v] = 255
      mask = f"{rel_dir}/{name}.png"
      _save(res_dir / cls / mask, m)
    entries.append({"category": cls,
                    "anomaly_class": defect or "OK",
                    "image_path": img, "mask_path": mask})
  return entries


def make_real_iad_tree(root, classes=("audiojack", "pcb"),
                       resolutions=("256",)):
  for cls in classes:
    for res in resolutions:
      d = root / f"realiad_{res}"
      train = (_realiad_object(d, cls, "OK/S0001", 1, "OK")
               + _realiad_object(d, cls, "OK/S0002", 2, "OK"))
      test = (_realiad_object(d, cls, "NG/AK/S0003", 3, "NG", "AK")
              + _realiad_object(d, cls, "OK/S0004", 4, "OK"))
    jdir = root / "realiad_jsons"
    jdir.mkdir(parents=True, exist_ok=True)
    (jdir / f"{cls}.json").write_text(json.dumps({
        "meta": {"prefix": cls, "normal_class": "OK"},
        "train": train, "test": test}))
  return root


def test_real_iad_views_and_resolution(prepared_dirs, tmp_path):
  root = make_real_iad_tree(tmp_path / "Real-IAD", resolutions=("256",
                                                                "512"))
  data_dir = tmp_path / "tfds"
  ds = D.load("real_iad", classes=["pcb", "audiojack"], manual_dir=root,
              data_dir=data_dir, image_size=16, verbose=False)
  assert len(ds.train) == 20 and len(ds.test) == 20
  _check_records(ds)
  test = _all(ds.test)[:10]
  assert [r["label"] for r in test] == [0] * 5 + [1] * 5
  assert {r["defect_type"] for r in test[5:]} == {"AK"}
  assert test[5]["file_name"] == ("realiad_256/pcb/NG/AK/S0003/"
                                  "pcb_0003_NG_AK_C1_20230922151541.jpg")
  # multi-view samples stay traceable: object folder + view
  assert [L.realiad_view(r["file_name"]) for r in test[5:]] == [
      ("NG/AK/S0003", f"C{v}") for v in range(1, 6)]
  assert D.realiad_view(test[0]["file_name"]) == ("OK/S0004", "C1")
  assert not test[8]["mask"].any()  # C4 listed without mask: empty mask
  assert test[9]["mask"].any()
  # single view: C1 only, other resolution folder; configs are distinct
  sv = D.load("real_iad", classes=["pcb"], manual_dir=root,
              data_dir=data_dir, image_size=16, verbose=False,
              views="C1", resolution="512")
  assert len(sv.train) == 2 and len(sv.test) == 2
  names = [r["file_name"] for r in _all(sv.train) + _all(sv.test)]
  assert all("_C1_" in n and n.startswith("realiad_512/pcb/")
             for n in names)
  assert [r["label"] for r in _all(sv.test)] == [0, 1]
  assert len(prepared_dirs(data_dir)) == 3
  assert any("pcb_16_resolution512_viewsC1" in p
             for p in prepared_dirs(data_dir))
  cfg = B.RealIad.config_for("pcb", 16, views="C1", resolution=512)
  assert cfg.name == "pcb_16_resolution512_viewsC1"
  assert pickle.loads(pickle.dumps(cfg)).option_values == {
      "resolution": "512", "views": "C1"}
  assert B.RealIad.config_for("pcb", 256, views="all").name == "pcb_256"
  with pytest.raises(D.DatasetError, match="'C9' not one of"):
    D.load("real_iad", classes=["pcb"], manual_dir=root,
           data_dir=data_dir, image_size=16, views="C9")
  with pytest.raises(D.DatasetError, match="unknown option"):
    D.load("btad", manual_dir=root, data_dir=data_dir, image_size=16,
           views="C1")
  assert len(B.RealIad.CLASS_NAMES) == 30


def test_real_iad_bad_input(assert_nothing_prepared, tmp_path):
  root = make_real_iad_tree(tmp_path / "Real-IAD")
  data_dir = tmp_path / "tfds"
  missing = next((root / "realiad_256/pcb/OK/S0001").glob("*_C2_*.jpg"))
  missing.unlink()
  mask = next((root / "realiad_256/pcb/NG/AK/S0003").glob("*_C1_*.png"))
  _save(mask, np.zeros((21, 20), np.uint8))
  (root / "realiad_jsons/audiojack.json").unlink()
  with pytest.raises(D.DatasetError) as e:
    D.load("real_iad", classes=["pcb", "audiojack"], manual_dir=root,
           data_dir=data_dir, image_size=16)
  msg = str(e.value)
  assert str(missing) in msg and "[train][1]" in msg
  assert str(mask) in msg and "20x21 differs" in msg
  assert "realiad_jsons/audiojack.json" in msg
  assert len(e.value.problems) == 3
  # a resolution folder that is not there: one problem, not one per image
  with pytest.raises(D.DatasetError) as e:
    D.load("real_iad", classes=["pcb"], manual_dir=root,
           data_dir=data_dir, image_size=16, resolution="1024")
  assert len(e.value.problems) == 1
  assert "realiad_1024/pcb/" in str(e.value)
  assert_nothing_prepared(data_dir)


# -------------------------------------------------------------------- MANTA

MW, MH = 8, 6  # one view


def _manta_image(i):
  """Five views side by side; view k is filled with a distinct value."""
  img = np.zeros((MH, 5 * MW, 3), np.uint8)
  for k in range(5):
    img[:, k * MW:(k + 1) * MW] = 40 * k + i
  return img


def make_manta_tree(root, domain="medicine", cls="pill_x",
                    defect_views=((1, 3), (4,))):
  cdir = root / domain / cls
  for i in range(2):
    _save(cdir / "train/good" / f"{i:03d}.png", _manta_image(i))
  _save(cdir / "test-pixel/good" / "000.png", _manta_image(5))
  for i, views in enumerate(defect_views):
    _save(cdir / "test-pixel/crack" / f"{i:03d}.png", _manta_image(9 + i))
    m = np.zeros((MH, 5 * MW), np.uint8)
    for k in views:
      m[1:4, k * MW + 2:k * MW + 5] = 255
    _save(cdir / "test-pixel/mask" / f"mask_{i:03d}.png", m)
  return root


def test_manta_views(tmp_path):
  root = make_manta_tree(tmp_path / "MANTA")
  make_manta_tree(root, domain="grain", cls="rice",
                  defect_views=((0,), (2,)))
  ds = D.load("manta", manual_dir=root, data_dir=tmp_path / "tfds",
              image_size=None, verbose=False)
  assert ds.class_names == ("pill_x", "rice")  # found in domain folders
  assert len(ds.train) == 2 * 10 and len(ds.test) == 2 * 15
  _check_records(ds)
  test = _all(ds.test)[:15]
  for j, r in enumerate(_all(ds.train)[:10] + test):
    assert r["image"].shape == (MH, MW, 3)
    assert r["file_name"].endswith(f"#view{j % 5 + 1}")
    assert (r["image"] - r["image"][0, 0] == 0).all()
    assert r["image"][0, 0, 0] // 40 == j % 5  # the k-th strip
  assert test[5]["file_name"] == ("medicine/pill_x/test-pixel/crack/000.png"
                                  "#view1")
  # label per view: anomalous only where the mask strip shows the defect
  assert [r["label"] for r in test] == [0] * 5 + [0, 1, 0, 1, 0] + [
      0, 0, 0, 0, 1]
  assert test[6]["defect_type"] == "crack" and test[5]["defect_type"] == (
      "good")
  assert test[6]["mask"].sum() == 9 and test[6]["mask"][1, 2] == 1
  # builder-local id is 0 (open class set); load() gives global ids
  np.testing.assert_array_equal(ds.test_class_ids, [0] * 15 + [1] * 15)
  sized = D.load("manta", classes=["rice"], manual_dir=root,
                 data_dir=tmp_path / "tfds", image_size=16, verbose=False)
  assert sized.test[14]["image"].shape == (16, 16, 3)
  assert sized.test[14]["mask"].shape == (16, 16)


def test_manta_bad_input(assert_nothing_prepared, tmp_path):
  root = make_manta_tree(tmp_path / "MANTA")
  data_dir = tmp_path / "tfds"
  with pytest.raises(D.DatasetError) as e:
    D.load("manta", classes=["pill_x", "nope"], manual_dir=root,
           data_dir=data_dir, image_size=16)
  assert "'nope'" in str(e.value) and "known classes: pill_x" in str(
      e.value)
  extra = root / "medicine/pill_x/test-pixel/crack/002.png"
  _save(extra, _manta_image(3))
  corrupt = root / "medicine/pill_x/train/good/001.png"
  corrupt.write_bytes(b"\x89PNG broken")
  with pytest.raises(D.DatasetError) as e:
    D.load("manta", classes=["pill_x"], manual_dir=root,
           data_dir=data_dir, image_size=16)
  msg = str(e.value)
  assert "2 mask(s) for 3 anomalous image(s)" in msg
  assert str(root / "medicine/pill_x/test-pixel/mask") in msg
  assert str(corrupt) in msg and "unreadable" in msg
  assert "5 views side by side" in msg  # the layout is explained
  assert len(e.value.problems) == 2
  with pytest.raises(D.DatasetError, match="needs a manual_dir"):
    D.load("manta", data_dir=data_dir, image_size=16)
  assert_nothing_prepared(data_dir)


def test_builder_used_directly_validates(assert_nothing_prepared, tmp_path):
  root = make_visa_tree(tmp_path / "VisA", classes=("candle",))
  (root / "candle/Data/Masks/Anomaly/001.png").unlink()
  b = B.Visa(config=B.Visa.config_for("candle", 16),
             data_dir=str(tmp_path / "tfds"))
  with pytest.raises(D.DatasetError, match="Anomaly/001.png"):
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(root)))
  assert_nothing_prepared(tmp_path / "tfds")


def test_manta_mask_folder_per_defect(tmp_path):
  """Masks may also sit in mask/<defect>/, paired within each defect."""
  root = make_manta_tree(tmp_path / "MANTA", domain="mechanics",
                         cls="screw_y")
  mdir = root / "mechanics/screw_y/test-pixel/mask"
  (mdir / "crack").mkdir()
  for p in sorted(mdir.glob("*.png")):
    p.rename(mdir / "crack" / p.name)
  samples = D.Manta.scan_classes(root, ["screw_y"])["screw_y"]
  test = [s for s in samples if s.split == "test"]
  assert len(test) == 15
  assert [s.mask_path.name if s.mask_path else None
          for s in test[5::5]] == ["mask_000.png", "mask_001.png"]
  assert test[7].view == (2, 5) and test[7].file_name.endswith("#view3")


def test_visa_csv_row_problems(tmp_path):
  root = make_visa_tree(tmp_path / "VisA", classes=("candle",))
  csv_path = root / "split_csv/1cls.csv"
  lines = csv_path.read_text().splitlines()
  lines.append(lines[1])                                   # duplicate row
  lines.append("candle,val,normal,candle/Data/Images/Normal/0000.JPG,")
  lines.append("candle,test,abnormal,candle/Data/Images/Normal/0000.JPG,")
  csv_path.write_text("\n".join(lines) + "\n")
  with pytest.raises(D.DatasetError) as e:
    D.Visa.scan_classes(root, ["candle"], verify=False)
  msg = str(e.value)
  assert "listed more than once in the train split" in msg
  assert "1cls.csv:10: split 'val'" in msg
  assert "1cls.csv:11: label 'abnormal'" in msg
  assert len(e.value.problems) == 3


def test_real_iad_reload_and_stale_source(tmp_path):
  root = make_real_iad_tree(tmp_path / "Real-IAD", classes=("pcb",))
  data_dir = tmp_path / "tfds"
  kw = dict(classes=["pcb"], manual_dir=root, data_dir=data_dir,
            image_size=16, verbose=False, views="C1")
  D.load("real_iad", **kw)
  stamps = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")
            if p.is_file()}
  again = D.load("real_iad", **kw)
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  assert len(again.train) == 2
  # prepared data no longer matching the raw files is refused
  jpath = root / "realiad_jsons/pcb.json"
  data = json.loads(jpath.read_text())
  data["train"] = data["train"][:5]
  jpath.write_text(json.dumps(data))
  with pytest.raises(D.DatasetError, match="prepared from different"):
    D.load("real_iad", **kw)


def test_manta_stacked_views(prepared_dirs, tmp_path):
  root = make_manta_tree(tmp_path / "MANTA")
  data_dir = tmp_path / "tfds"
  ds = D.load("manta", classes=["pill_x"], manual_dir=root,
              data_dir=data_dir, image_size=None, verbose=False,
              views="stacked")
  assert len(ds.train) == 2 and len(ds.test) == 3
  test = _all(ds.test)
  assert [r["label"] for r in test] == [0, 1, 1]
  assert test[1]["file_name"] == "medicine/pill_x/test-pixel/crack/000.png"
  r = test[1]
  assert r["image"].shape == (5, MH, MW, 3)
  assert r["mask"].shape == (5, MH, MW) and r["mask"].dtype == np.uint8
  np.testing.assert_array_equal(r["image"][:, 0, 0, 0],
                                [40 * k + 9 for k in range(5)])
  assert r["mask"].any(axis=(1, 2)).tolist() == [False, True, False,
                                                 True, False]
  assert any("/pill_x_orig_viewsstacked/" in p
             for p in prepared_dirs(data_dir))


def test_mixture_global_class_ids(tmp_path):
  visa = make_visa_tree(tmp_path / "VisA", classes=("pcb1",))
  btad = make_btad_tree(tmp_path / "btad")
  data_dir = tmp_path / "tfds"
  ds = D.load_mixture([
      {"name": "btad", "classes": ["03", "01"], "manual_dir": btad},
      {"name": "visa", "classes": "pcb1", "manual_dir": visa}],
      data_dir=data_dir, image_size=16, verbose=False)
  assert ds.class_names == ("btad/03", "btad/01", "visa/pcb1")
  np.testing.assert_array_equal(ds.train_class_ids, [0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(ds.test_class_ids,
                                [0] * 3 + [1] * 3 + [2] * 4)
  _check_records(ds)
  r = pickle.loads(pickle.dumps(ds.test))[9]
  assert (r["class_id"], r["class_name"]) == (2, "visa/pcb1")
  assert r["file_name"] == "pcb1/Data/Images/Anomaly/001.JPG"
  with pytest.raises(D.DatasetError, match="more than once: btad/01"):
    D.load_mixture([{"name": "btad", "classes": ["01"],
                     "manual_dir": btad}] * 2,
                   data_dir=data_dir, image_size=16, verbose=False)


# ------------------------------------------- preparation at scale: workers,
# progress, counts report and the check against the published totals


def _split_files(data_dir):
  """Relative path -> bytes of every prepared data file (not the info
  files, which hold paths and timings)."""
  data_dir = pathlib.Path(data_dir)
  return {p.relative_to(data_dir).as_posix(): p.read_bytes()
          for p in sorted(data_dir.rglob("*array_record*"))}


def test_parallel_preparation_is_byte_identical(tmp_path):
  from ccl_jax.datasets import synthetic
  raw = synthetic.generate(tmp_path / "raw", seed=1, image_size=64,
                           num_train=6, num_test_good=3, num_test_defect=5)
  records, files = {}, {}
  for workers in (1, 4):
    data_dir = tmp_path / f"tfds{workers}"
    ds = D.load("synthetic", classes=["washer"], manual_dir=raw,
                data_dir=data_dir, image_size=48, verbose=False,
                num_workers=workers)
    records[workers] = [_all(ds.train), _all(ds.test)]
    files[workers] = _split_files(data_dir)
  assert files[1] and files[1].keys() == files[4].keys()
  for k in files[1]:
    assert files[1][k] == files[4][k], k
  for split1, split4 in zip(records[1], records[4]):
    assert len(split1) == len(split4) == len(split1) and split1
    for r1, r4 in zip(split1, split4):
      assert r1.keys() == r4.keys()
      for key in r1:
        np.testing.assert_array_equal(r1[key], r4[key])
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="num_workers"):
      D.load("synthetic", classes=["washer"], manual_dir=raw,
             data_dir=tmp_path / "bad", image_size=48, verbose=False,
             num_workers=bad)


def test_load_reports_counts_and_progress(tmp_path, capsys, monkeypatch):
  root = make_btad_tree(tmp_path / "btad")
  data_dir = tmp_path / "tfds"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a subset: nothing to compare
    D.load("btad", classes=["02", "01"], manual_dir=root,
           data_dir=data_dir, image_size=16, num_workers=2)
  out, err = capsys.readouterr()
  lines = out.splitlines()
  head = next(i for i, l in enumerate(lines) if "images per class" in l)
  assert "BTAD (16px)" in lines[head]
  assert lines[head + 1].split() == ["class", "train", "test", "good",
                                     "anomalous"]
  assert lines[head + 2].split() == ["02", "2", "3", "1", "2"]
  assert lines[head + 3].split() == ["01", "2", "3", "1", "2"]
  assert lines[head + 5].split() == ["total", "4", "6", "2", "4"]
  assert "btad/02_16 test" in err and "btad/01_16 train" in err  # bars
  assert "Generating" not in err  # TFDS's own bars are replaced by ours
  # reopening (nothing to prepare) prints the same table, no bars
  D.load("btad", classes=["02", "01"], data_dir=data_dir, image_size=16)
  out2, err2 = capsys.readouterr()
  assert out2.splitlines()[-6:] == lines[head:head + 6]
  assert "preparing" not in out2 and "btad/02_16" not in err2
  D.load("btad", classes=["01"], data_dir=data_dir, image_size=16,
         verbose=False)
  assert capsys.readouterr() == ("", "")
  # all classes, totals as "published": a confirmation, no warning
  from ccl_jax.datasets import totals
  monkeypatch.setitem(totals.KNOWN_TOTALS, "btad", (
      "BTAD", L.BTAD_CLASSES, {"train": 6, "test": 9}))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    D.load("btad", manual_dir=root, data_dir=data_dir, image_size=16)
  out = capsys.readouterr().out
  assert "preparing btad/03_16 (1/1)" in out
  assert out.splitlines()[-1] == ("[ccl_jax.datasets] the totals match "
                                  "the published ones (train 6, test 9)")


def test_check_totals():
  mvtec = {c: {"train": 3629 // 15, "test": 1725 // 15}
           for c in D.MVTEC_AD_CLASSES}
  mvtec["bottle"] = {"train": 3629 - 14 * (3629 // 15),
                     "test": 1725 - 14 * (1725 // 15)}
  assert D.check_totals("mvtec_ad", mvtec) == []
  mvtec["zipper"] = {"train": 3629 // 15 - 2, "test": 1725 // 15,
                     "test_good": 3}  # extra keys are ignored
  (msg,) = D.check_totals("mvtec_ad", mvtec)
  assert msg.startswith("MVTec AD: train split has 3627 images, "
                        "expected 3629")
  # a subset of the classes, unknown totals: nothing to compare
  del mvtec["zipper"]
  assert D.check_totals("mvtec_ad", mvtec) == []
  assert D.check_totals("manta", {"a": {"train": 1, "test": 1}}) == []
  assert D.check_totals("synthetic", {"a": {"train": 1, "test": 1}}) == []
  visa = {c: {"train": 0, "test": 0} for c in L.VISA_CLASSES}
  visa["pcb1"] = {"train": 8659, "test": 2161}
  (msg,) = D.check_totals("visa", visa)
  assert "VisA: test split has 2161 images, expected 2162" in msg
  real = {c: {"train": 0, "test": 0} for c in L.REAL_IAD_CLASSES}
  real["toy_brick"] = {"train": 36465, "test": 114585}
  assert D.check_totals("real_iad", real) == []
  assert D.check_totals("real_iad", real, {"resolution": "512"}) == []
  real["toy_brick"] = {"train": 36465 // 5, "test": 114585 // 5}
  assert len(D.check_totals("real_iad", real)) == 2
  assert D.check_totals("real_iad", real, {"views": "C1"}) == []
  btad = {"01": {"train": 400, "test": 70}, "02": {"train": 399,
      "test": 230}, "03": {"train": 1000, "test": 441}}
  assert D.check_totals("btad", btad) == []
  assert set(D.KNOWN_TOTALS) == {"mvtec_ad", "visa", "btad", "real_iad"}
  from ccl_jax.datasets.totals import expected_totals
  assert expected_totals("btad", ["03", "01", "02"]) == {"train": 1799,
                                                         "test": 741}
  assert expected_totals("btad", ["03", "01"]) is None
  assert expected_totals("real_iad", L.REAL_IAD_CLASSES) == {
      "train": 36465, "test": 114585}

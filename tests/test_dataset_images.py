"""Source images of every bit depth and PIL mode become 8-bit RGB when a dataset is prepared.

Real photographs come from scikit-image's bundled test images; 16-bit RGB PNGs, which
Pillow cannot write, are written by `_png16` below.
"""
import io
import pathlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from ccl_jax import datasets as D
from ccl_jax.datasets import builders as B
from ccl_jax.datasets import images
from ccl_jax.datasets.common import Sample


def _png16(array: np.ndarray) -> bytes:
  """A 16-bit PNG (grey, RGB or RGBA) of a uint16 array."""
  array = np.asarray(array, np.uint16)
  h, w = array.shape[:2]
  color_type = 0 if array.ndim == 2 else {3: 2, 4: 6}[array.shape[2]]
  rows = array.astype(">u2").reshape(h, -1).view(np.uint8)
  raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0

  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body)))

  header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
          + chunk(b"IEND", b""))


def _to16(array8: np.ndarray) -> np.ndarray:
  return array8.astype(np.uint16) * 257  # 0 -> 0, 255 -> 65535: the full 16-bit range


def _sample(image_path, mask_path=None) -> Sample:
  return Sample("test", pathlib.Path(image_path), mask_path and pathlib.Path(mask_path),
                int(mask_path is not None), "good", pathlib.Path(image_path).name)


def _decode(png: bytes) -> np.ndarray:
  assert png[12:16] == b"IHDR" and png[24] == 8  # an 8-bit PNG, as the features declare
  with Image.open(io.BytesIO(png)) as im:
    return np.asarray(im)


def _assert_within_one_level(got: np.ndarray, want: np.ndarray) -> None:
  assert got.shape == want.shape
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def camera():
  return skdata.camera()  # 512 x 512 uint8 grey photograph


@pytest.fixture(scope="module")
def astronaut():
  return skdata.astronaut()  # 512 x 512 x 3 uint8 RGB photograph


@pytest.mark.parametrize("image_size", [None, 64])
def test_16bit_grey_png_encodes_like_its_8bit_original(camera, tmp_path, image_size):
  Image.fromarray(_to16(camera)).save(tmp_path / "grey16.png")
  Image.fromarray(camera).save(tmp_path / "grey8.png")
  with Image.open(tmp_path / "grey16.png") as im:
    assert im.mode == "I;16"  # what Pillow makes of it
  got, _ = B.encode_sample(_sample(tmp_path / "grey16.png"), image_size)
  want, _ = B.encode_sample(_sample(tmp_path / "grey8.png"), image_size)
  _assert_within_one_level(_decode(got), _decode(want))
  if image_size is None:
    _assert_within_one_level(_decode(got), np.repeat(camera[..., None], 3, -1))


@pytest.mark.parametrize("image_size", [None, 64])
def test_16bit_rgb_png_encodes_like_its_8bit_original(astronaut, tmp_path, image_size):
  (tmp_path / "rgb16.png").write_bytes(_png16(_to16(astronaut)))
  Image.fromarray(astronaut).save(tmp_path / "rgb8.png")
  got, _ = B.encode_sample(_sample(tmp_path / "rgb16.png"), image_size)
  want, _ = B.encode_sample(_sample(tmp_path / "rgb8.png"), image_size)
  _assert_within_one_level(_decode(got), _decode(want))
  if image_size is None:
    _assert_within_one_level(_decode(got), astronaut)


def test_16bit_grey_maps_the_full_range_by_the_high_byte(tmp_path):
  codes = np.array([[0, 255, 256, 32767, 32768, 65279, 65280, 65535]], np.uint16)
  Image.fromarray(codes).save(tmp_path / "ramp.png")
  got, _ = B.encode_sample(_sample(tmp_path / "ramp.png"), None)
  np.testing.assert_array_equal(_decode(got)[0, :, 0], [0, 0, 1, 127, 128, 254, 255, 255])


@pytest.mark.parametrize("image_size", [64, 512])  # 512: the files' own size
def test_read_resized_gives_the_pixels_a_prepared_sample_stores(camera, astronaut, tmp_path,
                                                                 image_size):
  rgb = Image.fromarray(astronaut)
  rgb.save(tmp_path / "rgb.png")
  rgb.save(tmp_path / "photo.jpg", quality=90)
  rgb.convert("RGBA").save(tmp_path / "rgba.png")
  rgb.convert("P").save(tmp_path / "palette.png")
  Image.fromarray(camera).save(tmp_path / "grey.png")
  (tmp_path / "grey16.png").write_bytes(_png16(_to16(camera)))
  (tmp_path / "rgb16.png").write_bytes(_png16(_to16(astronaut)))
  for name in ("rgb.png", "photo.jpg", "rgba.png", "palette.png", "grey.png", "grey16.png",
               "rgb16.png"):
    got = images.read_resized(tmp_path / name, image_size)
    want = _decode(B.encode_sample(_sample(tmp_path / name), image_size)[0])
    assert got.dtype == np.uint8 and got.shape == (image_size, image_size, 3), name
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_32bit_integer_grey_holding_16bit_values_reads_as_16bit(camera, tmp_path):
  Image.fromarray(_to16(camera).astype(np.int32)).save(tmp_path / "grey32.tif")
  with Image.open(tmp_path / "grey32.tif") as im:
    assert im.mode == "I"
  got, _ = B.encode_sample(_sample(tmp_path / "grey32.tif"), None)
  _assert_within_one_level(_decode(got), np.repeat(camera[..., None], 3, -1))


def test_32bit_integer_grey_outside_16bits_is_refused(tmp_path):
  Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "big.tif")
  with pytest.raises(images.UnsupportedImageError, match=r"big\.tif.*outside 0\.\.65535"):
    B.encode_sample(_sample(tmp_path / "big.tif"), None)


def test_float_images_are_refused_naming_the_file_and_the_accepted_forms(tmp_path):
  Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "depth.tif")
  with pytest.raises(images.UnsupportedImageError) as info:
    B.encode_sample(_sample(tmp_path / "depth.tif"), 8)
  message = str(info.value)
  assert "depth.tif" in message and "'F'" in message
  assert images.SUPPORTED_FORMS in message


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK"])
def test_8bit_modes_convert_as_pillow_does(astronaut, tmp_path, mode):
  path = tmp_path / f"{mode}.{'tif' if mode == 'CMYK' else 'png'}"
  Image.fromarray(astronaut).convert(mode).save(path)
  with Image.open(path) as im:
    assert im.mode == mode
    want = np.asarray(im.convert("RGB"))
  got, mask = B.encode_sample(_sample(path), None)
  np.testing.assert_array_equal(_decode(got), want)
  assert not _decode(mask).any()
  if mode == "RGBA":  # the alpha band is dropped, not composited
    np.testing.assert_array_equal(_decode(got), astronaut)


def test_16bit_masks_keep_every_nonzero_pixel_as_foreground(camera, tmp_path):
  Image.fromarray(camera).save(tmp_path / "image.png")
  mask = np.zeros(camera.shape, np.uint16)
  mask[10:20, 30:50] = 1  # nonzero, though below one 8-bit level
  mask[100:140, 200:260] = 65535
  Image.fromarray(mask).save(tmp_path / "mask.png")
  _, got = B.encode_sample(_sample(tmp_path / "image.png", tmp_path / "mask.png"), None)
  np.testing.assert_array_equal(_decode(got), np.where(mask > 0, 255, 0))


def test_preparing_an_mvtec_folder_reads_16bit_images(make_mvtec_tree, camera, astronaut, tmp_path):
  root = make_mvtec_tree(tmp_path / "mvtec", classes=("grid", "bottle"), size=48)
  grey8 = camera[200:248, 240:288]
  rgb8 = astronaut[100:148, 180:228]
  Image.fromarray(_to16(grey8)).save(root / "grid/train/good/000.png")
  (root / "bottle/train/good/000.png").write_bytes(_png16(_to16(rgb8)))
  for size in (None, 32):
    ds = D.load("mvtec_ad", classes=["grid", "bottle"], manual_dir=root,
                data_dir=tmp_path / "tfds", image_size=size, verbose=False)
    grid, bottle = ds.train[0], ds.train[3]
    assert grid["file_name"] == "grid/train/good/000.png"
    assert bottle["file_name"] == "bottle/train/good/000.png"
    want_grey, want_rgb = np.repeat(grey8[..., None], 3, -1), rgb8
    if size is not None:
      resize = lambda a: np.asarray(Image.fromarray(a).resize((size, size),
                                                             Image.Resampling.BILINEAR))
      want_grey, want_rgb = resize(want_grey), resize(want_rgb)
    _assert_within_one_level(grid["image"], want_grey)
    _assert_within_one_level(bottle["image"], want_rgb)


def test_preparation_lists_unconvertible_images_before_writing(make_mvtec_tree, tmp_path):
  root = make_mvtec_tree(tmp_path / "mvtec", classes=("grid",), size=48)
  bad = root / "grid/train/good/001.tif"
  (root / "grid/train/good/001.png").unlink()
  Image.fromarray(np.zeros((48, 48), np.float32)).save(bad)
  with pytest.raises(D.DatasetError) as info:
    D.load("mvtec_ad", classes=["grid"], manual_dir=root, data_dir=tmp_path / "tfds",
           image_size=32, verbose=False)
  assert [p for p, _ in info.value.problems] == [str(bad)]
  assert "'F'" in info.value.problems[0][1]
  assert not (tmp_path / "tfds" / "mvtec_ad").exists() or not any(
      (tmp_path / "tfds" / "mvtec_ad").rglob("*.array_record*"))


def test_predict_feeds_the_model_a_16bit_image_like_its_8bit_original(camera, tmp_path):
  from ccl_jax import predict  # its inputs go through encode_sample
  Image.fromarray(_to16(camera)).save(tmp_path / "grey16.png")
  Image.fromarray(camera).save(tmp_path / "grey8.png")
  load = predict.read_image
  got = load(str(tmp_path / "grey16.png"), 64, keep_original=True)
  want = load(str(tmp_path / "grey8.png"), 64, keep_original=True)
  assert not got.error and not want.error
  _assert_within_one_level(got.image, want.image)
  # The overlay's background too: the image at its own size, not a white sheet.
  assert got.original.shape == want.original.shape == camera.shape + (3,)
  _assert_within_one_level(got.original, want.original)

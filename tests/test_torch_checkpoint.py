"""The torch-free checkpoint reader: formats, dtypes, views, safety and corrupt files.

torch is used only to write the files (test-only dependency); reading never imports it.
"""
import collections
import io
import pickle
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from ccl_jax.weights import torch_checkpoint
from ccl_jax.weights.torch_checkpoint import UnsafeCheckpointError, load_state_dict


def _state():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=g)
  shared = torch.arange(20, dtype=torch.int64)
  sd = collections.OrderedDict()
  sd["conv.weight"] = torch.randn(3, 2, 3, 3, generator=g)
  sd["transposed"] = base.t()  # non-contiguous view
  sd["slice"] = base[1:3, 2:5]  # offset + non-contiguous
  sd["half"] = torch.randn(5, 2, generator=g).half()
  sd["long"] = shared[3:9]  # offset view of a storage shared with "long_every_other"
  sd["long_every_other"] = shared[::2]
  sd["bool"] = torch.tensor([True, False, True])
  sd["uint16"] = torch.arange(5).to(torch.uint16)  # pickled via _rebuild_tensor_v3
  sd["bf16"] = torch.randn(4, generator=g).bfloat16()
  sd["scalar"] = torch.tensor(2.5)
  sd["empty"] = torch.zeros(0, 3)
  sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
  sd["bn.num_batches_tracked"] = torch.tensor(11)
  return sd


def _expected(value):
  if value.dtype == torch.bfloat16:
    return value.float().numpy()
  return value.detach().numpy()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reads_tensors_views_dtypes_and_nesting(tmp_path, legacy):
  sd = _state()
  checkpoint = {"bn": sd, "decoder": {"w": sd["transposed"], "meta": [1, "x", (2.0, None)]},
                "epoch": 4}
  path = tmp_path / "ckpt.pth"
  torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
  assert zipfile.is_zipfile(path) is not legacy

  loaded = load_state_dict(path)
  assert loaded["epoch"] == 4
  assert loaded["decoder"]["meta"] == [1, "x", (2.0, None)]
  assert list(loaded["bn"]) == list(sd)
  for key, value in sd.items():
    got, want = loaded["bn"][key], _expected(value)
    assert isinstance(got, np.ndarray), key
    assert got.dtype == want.dtype and got.shape == want.shape, key
    np.testing.assert_array_equal(got, want, err_msg=key)
    assert got.flags.c_contiguous and got.flags.writeable, key
  np.testing.assert_array_equal(loaded["decoder"]["w"], sd["transposed"].numpy())
  assert loaded["bn"]["half"].dtype == np.float16
  assert loaded["bn"]["long"].dtype == np.int64
  assert "torch" not in type(loaded["bn"]).__module__


def test_zip_folder_name_does_not_matter(tmp_path):
  path = tmp_path / "whatever_name.pt"
  torch.save({"a": torch.arange(6.0).reshape(2, 3)}, path)
  renamed = tmp_path / "renamed.pt"
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(renamed, "w") as dst:
    for info in src.infolist():
      dst.writestr("other_folder/" + info.filename.split("/", 1)[1], src.read(info))
  np.testing.assert_array_equal(load_state_dict(renamed)["a"], np.arange(6.0).reshape(2, 3))


class _Evil:
  def __reduce__(self):
    return (print, ("owned",))


def _legacy_header():
  return b"".join(pickle.dumps(x, protocol=2) for x in (
      torch_checkpoint.LEGACY_MAGIC_NUMBER, torch_checkpoint.LEGACY_PROTOCOL_VERSION,
      {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_unexpected_globals_are_refused_and_nothing_runs(tmp_path, legacy):
  marker = tmp_path / "pwned"
  # A hand-written pickle calling os.system, and one pickling a builtin call.
  payloads = {
      "os.system": f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),
      "builtins.print": pickle.dumps({"w": _Evil()}, protocol=2),
  }
  for name, payload in payloads.items():
    path = tmp_path / f"evil_{name}.pth"
    if legacy:
      path.write_bytes(_legacy_header() + payload)
    else:
      with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    with pytest.raises(UnsafeCheckpointError, match=name.replace(".", r"\.")) as e:
      load_state_dict(path)
    assert isinstance(e.value, ValueError) and str(path) in str(e.value)
  assert not marker.exists()


def test_a_whole_pickled_module_is_refused(tmp_path):
  path = tmp_path / "module.pth"
  torch.save(torch.nn.Linear(2, 2), path)
  with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear"):
    load_state_dict(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_and_corrupt_files_are_clear_errors(tmp_path, legacy):
  path = tmp_path / "full.pth"
  torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, path,
             _use_new_zipfile_serialization=not legacy)
  data = path.read_bytes()
  cuts = [len(data) // 2, len(data) - 7, 200, 40]
  for i, cut in enumerate(cuts):
    bad = tmp_path / f"cut{i}.pth"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="corrupt or truncated") as e:
      load_state_dict(bad)
    assert str(bad) in str(e.value)
  # One flipped byte inside the tensor data: the zip's CRC catches it; the legacy format
  # has no checksum, so flip a byte of its pickle instead.
  flipped = bytearray(data)
  position = data.index(b"data/0") + 200 if not legacy else data.index(b"FloatStorage")
  flipped[position] ^= 0xFF
  bad = tmp_path / "flipped.pth"
  bad.write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match=str(bad)):
    load_state_dict(bad)


class _FakeStorage:
  pass


class _FakeTensor:
  def __init__(self, offset, size, stride):
    self.args = (_FakeStorage(), offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2, self.args)


class _ViewPickler(pickle.Pickler):
  """Writes what torch < 0.4 wrote for storage views: a view of a larger root storage."""

  def persistent_id(self, obj):
    if isinstance(obj, _FakeStorage):
      return ("storage", torch.FloatStorage, "root", "cpu", 8, ("view", 2, 5))
    return None


def test_legacy_storage_views(tmp_path):
  body = io.BytesIO()
  _ViewPickler(body, protocol=2).dump({"w": _FakeTensor(1, (2, 2), (1, 2))})
  root = np.arange(8, dtype="<f4")
  path = tmp_path / "old.pth"
  path.write_bytes(_legacy_header() + body.getvalue() + pickle.dumps(["root"], protocol=2)
                   + (8).to_bytes(8, "little") + root.tobytes())
  view = root[2:7]  # the storage the tensor sees
  want = np.lib.stride_tricks.as_strided(view[1:], (2, 2), (4, 8))
  np.testing.assert_array_equal(load_state_dict(path)["w"], want)


def test_big_endian_zip_archives(tmp_path):
  path = tmp_path / "little.pth"
  value = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  torch.save({"w": value}, path)
  big = tmp_path / "big.pth"
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(big, "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith("/byteorder"):
        data = b"big"
      elif "/data/" in info.filename:
        data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
      dst.writestr(info.filename, data)
  loaded = load_state_dict(big)["w"]
  assert loaded.dtype == np.float32 and loaded.dtype.isnative
  np.testing.assert_array_equal(loaded, value.numpy())


def test_not_a_checkpoint_and_missing_file(tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("hello")
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    load_state_dict(text)
  with pytest.raises(FileNotFoundError):
    load_state_dict(tmp_path / "absent.pth")
  listing = tmp_path / "list.pth"
  torch.save([torch.ones(2)], listing)
  with pytest.raises(ValueError, match="not a state dict"):
    load_state_dict(listing)


def test_safetensors_round_trip_and_corruption(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"conv1.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "bn1.running_mean": rng.normal(size=4).astype(np.float16),
            "bn1.num_batches_tracked": np.array(3, np.int64)}
  path = tmp_path / "model.safetensors"
  save_file(arrays, str(path))
  loaded = load_state_dict(path)
  assert loaded.keys() == arrays.keys()
  for key, value in arrays.items():
    assert loaded[key].dtype == value.dtype
    np.testing.assert_array_equal(loaded[key], value)
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(ValueError, match="bad.safetensors"):
    load_state_dict(bad)


def test_reader_does_not_import_torch(tmp_path):
  path = tmp_path / "sd.pth"
  torch.save({"a": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
  code = ("import sys; sys.modules['torch'] = None\n"
          "from ccl_jax.weights.torch_checkpoint import load_state_dict\n"
          f"print(load_state_dict({str(path)!r})['a'].sum())")
  import subprocess
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "3.0"


class _CraftedPickler(pickle.Pickler):
  """Pickles `_FakeTensor`s on one float32 storage of `numel` elements, as torch would."""

  def __init__(self, file, numel, legacy):
    super().__init__(file, protocol=2)
    self.numel, self.legacy = numel, legacy

  def persistent_id(self, obj):
    if isinstance(obj, _FakeStorage):
      pid = ("storage", torch.FloatStorage, "0", "cpu", self.numel)
      return pid + (None,) if self.legacy else pid
    return None


def _crafted(path, tensors, numel=1, legacy=True):
  """A checkpoint whose tensors (name -> (offset, size, stride)) share one small storage."""
  body = io.BytesIO()
  _CraftedPickler(body, numel, legacy).dump({"bn": {k: _FakeTensor(*v)
                                                    for k, v in tensors.items()}})
  data = np.arange(numel, dtype="<f4").tobytes()
  if legacy:
    path.write_bytes(_legacy_header() + body.getvalue() + pickle.dumps(["0"], protocol=2)
                     + numel.to_bytes(8, "little") + data)
  else:
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", body.getvalue())
      z.writestr("archive/data/0", data)
  return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_huge_tensor_on_a_tiny_storage_is_refused_before_allocating(tmp_path, legacy):
  # 20000 x 20000 float32 (1.6 GB) on a storage of one element: stride 0 keeps every
  # element inside the storage, so only its element count gives it away.
  path = _crafted(tmp_path / "crafted.pth", {"w": (0, (20000, 20000), (0, 0))},
                  legacy=legacy)
  assert path.stat().st_size < 600
  tracemalloc.start()
  try:
    with pytest.raises(ValueError) as e:
      load_state_dict(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 50e6
  message = str(e.value)
  assert str(path) in message and "'bn/w'" in message
  assert "(20000, 20000)" in message and "holds 1 element" in message


@pytest.mark.parametrize("size,stride,offset,problem", [
    ((3, 4), (4, 1), 0, "more elements (12) than its storage"),
    ((2, 2), (2, 1), 7, "element 10 lies past the storage's end"),
    ((2, 2), (9, 1), 0, "element 10 lies past the storage's end"),
    ((0, 2**70), (1, 1), 0, "overflow"),
    ((2**40, 2**40), (0, 0), 0, "overflow"),
    ((2, 2), (2**64, 1), 0, "overflow"),
])
def test_tensors_outside_their_storage_are_refused_naming_them(tmp_path, size, stride,
                                                               offset, problem):
  path = _crafted(tmp_path / "bad.pth", {"ok": (0, (2, 5), (5, 1)),
                                         "bad": (offset, size, stride)}, numel=10)
  with pytest.raises(ValueError) as e:
    load_state_dict(path)
  message = str(e.value)
  assert str(path) in message and "'bn/bad'" in message and problem in message
  assert f"shape {size}" in message and "holds 10 element(s)" in message


def test_negative_sizes_are_refused(tmp_path):
  path = _crafted(tmp_path / "negative.pth", {"w": (0, (-1, 4), (4, 1))}, numel=10)
  with pytest.raises(ValueError, match="negative.pth.*size"):
    load_state_dict(path)


def test_tensors_filling_their_storage_exactly_still_load(tmp_path):
  path = _crafted(tmp_path / "fine.pth", {"w": (2, (2, 4), (1, 2))}, numel=10)
  np.testing.assert_array_equal(load_state_dict(path)["bn"]["w"],
                                np.arange(10.0)[2:][np.add.outer([0, 1], [0, 2, 4, 6])])


def _peak_bytes(fn):
  """(result or exception, peak bytes traced while running fn)."""
  tracemalloc.start()
  try:
    try:
      result = fn()
    except Exception as e:  # noqa: BLE001 - returned for the caller to check
      result = e
    return result, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_a_tensor_referenced_many_times_is_read_once(tmp_path):
  # The pickle memo makes each further reference cost 2 bytes; copying the 1 MB tensor
  # for each of them would take 200 MB.
  tensor = _FakeTensor(0, (250_000,), (1,))
  body = io.BytesIO()
  _CraftedPickler(body, 250_000, legacy=True).dump({"tied": [tensor] * 200})
  path = tmp_path / "tied.pth"
  path.write_bytes(_legacy_header() + body.getvalue() + pickle.dumps(["0"], protocol=2)
                   + (250_000).to_bytes(8, "little")
                   + np.arange(250_000, dtype="<f4").tobytes())
  loaded, peak = _peak_bytes(lambda: load_state_dict(path))
  assert peak < 50e6
  assert len(loaded["tied"]) == 200 and all(a is loaded["tied"][0] for a in loaded["tied"])
  np.testing.assert_array_equal(loaded["tied"][0], np.arange(250_000, dtype=np.float32))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_containers_shared_exponentially_are_walked_once(tmp_path, legacy):
  # 20 levels of [x, x] describe 2**20 leaves in a few hundred bytes of pickle.
  nested = [_FakeTensor(0, (1,), (1,))]
  for _ in range(20):
    nested = [nested, nested]
  body = io.BytesIO()
  _CraftedPickler(body, 1, legacy).dump({"w": nested})
  path = tmp_path / "laughs.pth"
  if legacy:
    path.write_bytes(_legacy_header() + body.getvalue() + pickle.dumps(["0"], protocol=2)
                     + (1).to_bytes(8, "little") + np.float32(7).tobytes())
  else:
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", body.getvalue())
      z.writestr("archive/data/0", np.float32(7).tobytes())
  loaded, peak = _peak_bytes(lambda: load_state_dict(path))
  assert peak < 50e6
  leaf = loaded["w"]
  for _ in range(20):
    assert leaf[0] is leaf[1]
    leaf = leaf[0]
  np.testing.assert_array_equal(leaf[0], [7.0])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickle_declaring_huge_bytes_is_refused_before_allocating(tmp_path, legacy):
  # BINBYTES8 with a 1.8 GB length and 3 bytes of data: the C unpickler would allocate the
  # declared length before finding the file too short.
  payload = b"\x80\x02\x8e" + (1_800_000_000).to_bytes(8, "little") + b"abc."
  path = tmp_path / "bytes8.pth"
  if legacy:
    path.write_bytes(_legacy_header() + payload)
  else:
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", payload)
  error, peak = _peak_bytes(lambda: load_state_dict(path))
  assert peak < 50e6
  assert isinstance(error, ValueError) and str(path) in str(error)
  assert "1800000000 bytes" in str(error)

"""ccl_jax.weights.variable_files: reading, checking and atomically writing Flax msgpack files."""
import ast
import os
import pathlib

import jax
import numpy as np
import pytest

from ccl_jax.weights import variable_files

REPO = pathlib.Path(__file__).resolve().parent.parent


def _template():
  return {"params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), np.float32)}},
          "batch_stats": {"bn": {"mean": jax.ShapeDtypeStruct((4,), np.float32)}}}


def _tree(kernel_shape=(3, 3, 2, 4)):
  rng = np.random.default_rng(0)
  return {"params": {"conv": {"kernel": rng.normal(size=kernel_shape)}},  # float64
          "batch_stats": {"bn": {"mean": np.arange(4)}}}  # int64


def test_save_then_load_round_trips_as_float32(tmp_path):
  path = str(tmp_path / "v.msgpack")
  tree = _tree()
  variable_files.save(path, tree)
  loaded = variable_files.load(path, _template(), "model.encoder_weights")
  for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(tree)):
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), want.astype(np.float32))
  assert os.listdir(tmp_path) == ["v.msgpack"]  # no temporary file left behind


def test_missing_file_names_the_setting_the_path_and_the_form(tmp_path):
  path = str(tmp_path / "absent.msgpack")
  with pytest.raises(FileNotFoundError) as info:
    variable_files.load(path, _template(), "--variables", hint=" or 'none'")
  message = str(info.value)
  assert message.startswith("--variables: no file at ")
  assert "absent.msgpack" in message and "Flax msgpack" in message
  assert message.endswith("or 'none'.")


def test_unreadable_file_names_the_setting_the_path_and_the_form(tmp_path):
  path = tmp_path / "garbage.msgpack"
  path.write_bytes(b"\xc1 not msgpack")
  with pytest.raises(ValueError) as info:
    variable_files.load(str(path), _template(), "model.encoder_weights")
  message = str(info.value)
  assert message.startswith("model.encoder_weights: ")
  assert "garbage.msgpack" in message and "Flax msgpack" in message


def test_a_file_that_is_not_a_tree_is_refused(tmp_path):
  path = str(tmp_path / "scalar.msgpack")
  variable_files.save(path, np.zeros(3))
  with pytest.raises(ValueError, match="scalar.msgpack.*not a variable tree"):
    variable_files.load(path, _template(), "--variables")


def test_mismatched_tree_lists_every_problem_and_loads_nothing(tmp_path):
  path = str(tmp_path / "other.msgpack")
  tree = _tree(kernel_shape=(1, 1, 2, 4))
  tree["params"]["extra"] = {"bias": np.zeros(2)}
  del tree["batch_stats"]
  variable_files.save(path, tree)
  with pytest.raises(ValueError) as info:
    variable_files.load(path, _template(), "--variables")
  message = str(info.value)
  assert message.startswith("--variables file ") and "other.msgpack" in message
  assert "missing (1): batch_stats/bn/mean" in message
  assert "unexpected (1): params/extra/bias" in message
  assert "wrong shape (1): params/conv/kernel: file (1, 1, 2, 4), model (3, 3, 2, 4)" in message


def test_save_goes_through_a_synced_temporary_file_in_the_same_directory(tmp_path,
                                                                        monkeypatch):
  path = str(tmp_path / "v.msgpack")
  calls = []
  real_fsync, real_replace = os.fsync, os.replace
  monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])

  def replace(src, dst):
    calls.append(("replace", os.path.dirname(src), dst))
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace)
  variable_files.save(path, _tree())
  assert calls[0] == "fsync"  # the data reaches the disk before the rename
  assert calls[1] == ("replace", str(tmp_path), path)


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / "v.msgpack"
  path.write_bytes(b"old")

  def fail(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(OSError, match="disk full"):
    variable_files.save(str(path), _tree())
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["v.msgpack"]


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Every module an `import` anywhere in the file names (functions included)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.add(node.module or "")
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_convert_never_imports_weights():
  # weights imports convert (the packaged EfficientNet weights); the reverse was a loop.
  imported = _imported_modules(REPO / "ccl_jax" / "weights" / "convert.py")
  assert "ccl_jax.weights.encoder_weights" not in imported
  assert "ccl_jax.weights.variable_files" in imported


def test_encoder_weights_setting_reads_through_variable_files(tmp_path):
  from ccl_jax.weights import encoder_weights
  from ccl_jax.models import ResNetEncoder, encoder_spec
  encoder = ResNetEncoder(encoder_spec("resnet18"))
  with pytest.raises(FileNotFoundError) as info:
    encoder_weights.encoder_variables(encoder, str(tmp_path / "r18.msgpack"), seed=0, image_size=32)
  message = str(info.value)
  assert message.startswith("model.encoder_weights: no file at ") and "r18.msgpack" in message
  assert "Flax msgpack" in message and "'none' for random weights" in message
  path = str(tmp_path / "r18.msgpack")
  variable_files.save(path, encoder_weights.encoder_variables(encoder, "none", seed=3, image_size=32))
  loaded = encoder_weights.encoder_variables(encoder, path, seed=0, image_size=32)
  want = encoder_weights.encoder_variables(encoder, "none", seed=3, image_size=32)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, want)

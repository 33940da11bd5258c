"""Fixtures shared by the end-to-end tests: one synthetic smoke dataset and one trained
smoke model per session (generating and training once keeps the suite short)."""
import os
import pathlib

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from ccl_jax.config import settings
from configs import demo



@pytest.fixture(scope="session")
def repo_root():
  """The repository's root folder (programs run as `python -m ...` from there)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("smoke_data"))


def _smoke_config(data_dir: str, **overrides):
  config = demo.get_config("smoke")
  config.dataset.data_dir = data_dir
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="session")
def smoke_config(smoke_data_dir):
  """configs/demo.py:smoke on the session's data, with dotted-key overrides:
  `smoke_config(**{'loss.window': 3})` -> ConfigDict."""
  return lambda **overrides: _smoke_config(smoke_data_dir, **overrides)


@pytest.fixture(scope="session")
def smoke_settings(smoke_data_dir):
  """The typed settings of `smoke_config(**overrides)`."""
  return lambda **overrides: settings.from_config(_smoke_config(smoke_data_dir, **overrides))


@pytest.fixture(scope="session")
def trained_smoke_run(smoke_settings, tmp_path_factory):
  """(settings, workdir) of a one-epoch CCL smoke run with a decision.json."""
  from ccl_jax.training import runner  # pylint: disable=import-outside-toplevel
  run_settings = smoke_settings(num_epochs=1, validation_fraction=0.25,
                                num_heatmaps_per_class=0)
  workdir = str(tmp_path_factory.mktemp("trained_smoke"))
  runner.run(run_settings, workdir)
  return run_settings, workdir


@pytest.fixture(scope="session")
def smoke_runs(trained_smoke_run, smoke_settings, tmp_path_factory):
  """(settings, {'ccl': workdir, 'hiercore': workdir}, the smoke dataset): the CCL smoke run
  and a HierCore run fitted on the same data."""
  from ccl_jax.datasets import selection  # pylint: disable=import-outside-toplevel
  from ccl_jax.training import runner  # pylint: disable=import-outside-toplevel
  run_settings, ccl_dir = trained_smoke_run
  hiercore_dir = str(tmp_path_factory.mktemp("hiercore_smoke"))
  runner.run(smoke_settings(**{"model.kind": "hiercore", "num_heatmaps_per_class": 0}),
             hiercore_dir)
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=True)
  return run_settings, {"ccl": ccl_dir, "hiercore": hiercore_dir}, dataset


@pytest.fixture(scope="session")
def read_events():
  """`read_events(folder)`: TensorBoard's own reader over a run's event files, every
  record kept (no sampling), orphaned records of resumed runs purged as TensorBoard does."""
  def read(folder):
    accumulator = event_accumulator.EventAccumulator(
        folder, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    accumulator.Reload()
    return accumulator
  return read


# ---------------------------------------------------------------- dataset folders

def _prepared_dirs_under(data_dir):
  """Every directory under data_dir that TFDS would treat as prepared."""
  return sorted(str(p.parent) for p in pathlib.Path(data_dir).rglob(
      "dataset_info.json"))


def _incomplete_dirs_under(data_dir):
  return [p for p in pathlib.Path(data_dir).rglob("*")
          if p.is_dir() and "incomplete" in p.name]


@pytest.fixture(scope="session")
def prepared_dirs():
  """`prepared_dirs(data_dir)`: the folders TFDS would treat as prepared."""
  return _prepared_dirs_under


@pytest.fixture(scope="session")
def assert_nothing_prepared():
  """`assert_nothing_prepared(data_dir)`: no prepared and no half-written class there."""
  def check(data_dir):
    assert not _prepared_dirs_under(data_dir)
    assert not _incomplete_dirs_under(data_dir)
  return check


@pytest.fixture(scope="session")
def incomplete_dirs():
  """`incomplete_dirs(data_dir)`: half-written preparation folders."""
  return _incomplete_dirs_under


MVTEC_TREE = {  # class: (mode, {defect: n_images}); 3 train, 2 test good
    "bottle": ("RGB", {"broken_large": 2, "contamination": 1}),
    "grid": ("L", {"bent": 2}),
}


def _write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _make_mvtec_tree(root, classes=("bottle", "grid"), size=48):
  rng = np.random.default_rng(0)
  for c in classes:
    mode, defects = MVTEC_TREE[c]
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    cdir = root / c
    for i in range(3):
      _write_png(cdir / "train/good" / f"{i:03d}.png",
                 rng.integers(0, 256, shape, dtype=np.uint8))
    for i in range(2):
      _write_png(cdir / "test/good" / f"{i:03d}.png",
                 rng.integers(0, 256, shape, dtype=np.uint8))
    for d, n in defects.items():
      for i in range(n):
        _write_png(cdir / "test" / d / f"{i:03d}.png",
                   rng.integers(0, 256, shape, dtype=np.uint8))
        m = np.zeros((size, size), np.uint8)
        m[8 + 4 * i:30, 10:20 + i] = 255
        _write_png(cdir / "ground_truth" / d / f"{i:03d}_mask.png", m)
  (root / "license.txt").write_text("CC BY-NC-SA 4.0")
  return root


@pytest.fixture(scope="session")
def make_mvtec_tree():
  """`make_mvtec_tree(root, classes=("bottle", "grid"), size=48)`: a tiny folder in MVTec
  AD's layout (random images, rectangular defect masks); returns `root`."""
  return _make_mvtec_tree

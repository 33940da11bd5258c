"""Fixtures shared by the end-to-end tests: one synthetic smoke dataset and one trained
smoke model per session (generating and training once keeps the suite short)."""
import os

import pytest

from ccl_jax import settings
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
  from ccl_jax import main  # pylint: disable=import-outside-toplevel
  run_settings = smoke_settings(num_epochs=1, validation_fraction=0.25,
                                num_heatmaps_per_class=0)
  workdir = str(tmp_path_factory.mktemp("trained_smoke"))
  main.run(run_settings, workdir)
  return run_settings, workdir

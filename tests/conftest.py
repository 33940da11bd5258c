"""Fixtures shared by the end-to-end tests: one synthetic smoke dataset and one trained
smoke model per session (generating and training once keeps the suite short)."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402  (configs/ is not an installed package)


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("smoke_data"))


def smoke_config(data_dir: str, **overrides):
  """configs/demo.py:smoke on `data_dir`, with dotted-key overrides."""
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
def trained_smoke_run(smoke_data_dir, tmp_path_factory):
  """(config, workdir) of a one-epoch CCL smoke run with a decision.json."""
  from ccl_jax import train  # pylint: disable=import-outside-toplevel
  config = smoke_config(smoke_data_dir, num_epochs=1, validation_fraction=0.25,
                        num_heatmaps_per_class=0)
  workdir = str(tmp_path_factory.mktemp("trained_smoke"))
  train.train_and_evaluate(config, workdir)
  return config, workdir

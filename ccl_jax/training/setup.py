"""What every run starts from, CCL/RD training and HierCore fitting alike: the run
directory, the selected dataset and its split into training and held-out normal images,
the mesh's shardings and the frozen encoder, placed on every device."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding

from ccl_jax.config.settings import RunSettings
from ccl_jax.datasets import AnomalyDataset, selection
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.runtime import inference
from ccl_jax.weights.encoder_weights import frozen_encoder


@dataclasses.dataclass(frozen=True)
class RunStart:
  run_dir: RunDir
  is_main: bool  # process 0: the one that writes the run directory
  dataset: AnomalyDataset
  train_indices: np.ndarray  # into dataset.train
  holdout_indices: np.ndarray  # normal training images held out (validation, thresholds)
  replicated: NamedSharding
  batch_sharding: NamedSharding
  encoder: nn.Module
  encoder_variables: Any  # placed with `replicated`


def check_divisible_by_devices(key: str, value: int) -> None:
  """Global batch sizes are split evenly over every device of every process."""
  if value % jax.device_count():
    raise ValueError(f"{key}={value} must be divisible by the number of devices "
                     f"({jax.device_count()}).")


def start_run(run_settings: RunSettings, workdir: str) -> RunStart:
  """Loads what the run reads and places the frozen encoder; writes nothing yet."""
  check_divisible_by_devices("eval_batch_size", run_settings.global_eval_batch_size)
  is_main = jax.process_index() == 0
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=is_main)
  train_indices, holdout_indices = selection.training_split(run_settings, dataset)
  replicated = inference.replicated_sharding()
  encoder, encoder_variables = frozen_encoder(run_settings, replicated)
  return RunStart(RunDir(workdir), is_main, dataset, train_indices, holdout_indices,
                  replicated, inference.batch_sharding(), encoder, encoder_variables)

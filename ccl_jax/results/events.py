"""TensorBoard event files of a run (`tensorboard --logdir <workdir>` shows them).

Written with tensorboardX (no TensorFlow) into the run directory's events/ folder
(`RunDir.event_writer`), by process 0 only:

  train/<term>                     every step: loss, kd, local, global, grad_norm
  train/images_per_second          every `log_every_steps` steps
  train/learning_rate/<part>       the optimizer's learning rates (rest, projector)
  validation/kd_loss               every epoch (held-out normal training images)
  test_during_training/<metric>    every `eval_every_epochs` epochs, mean over classes
  final/<metric>/<class or mean>   the evaluated model's metrics (threshold-free)
  final_<decision>/<value>/<class or mean>  decisions at class-wise and agnostic
                                   thresholds: rates, thresholds, counts
  heatmaps/<class>                 the worst miss of each class (image | truth | map)

Steps are the optimizer's: a resumed run goes on at its checkpoint's step, and the
writer's purge step hides what a killed run wrote past it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ccl_jax.config.settings import OptimizerSettings

STEP_TERMS = ("loss", "kd", "local", "global", "grad_norm")
# A few images, not the gallery: TensorBoard keeps every image of every step in memory.
MAX_HEATMAP_CLASSES = 8


def _add_finite(writer, tag: str, value: Any, step: int) -> None:
  """Undefined metrics (None/NaN: skipped for the class) are left out, not drawn as 0."""
  if value is not None and math.isfinite(value):
    writer.add_scalar(tag, float(value), step)


def log_steps(writer, first_step: int, step_values: Sequence[Mapping[str, float]],
              images_per_second: float, optimizer: OptimizerSettings) -> None:
  """The loss terms of consecutive steps `first_step, first_step + 1, ...` (already
  fetched from the device), the throughput and learning rates at the last of them."""
  for offset, values in enumerate(step_values):
    for term in STEP_TERMS:
      writer.add_scalar(f"train/{term}", float(values[term]), first_step + offset)
  last = first_step + len(step_values) - 1
  writer.add_scalar("train/images_per_second", images_per_second, last)
  writer.add_scalar("train/learning_rate/rest", optimizer.learning_rate, last)
  writer.add_scalar("train/learning_rate/projector", optimizer.projector_learning_rate, last)
  # On disk before the next steps run: a kill then loses no step a checkpoint has.
  writer.flush()


def log_epoch(writer, record: Mapping[str, Any]) -> None:
  """An epoch record of the training loop: validation loss, test means during training."""
  step = record["step"]
  if "validation_loss" in record:
    writer.add_scalar("validation/kd_loss", record["validation_loss"], step)
  for metric, value in record.get("test_mean", {}).items():
    _add_finite(writer, f"test_during_training/{metric}", value, step)
  writer.flush()


def log_results(writer, step: int, result: Mapping[str, Any],
                heatmaps: Sequence[tuple[str, np.ndarray]]) -> None:
  """The final metrics per class and mean, the decisions and (class, [H, W, 3] uint8)
  heatmap figures, at the evaluated model's step."""
  summary = result["metrics"]
  for prefix, block in (("final", summary),
                        ("final_classwise", result.get("classwise")),
                        ("final_agnostic", result.get("agnostic"))):
    if block is None:
      continue
    rows = {**block["per_class"], "mean": block["mean"]}
    for name, row in rows.items():
      for metric, value in row.items():
        _add_finite(writer, f"{prefix}/{metric}/{name}", value, step)
  for class_name, figure in heatmaps[:MAX_HEATMAP_CLASSES]:
    writer.add_image(f"heatmaps/{class_name}", figure, step, dataformats="HWC")
  writer.flush()

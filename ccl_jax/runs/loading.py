"""The detector of a run directory, restored without an optimizer."""
from __future__ import annotations

from ccl_jax.ccl.detector import restored_rd_detector
from ccl_jax.hiercore.detector import hiercore_detector
from ccl_jax.models.detector import Detector
from ccl_jax.runs import run_dir as run_dir_lib
from ccl_jax.runtime import inference
from ccl_jax.weights.encoder_weights import frozen_encoder


def load_detector(path: str, *, checkpoint: str = "best") -> Detector:
  """The detector of a run directory: a CCL/RD run's `checkpoint` ('best' or 'latest'),
  or a HierCore run's memory bank. Reads only; builds no optimizer."""
  run = run_dir_lib.RunDir(path)
  run_settings = run.read_settings()
  replicated = inference.replicated_sharding()
  if run_settings.model.kind == "hiercore":
    bank = run.read_memory_bank()
    encoder, encoder_variables = frozen_encoder(run_settings, replicated)
    return hiercore_detector(run_settings, bank, encoder, encoder_variables)
  # Checked before the encoder is built: a missing checkpoint is the likelier mistake.
  if run.checkpoint_step(checkpoint) is None:
    raise FileNotFoundError(f"No checkpoint in {run.checkpoint_dir(checkpoint)}; expected "
                            "'best' or 'latest' of a training run.")
  restored_steps = []

  def restore(template):
    variables, step = run.restore_model_variables(checkpoint, template, replicated)
    restored_steps.append(step)
    return variables

  detector = restored_rd_detector(run_settings, replicated, restore)
  detector.checkpoint_step = restored_steps[0]
  return detector

"""One run in a workdir, CCL/RD training or HierCore fitting by the settings' model kind:
the body of `python -m ccl_jax.main` and of each `ccl_jax.scenarios` run."""
from __future__ import annotations

import contextlib
from typing import Any

import jax
from absl import logging

from ccl_jax.config.settings import RunSettings
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.runtime import preemption
from ccl_jax.training import fit_hiercore, train


def run(run_settings: RunSettings, workdir: str, *,
        stop_after_steps: int | None = None) -> dict[str, Any]:
  """The program's body: one run in `workdir`, locked, and only if the workdir is new or
  holds a run of the same settings."""
  for warning in run_settings.warnings:
    logging.warning(warning)
  run_dir = RunDir(workdir)
  stop_signals = preemption.StopSignals()
  with (stop_signals.installed(),
        run_dir.lock() if jax.process_index() == 0 else contextlib.nullcontext()):
    run_dir.check_same_run(run_settings)
    if run_settings.model.kind == "hiercore":
      return fit_hiercore.fit(run_settings, workdir)
    return train.train_and_evaluate(run_settings, workdir, stop_after_steps=stop_after_steps,
                                    stop_signals=stop_signals)

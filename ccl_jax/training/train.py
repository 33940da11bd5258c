"""The training loop of RD + CCL: `train_and_evaluate(run_settings, workdir)`.

Data-parallel over every device of every process: a 1-D ('data') mesh, the global batch
sharded along it, state and frozen encoder replicated, one jitted, state-donating step.
The loop: state (created already sharded), steps, validation loss on held-out normal
images, checkpoints (`ccl_jax.runs.run_dir`), early stopping; then the run's decisions and
test-set evaluation (`ccl_jax.evaluation.decide.fit_and_evaluate`).

Nothing non-finite is ever saved: the state is checked on the device before every save,
so `latest` and `best` always hold the last finite state.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from ccl_jax.ccl import step
from ccl_jax.datasets import input_pipeline
from ccl_jax.evaluation import decide
from ccl_jax.results import writing
from ccl_jax.results import events
from ccl_jax.runtime import inference, preemption
from ccl_jax.datasets import selection
from ccl_jax.training import setup
from ccl_jax.decisions.grouping import pseudo_classes
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.config.settings import RunSettings
from ccl_jax.ccl.detector import ReverseDistillationDetector, build_network, rd_detector


def _validation_loss(detector: ReverseDistillationDetector, dataset,
                     indices: np.ndarray, *, global_batch_size: int, batch_sharding) -> float:
  """Mean KD loss (the RD objective, inference mode) on held-out normal training images."""
  outputs = inference.run_inference(detector.outputs, dataset.train, indices, outputs=("kd",),
                                    global_batch_size=global_batch_size,
                                    batch_sharding=batch_sharding)
  return float(np.mean(outputs["kd"]))


def _check_finite_metrics(step_number: int, values: dict[str, float],
                          last_saved_step: int | None) -> None:
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    kept = (f"the last finite checkpoint (step {last_saved_step}) is kept"
            if last_saved_step is not None else "no checkpoint was saved")
    raise FloatingPointError(
        f"Non-finite training metrics at step {step_number}: {bad}. Training stopped; {kept}. "
        "Lower optimizer.learning_rate or check the input images; rerunning the same "
        "command resumes from that checkpoint.")


class _Checkpoints:
  """Saves of `latest` and `best` that never write a non-finite state."""

  def __init__(self, run_dir: RunDir):
    self.run_dir = run_dir
    self.last_saved_step = run_dir.checkpoint_step("latest")

  def save(self, which: str, state: step.TrainState, meta: dict) -> None:
    if not bool(step.all_finite(state)):
      kept = (f"the last finite checkpoint (step {self.last_saved_step}) is kept"
              if self.last_saved_step is not None else "no checkpoint was saved")
      raise FloatingPointError(
          f"The train state at step {int(state.step)} holds NaN or Inf values, so it was not "
          f"saved; {kept}. Lower optimizer.learning_rate or check the input images; "
          "rerunning the same command resumes from that checkpoint.")
    self.run_dir.save_checkpoint(which, state, meta)
    if which == "latest":
      self.last_saved_step = int(state.step)


def train_and_evaluate(run_settings: RunSettings, workdir: str, *,
                       stop_after_steps: int | None = None,
                       stop_signals: preemption.StopSignals | None = None) -> dict[str, Any]:
  """Trains RD + CCL, evaluates the selected checkpoint, writes the run directory.

  `stop_after_steps` ends the run early (as a preemption would, after saving) and is used
  by tests of resumption; a rerun of the same command continues from the checkpoint.
  `stop_signals` (installed by the caller): a SIGTERM or SIGINT during training stops every
  process after one agreed step, which is saved, and raises `preemption.Preempted`.
  Returns the metrics summary (None for the metrics when stopped early).
  """
  stop_signals = stop_signals or preemption.StopSignals()
  setup.check_divisible_by_devices("batch_size", run_settings.batch_size)
  start = setup.start_run(run_settings, workdir)
  run_dir, is_main, dataset = start.run_dir, start.is_main, start.dataset
  train_indices, val_indices = start.train_indices, start.holdout_indices
  encoder, encoder_variables = start.encoder, start.encoder_variables
  batch_sharding = start.batch_sharding
  eval_batch_size = run_settings.global_eval_batch_size
  view_source = None
  if run_settings.augmented_view_source_size and run_settings.loss.uses_augmented_view:
    view_source = selection.load_view_source(
        run_settings.dataset, dataset, size=run_settings.augmented_view_source_size,
        is_main=is_main)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(train_indices), run_settings.batch_size)
  total_steps = steps_per_epoch * run_settings.num_epochs
  logging.info("Classes: %s | train %d (+%d validation) | test %d | %d steps/epoch",
               ", ".join(dataset.class_names), len(train_indices), len(val_indices),
               len(dataset.test), steps_per_epoch)

  network = build_network(run_settings)
  state = step.initial_state(network, encoder, encoder_variables, run_settings.optimizer,
                             run_settings.image_size, run_settings.seed, start.replicated)

  checkpoints = _Checkpoints(run_dir)
  # `training_log`: the loss terms at every logging step, for report.html's curves. In the
  # checkpoint, so a resumed run's log ends where its state does.
  meta = {"best_validation_loss": None, "best_step": None, "epochs_without_improvement": 0,
          "history": [], "training_log": [], "stopped_early": False}
  if checkpoints.last_saved_step is not None:
    state, meta = run_dir.restore_checkpoint("latest", state)
    meta.setdefault("training_log", [])  # checkpoints written before the log existed
    if is_main:
      run_dir.discard_checkpoints_after("best", int(state.step))
    multihost_utils.sync_global_devices("ccl_jax stale checkpoints discarded")
    logging.info("Resumed from %s at step %d.", run_dir.checkpoint_dir("latest"),
                 int(state.step))
  if is_main:
    run_dir.write_settings(run_settings)

  def detector_of(state) -> ReverseDistillationDetector:
    return rd_detector(run_settings, encoder, encoder_variables, network,
                       step.variables_of(state))

  train_class_ids = dataset.train_class_ids[train_indices]
  if run_settings.dataset.class_labels == "kmeans":
    embeddings = decide.routing_embeddings(detector_of(state), dataset.train, train_indices,
                                         global_batch_size=eval_batch_size,
                                         batch_sharding=batch_sharding)
    num_clusters = run_settings.dataset.num_pseudo_classes
    train_class_ids, v_measure = pseudo_classes(embeddings, train_class_ids,
                                                num_classes=num_clusters,
                                                seed=run_settings.seed)
    meta["pseudo_classes"] = {"num_clusters": num_clusters, "v_measure": v_measure}
    logging.info("K-means pseudo-classes: %d clusters, V-measure %.3f against the true classes.",
                 num_clusters, v_measure)

  train_step = step.jit_train_step(encoder, run_settings.loss)
  first_step = int(state.step)
  batches = input_pipeline.train_batches(
      dataset.train, train_indices, train_class_ids,
      global_batch_size=run_settings.batch_size, seed=run_settings.seed, start_step=first_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=run_settings.worker_count, sampler=run_settings.sampler,
      view_source=view_source)
  last_step = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
  # The first step this run takes is first_step + 1: what a killed run logged from there on
  # is replaced.
  writer = (run_dir.event_writer(purge_step=first_step + 1 if first_step else None)
            if is_main else None)

  def end_of_epoch(state, meta) -> bool:
    """Validation, early stopping and checkpoints; True when training should stop."""
    epoch = int(state.step) // steps_per_epoch
    record = {"epoch": epoch, "step": int(state.step)}
    if len(val_indices):
      loss = _validation_loss(detector_of(state), dataset, val_indices,
                              global_batch_size=eval_batch_size, batch_sharding=batch_sharding)
      record["validation_loss"] = loss
      if meta["best_validation_loss"] is None or loss < meta["best_validation_loss"]:
        meta.update(best_validation_loss=loss, best_step=int(state.step),
                    epochs_without_improvement=0)
        checkpoints.save("best", state, meta)
      else:
        meta["epochs_without_improvement"] += 1
    if (run_settings.eval_every_epochs and epoch % run_settings.eval_every_epochs == 0
        and epoch < run_settings.num_epochs):
      summary, _ = decide.evaluate_test_set(
          detector_of(state), dataset, decide.one_group(dataset),
          global_batch_size=eval_batch_size, batch_sharding=batch_sharding)
      record["test_mean"] = summary["mean"]
    meta["history"].append(record)
    if writer is not None:
      events.log_epoch(writer, record)
    logging.info("Epoch %d: %s", epoch, record)
    patience = run_settings.early_stopping_patience
    stop = bool(patience) and meta["epochs_without_improvement"] >= patience
    meta["stopped_early"] = stop
    checkpoints.save("latest", state, meta)
    return stop

  progress = tqdm.tqdm(total=total_steps, initial=first_step, disable=not is_main,
                       desc="train", unit="step", dynamic_ncols=True)
  pending: list[dict[str, jax.Array]] = []
  tick, tick_step = time.perf_counter(), first_step
  stopped = meta.get("stopped_early", False)
  step_number = first_step
  preempted = False
  # Within the loop a signal is only noted (`stop_signals`), so that the step, evaluation or
  # save under way ends whole; the loop stops at the step every process agrees on. The
  # progress bar is closed before any error is reported, so that it does not redraw after.
  with stop_signals.deferred(), contextlib.closing(progress):
    while step_number < last_step and not stopped and not preempted:
      batch = input_pipeline.to_global_array(next(batches), batch_sharding)
      state, step_metrics = train_step(state, encoder_variables, batch)
      step_number += 1
      pending.append(step_metrics)
      preempted = stop_signals.should_stop(step_number)
      at_epoch_end = step_number % steps_per_epoch == 0
      if (len(pending) >= run_settings.log_every_steps or at_epoch_end
          or step_number == last_step or preempted):
        # Reading metrics is the only host sync in the loop besides saves.
        fetched = jax.device_get(pending)
        pending = []
        latest_values = {k: float(v) for k, v in fetched[-1].items()}
        for offset, values in enumerate(fetched):
          _check_finite_metrics(step_number - len(fetched) + offset + 1,
                                {k: float(v) for k, v in values.items()},
                                checkpoints.last_saved_step)
        now = time.perf_counter()
        images_per_second = (step_number - tick_step) * run_settings.batch_size / (now - tick)
        tick, tick_step = now, step_number
        meta["training_log"].append(
            {"step": step_number, "images_per_second": images_per_second,
             **{k: float(np.mean([float(v[k]) for v in fetched])) for k in events.STEP_TERMS}})
        if writer is not None:
          events.log_steps(writer, step_number - len(fetched) + 1, fetched, images_per_second,
                           run_settings.optimizer)
        progress.set_postfix(loss=f"{latest_values['loss']:.4f}",
                             kd=f"{latest_values['kd']:.4f}", img_s=f"{images_per_second:.1f}")
        progress.update(len(fetched))
      if at_epoch_end:
        stopped = end_of_epoch(state, meta)
      elif (run_settings.checkpoint_every_steps
            and step_number % run_settings.checkpoint_every_steps == 0):
        checkpoints.save("latest", state, meta)
    # A signal during the last step's evaluation or save, with no step left to stop after.
    preempted = preempted or stop_signals.stop_requested()
    if preempted and checkpoints.last_saved_step != step_number:
      checkpoints.save("latest", state, meta)
  progress.close()
  if writer is not None:
    writer.close()
  if preempted:
    raise preemption.Preempted(
        f"Preempted{' by ' + stop_signals.received if stop_signals.received else ''}: "
        f"saved step {step_number} of {total_steps} in {run_dir.checkpoint_dir('latest')}; "
        f"exiting with code {preemption.EXIT_CODE}. Rerun the same command to resume.")
  if step_number < total_steps and not stopped:
    checkpoints.save("latest", state, meta)
    logging.info("Stopped at step %d of %d; rerun the same command to resume.", step_number,
                 total_steps)
    return {"metrics": None, "step": step_number}

  final = state
  if run_settings.evaluate_checkpoint == "best" and run_dir.checkpoint_step("best") is not None:
    final, _ = run_dir.restore_checkpoint("best", state)
    logging.info("Evaluating the best-validation checkpoint (step %d).", int(final.step))
  result, outputs = decide.fit_and_evaluate(
      detector_of(final), run_settings, run_dir, dataset, train_indices, val_indices,
      batch_sharding=batch_sharding)
  result.update({"evaluated_step": int(final.step), "step": step_number,
                 "history": meta["history"], "training_log": meta["training_log"],
                 "pseudo_classes": meta.get("pseudo_classes")})
  if is_main:
    writing.write_results(run_dir, result, dataset, outputs, run_settings)
  return result

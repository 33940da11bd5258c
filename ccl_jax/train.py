"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

This is the only module that reads the config; everything below it takes plain arguments.
Data-parallel over every device of every process: a 1-D ('data') mesh, the global batch
sharded along it, state and frozen encoder replicated, one jitted step.

Workdir layout:
  checkpoints/latest/<step>   state + loop bookkeeping, for resuming after preemption
  checkpoints/best/<step>     the state with the lowest validation loss (early stopping)
  metrics.json                per-class and mean metrics, plus the training history
  results.md                  the same metrics as a markdown table
  heatmaps/<class>/*.png      image | ground truth contour | anomaly map
  config.json                 the config this run used
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import sklearn.cluster
import sklearn.metrics
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from ccl_jax import (datasets, decisions, hiercore, inference, input_pipeline, metrics, step,
                     thresholds, visualize, weights)
import flax.linen as nn

from ccl_jax.models import ReverseDistillation, build_encoder, encoder_spec


def build_models(config: ml_collections.ConfigDict) -> tuple[nn.Module, ReverseDistillation]:
  spec = encoder_spec(config.model.encoder)
  projector = config.model.projector
  if projector not in ("auto", "on", "off"):
    raise ValueError(f"model.projector must be 'auto', 'on' or 'off', got {projector!r}.")
  uses_contrastive = config.loss.local_weight > 0 or config.loss.global_weight > 0
  # 'auto': CCL has the projector, the RD baseline (both CL weights 0) is plain RD4AD.
  use_projector = projector == "on" or (projector == "auto" and uses_contrastive)
  dtype = jnp.dtype(config.model.dtype)
  model = ReverseDistillation(
      spec, use_projector=use_projector,
      neck_width_per_group=config.model.neck_width_per_group or spec.width_per_group,
      decoder_width_per_group=config.model.decoder_width_per_group or spec.width_per_group,
      noise_probability=config.model.feature_noise_probability, dtype=dtype)
  return build_encoder(config.model.encoder, dtype), model


def loss_settings(config: ml_collections.ConfigDict) -> step.LossSettings:
  return step.LossSettings(
      local_weight=float(config.loss.local_weight), global_weight=float(config.loss.global_weight),
      temperature=float(config.loss.temperature), window=config.loss.window,
      local_negatives=config.loss.local_negatives,
      same_class_positive=bool(config.loss.same_class_positive),
      global_views=config.loss.global_views)


def validation_loss(predict_fn, variables, encoder_variables, dataset, indices, *,
                    global_batch_size: int, batch_sharding) -> float:
  """Mean KD loss (the RD objective, inference mode) on held-out normal training images."""
  outputs = inference.run_inference(predict_fn, variables, encoder_variables, dataset.train, indices,
                          outputs=("kd",), global_batch_size=global_batch_size,
                          batch_sharding=batch_sharding)
  return float(np.mean(outputs["kd"]))


def save_heatmaps(directory: str, dataset, outputs: dict[str, np.ndarray],
                  per_class: int) -> int:
  """A few test images per class: anomalous ones of different defect types, one normal."""
  written = 0
  for class_id, name in enumerate(dataset.class_names):
    rows = np.flatnonzero(dataset.test_class_ids == class_id)
    if rows.size == 0 or per_class <= 0:
      continue
    scores = outputs["anomaly_map"][rows]
    low, high = float(np.min(scores)), float(np.max(scores))
    anomalous = rows[outputs["label"][rows] == 1]
    # Test images are stored grouped by defect type: evenly spaced picks cover the types.
    picks = np.unique(np.linspace(0, len(anomalous) - 1, min(per_class, len(anomalous)))
                      .round().astype(int)) if len(anomalous) else np.zeros(0, int)
    normal = rows[outputs["label"][rows] == 0][:1]
    for r in list(anomalous[picks]) + list(normal):
      record = dataset.test[int(r)]
      stem = os.path.splitext(record["file_name"].replace("/", "_"))[0]
      visualize.save_heatmap(os.path.join(directory, name, f"{stem}.png"), record["image"],
                             outputs["mask"][r], outputs["anomaly_map"][r], low, high)
      written += 1
  return written


def pseudo_class_ids(encoder, encoder_variables, dataset, indices: np.ndarray, *,
                     num_classes: int, seed: int, global_batch_size: int,
                     batch_sharding) -> tuple[np.ndarray, float]:
  """K-means pseudo-classes of training images (paper Table 3) and their V-measure
  against the true classes. Clusters the frozen encoder's spatially pooled deepest
  features (the paper: ImageNet ResNet-18 avg-pool features)."""
  if num_classes < 2 or num_classes > len(indices):
    raise ValueError(f"dataset.num_pseudo_classes={num_classes} must be between 2 and the "
                     f"number of training images ({len(indices)}).")
  embeddings = decisions.embeddings_of(encoder, encoder_variables, dataset.train, indices,
                                       global_batch_size=global_batch_size,
                                       batch_sharding=batch_sharding)
  clusters = sklearn.cluster.KMeans(num_classes, n_init=10, random_state=seed).fit_predict(
      embeddings.astype(np.float64))
  v_measure = sklearn.metrics.v_measure_score(dataset.train_class_ids[indices], clusters)
  return clusters.astype(np.int32), float(v_measure)


def _check_finite(step_number: int, values: dict[str, float]) -> None:
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"Non-finite training metrics at step {step_number}: {bad}. Training stopped; the "
        "last good checkpoint is kept. Lower optimizer.learning_rate, check the input "
        "images, or resume from the checkpoint.")


def _checkpoint_manager(directory: str) -> ocp.CheckpointManager:
  # Synchronous saves: the train step donates the state's buffers, which an async save
  # could still be reading.
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, enable_async_checkpointing=False))


def _save(manager: ocp.CheckpointManager, state: step.TrainState, meta: dict) -> None:
  manager.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def _restore(manager: ocp.CheckpointManager, target: step.TrainState,
             checkpoint_step: int) -> tuple[step.TrainState, dict]:
  restored = manager.restore(checkpoint_step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


def _initial_state(config: ml_collections.ConfigDict, replicated: NamedSharding):
  """Models, frozen encoder variables and the initial train state, created replicated."""
  _, model = build_models(config)
  encoder, encoder_variables = _frozen_encoder(config, replicated)
  tx = step.make_optimizer(
      projector_learning_rate=config.optimizer.projector_learning_rate,
      learning_rate=config.optimizer.learning_rate, b1=config.optimizer.b1,
      b2=config.optimizer.b2, clip_norm=config.optimizer.clip_norm)
  state = jax.jit(lambda enc_vars, key: step.create_train_state(
      model, encoder, enc_vars, tx, config.image_size, key), out_shardings=replicated)(
          encoder_variables, jax.random.PRNGKey(config.seed))
  return encoder, model, encoder_variables, state


class TrainedModel(NamedTuple):
  config: ml_collections.ConfigDict
  encoder: nn.Module
  model: ReverseDistillation
  variables: Any
  encoder_variables: Any
  step: int


def load_trained(workdir: str, checkpoint: str = "best") -> TrainedModel:
  """A trained model from a workdir (its config.json and checkpoints/<checkpoint>)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config = _load_config(workdir)
  manager = _checkpoint_manager(os.path.join(workdir, "checkpoints", checkpoint))
  if manager.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}; expected 'best' or "
                            "'latest' of a training run.")
  replicated = NamedSharding(step.data_mesh(), P())
  encoder, model, encoder_variables, state = _initial_state(config, replicated)
  state, _ = _restore(manager, state, manager.latest_step())
  return TrainedModel(config, encoder, model, step.variables_of(state), encoder_variables,
                      int(state.step))


class ScoringModel(NamedTuple):
  """Any trained model in the form the decision layer uses (`ccl_jax.decisions`)."""
  config: ml_collections.ConfigDict
  kind: str                # 'ccl' | 'rd' | 'hiercore'
  score_fn: Any            # fn(variables, encoder_variables, images, group_id)
  variables: Any           # model variables, or the HierCore memory bank
  encoder: nn.Module
  encoder_variables: Any


def load_scoring_model(workdir: str) -> ScoringModel:
  """A CCL/RD training run's best checkpoint or a HierCore memory bank, from its workdir."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config = _load_config(workdir)
  if config.model.get("kind", "reverse_distillation") != "hiercore":
    trained = load_trained(workdir)
    kind = "ccl" if loss_settings(trained.config).uses_augmented_view else "rd"
    return ScoringModel(trained.config, kind, decisions.group_agnostic(
        step.jit_predict(trained.model, trained.encoder)), trained.variables,
                        trained.encoder, trained.encoder_variables)
  path = os.path.join(workdir, MEMORY_BANK_FILE)
  bank = hiercore.MemoryBank.load(path)
  replicated = NamedSharding(step.data_mesh(), P())
  encoder, encoder_variables = _frozen_encoder(config, replicated)
  return ScoringModel(config, "hiercore", _hiercore_score_fn(config, encoder),
                      jax.device_put(bank, replicated), encoder, encoder_variables)


def _hiercore_score_fn(config: ml_collections.ConfigDict, encoder: nn.Module):
  return jax.jit(functools.partial(hiercore.predict, encoder=encoder,
                                   feature_dim=config.hiercore.feature_dim or None))


def _frozen_encoder(config: ml_collections.ConfigDict, replicated: NamedSharding):
  encoder = build_encoder(config.model.encoder, jnp.dtype(config.model.dtype))
  return encoder, jax.device_put(weights.encoder_variables(
      encoder, config.model.encoder_weights, seed=config.seed, image_size=config.image_size),
      replicated)


def _load_config(workdir: str) -> ml_collections.ConfigDict:
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found: {workdir!r} is not a ccl_jax workdir.")
  with open(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: int | None = None) -> dict[str, Any]:
  """Trains RD + CCL on `config`, evaluates the selected checkpoint, writes the workdir.

  `stop_after_steps` ends the run early (as a preemption would, after saving) and is used
  by tests of resumption; a rerun of the same command continues from the checkpoint.
  Returns the metrics summary (None for the metrics when stopped early).
  """
  if config.model.kind == "hiercore":
    return fit_hiercore(config, workdir)
  if config.model.kind != "reverse_distillation":
    raise ValueError(f"model.kind must be 'reverse_distillation' or 'hiercore', got "
                     f"{config.model.kind!r}.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of "
                     f"devices ({jax.device_count()}).")
  eval_batch_size = config.eval_batch_size or config.batch_size
  if eval_batch_size % jax.device_count():
    raise ValueError(f"eval_batch_size={eval_batch_size} must be divisible by the number of "
                     f"devices ({jax.device_count()}).")

  dataset = load_dataset(config, is_main)
  train_indices, val_indices = holdout_split(config, dataset)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(train_indices), config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  logging.info("Classes: %s | train %d (+%d validation) | test %d | %d steps/epoch",
               ", ".join(dataset.class_names), len(train_indices), len(val_indices),
               len(dataset.test), steps_per_epoch)

  mesh = step.data_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  encoder, model, encoder_variables, state = _initial_state(config, replicated)

  latest = _checkpoint_manager(os.path.join(workdir, "checkpoints", "latest"))
  best = _checkpoint_manager(os.path.join(workdir, "checkpoints", "best"))
  meta = {"best_validation_loss": None, "best_step": None, "epochs_without_improvement": 0,
          "history": [], "stopped_early": False}
  if latest.latest_step() is not None:
    state, meta = _restore(latest, state, latest.latest_step())
    logging.info("Resumed from %s at step %d.", latest.directory, int(state.step))
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  train_class_ids = dataset.train_class_ids[train_indices]
  if config.dataset.class_labels == "kmeans":
    train_class_ids, v_measure = pseudo_class_ids(
        encoder, encoder_variables, dataset, train_indices,
        num_classes=config.dataset.num_pseudo_classes, seed=config.seed,
        global_batch_size=eval_batch_size, batch_sharding=batch_sharding)
    meta["pseudo_classes"] = {"num_clusters": config.dataset.num_pseudo_classes,
                              "v_measure": v_measure}
    logging.info("K-means pseudo-classes: %d clusters, V-measure %.3f against the true classes.",
                 config.dataset.num_pseudo_classes, v_measure)
  elif config.dataset.class_labels != "true":
    raise ValueError("dataset.class_labels must be 'true' or 'kmeans', got "
                     f"{config.dataset.class_labels!r}.")

  train_step = step.jit_train_step(encoder, loss_settings(config))
  predict = step.jit_predict(model, encoder)
  first_step = int(state.step)
  batches = input_pipeline.train_batches(
      dataset.train, train_indices, train_class_ids,
      global_batch_size=config.batch_size, seed=config.seed, start_step=first_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=config.worker_count)
  last_step = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)

  def end_of_epoch(state, meta) -> bool:
    """Validation, early stopping and checkpoints; True when training should stop."""
    epoch = int(state.step) // steps_per_epoch
    record = {"epoch": epoch, "step": int(state.step)}
    if len(val_indices):
      loss = validation_loss(predict, step.variables_of(state), encoder_variables, dataset,
                             val_indices, global_batch_size=eval_batch_size,
                             batch_sharding=batch_sharding)
      record["validation_loss"] = loss
      if meta["best_validation_loss"] is None or loss < meta["best_validation_loss"]:
        meta.update(best_validation_loss=loss, best_step=int(state.step),
                    epochs_without_improvement=0)
        _save(best, state, meta)
      else:
        meta["epochs_without_improvement"] += 1
    if config.eval_every_epochs and epoch % config.eval_every_epochs == 0 and epoch < (
        config.num_epochs):
      summary, _ = inference.evaluate_test_set(predict, step.variables_of(state), encoder_variables,
                                     dataset, global_batch_size=eval_batch_size,
                                     batch_sharding=batch_sharding)
      record["test_mean"] = summary["mean"]
    meta["history"].append(record)
    logging.info("Epoch %d: %s", epoch, record)
    patience = config.early_stopping_patience
    stop = bool(patience) and meta["epochs_without_improvement"] >= patience
    meta["stopped_early"] = stop
    _save(latest, state, meta)
    return stop

  progress = tqdm.tqdm(total=total_steps, initial=first_step, disable=not is_main,
                       desc="train", unit="step", dynamic_ncols=True)
  pending: list[dict[str, jax.Array]] = []
  tick, tick_step = time.perf_counter(), first_step
  stopped = meta.get("stopped_early", False)
  step_number = first_step
  while step_number < last_step and not stopped:
    batch = input_pipeline.to_global_array(next(batches), batch_sharding)
    state, step_metrics = train_step(state, encoder_variables, batch)
    step_number += 1
    pending.append(step_metrics)
    at_epoch_end = step_number % steps_per_epoch == 0
    if len(pending) >= config.log_every_steps or at_epoch_end or step_number == last_step:
      # Reading metrics is the only host sync in the loop; NaNs are caught here.
      fetched = jax.device_get(pending)
      pending = []
      latest_values = {k: float(v) for k, v in fetched[-1].items()}
      for offset, values in enumerate(fetched):
        _check_finite(step_number - len(fetched) + offset + 1,
                      {k: float(v) for k, v in values.items()})
      now = time.perf_counter()
      images_per_second = (step_number - tick_step) * config.batch_size / (now - tick)
      tick, tick_step = now, step_number
      progress.set_postfix(loss=f"{latest_values['loss']:.4f}",
                           kd=f"{latest_values['kd']:.4f}", img_s=f"{images_per_second:.1f}")
      progress.update(len(fetched))
    if at_epoch_end:
      stopped = end_of_epoch(state, meta)
    elif config.checkpoint_every_steps and step_number % config.checkpoint_every_steps == 0:
      _save(latest, state, meta)
  progress.close()
  if step_number < total_steps and not stopped:
    _save(latest, state, meta)
    logging.info("Stopped at step %d of %d; rerun the same command to resume.", step_number,
                 total_steps)
    return {"metrics": None, "step": step_number}

  final = state
  if config.evaluate_checkpoint == "best" and best.latest_step() is not None:
    final, _ = _restore(best, state, best.latest_step())
    logging.info("Evaluating the best-validation checkpoint (step %d).", int(final.step))
  model_kind = "ccl" if loss_settings(config).uses_augmented_view else "rd"
  result, outputs = fit_and_evaluate_decisions(
      config, workdir, model_kind, decisions.group_agnostic(predict),
      step.variables_of(final), encoder, encoder_variables, dataset, train_indices,
      val_indices, batch_sharding=batch_sharding)
  result.update({"evaluated_step": int(final.step), "step": step_number,
                 "history": meta["history"], "pseudo_classes": meta.get("pseudo_classes")})
  if is_main:
    write_results(workdir, result, dataset, outputs, config.num_heatmaps_per_class)
  return result


def fit_hiercore(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """HierCore: groups, per-group patch coresets, thresholds and the test evaluation.

  Writes memory_bank.npz, decision.json, metrics.json, results.md and heatmaps/.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  dataset = load_dataset(config, is_main)
  train_indices, holdout_indices = holdout_split(config, dataset)
  mesh = step.data_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  global_batch_size = config.eval_batch_size or config.batch_size
  encoder, encoder_variables = _frozen_encoder(config, replicated)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  labels_at_training = config.dataset.class_labels == "true"
  embeddings = decisions.embeddings_of(encoder, encoder_variables, dataset.train, train_indices,
                                       global_batch_size=global_batch_size,
                                       batch_sharding=batch_sharding)
  train_class_ids = dataset.train_class_ids[train_indices] if labels_at_training else None
  groups = decisions.fit_training_groups(
      embeddings, train_class_ids, dataset.class_names, num_groups=config.decision.num_groups,
      max_groups=config.decision.max_groups, seed=config.seed)
  train_groups = decisions.evaluation_groups(groups, embeddings, train_class_ids,
                                             dataset.class_names)
  logging.info("HierCore: %d groups (%s).", groups.num_groups,
               "class labels" if groups.from_labels else "clusters")
  feature_dim = config.hiercore.feature_dim or None
  started = time.perf_counter()
  bank = hiercore.build_memory_bank(
      hiercore.make_patch_fn(encoder, encoder_variables, feature_dim=feature_dim),
      dataset.train, train_indices, train_groups, groups.num_groups,
      coreset_fraction=config.hiercore.coreset_fraction,
      chunk_images=config.hiercore.chunk_images, global_batch_size=global_batch_size,
      batch_sharding=batch_sharding, projection_dim=config.hiercore.projection_dim or None,
      seed=config.seed, worker_count=config.worker_count, progress=is_main)
  build_seconds = time.perf_counter() - started
  if is_main:
    bank.save(os.path.join(workdir, MEMORY_BANK_FILE))
  result, outputs = fit_and_evaluate_decisions(
      config, workdir, "hiercore", _hiercore_score_fn(config, encoder),
      jax.device_put(bank, replicated), encoder,
      encoder_variables, dataset, train_indices, holdout_indices,
      batch_sharding=batch_sharding, groups=groups)
  result["memory_bank"] = {"patches_per_group": bank.counts.tolist(),
                           "mib": bank.nbytes / 2**20, "build_seconds": build_seconds}
  if is_main:
    write_results(workdir, result, dataset, outputs, config.num_heatmaps_per_class)
  return result


MEMORY_BANK_FILE = "memory_bank.npz"


def holdout_split(config: ml_collections.ConfigDict, dataset) -> tuple[np.ndarray, np.ndarray]:
  """Training and held-out normal images. The hold-out (validation loss, thresholds) is
  stratified by class only when class labels are used at training."""
  labels_at_training = config.dataset.class_labels == "true"
  split_ids = (dataset.train_class_ids if labels_at_training
               else np.zeros_like(dataset.train_class_ids))
  return input_pipeline.holdout_split(split_ids, config.validation_fraction, config.seed)


def fit_and_evaluate_decisions(config: ml_collections.ConfigDict, workdir: str,
                               model_kind: str, score_fn, variables, encoder,
                               encoder_variables, dataset, train_indices: np.ndarray,
                               holdout_indices: np.ndarray, *, batch_sharding,
                               groups=None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Groups and class-wise thresholds (decision.json), then the test-set evaluation with
  threshold-free metrics and decisions (evaluation labels as at training)."""
  labels_at_training = config.dataset.class_labels == "true"
  global_batch_size = config.eval_batch_size or config.batch_size
  if not len(holdout_indices):
    logging.warning("validation_fraction=0: no held-out normal images, so no thresholds and "
                    "no decision.json; `python -m ccl_jax.predict` needs them.")
    summary, outputs = inference.evaluate_test_set(
        score_fn, variables, encoder_variables, dataset, global_batch_size=global_batch_size,
        batch_sharding=batch_sharding, worker_count=config.worker_count,
        per_image_inputs={"group_id": np.zeros(len(dataset.test), np.int32)})
    return {"metrics": summary, "classes": list(dataset.class_names)}, outputs
  groups, estimated, decision_meta = decisions.fit_decision(
      score_fn, variables, encoder, encoder_variables, dataset, train_indices, holdout_indices,
      labels_at_training=labels_at_training, num_groups=config.decision.num_groups,
      max_groups=config.decision.max_groups, rule=config.decision.rule,
      rule_params=dict(config.decision.rule_params), seed=config.seed,
      global_batch_size=global_batch_size, batch_sharding=batch_sharding, groups=groups)
  if jax.process_index() == 0:
    thresholds.save_decision(workdir, groups, estimated, dict(decision_meta, model=model_kind))
  result, outputs = decisions.evaluate_decisions(
      score_fn, variables, encoder, encoder_variables, dataset, groups, estimated,
      labels_at_evaluation=labels_at_training, global_batch_size=global_batch_size,
      batch_sharding=batch_sharding)
  result["classes"] = list(dataset.class_names)
  return result, outputs


def write_results(workdir: str, result: dict[str, Any], dataset, outputs: dict[str, np.ndarray],
                  num_heatmaps_per_class: int) -> None:
  """metrics.json, results.md (printed too) and heatmaps/ of an evaluation."""
  table = metrics.format_table(result["metrics"])
  if "classwise" in result:
    table += ("\n\nDecisions at the estimated thresholds (%; P precision, R recall, FAR "
              "false-alarm rate):\n\n" + decisions.format_decision_table(result))
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "metrics.json"), result)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  save_heatmaps(os.path.join(workdir, "heatmaps"), dataset, outputs, num_heatmaps_per_class)
  print(table, flush=True)


# The paper's all-in-all setting (60 classes).
ALL_IN_ALL = ("mvtec_ad", "visa", "btad", "real_iad")


def load_dataset(config: ml_collections.ConfigDict, is_main: bool):
  """One dataset, or a mixture when dataset.name lists several ('mvtec_ad,visa' or
  'all_in_all'); a mixture takes one comma-separated manual_dir per dataset, in order, and
  classes as 'all' or qualified names ('mvtec_ad/bottle,visa/pcb1')."""
  names = _split(config.dataset.name)
  names = list(ALL_IN_ALL) if names == ["all_in_all"] else names
  data_dir = os.path.expanduser(config.dataset.data_dir)
  if len(names) == 1:
    load = lambda: datasets.load(
        names[0], classes=_classes(config.dataset.classes),
        manual_dir=config.dataset.manual_dir or None, data_dir=data_dir,
        image_size=config.image_size)
  else:
    # Empty entries stay: '' asks the synthetic dataset to generate itself.
    manual_dirs = [m.strip() for m in str(config.dataset.manual_dir).split(",")]
    if len(manual_dirs) != len(names):
      raise ValueError(f"dataset.name lists {len(names)} datasets ({', '.join(names)}) but "
                       f"dataset.manual_dir has {len(manual_dirs)} entries "
                       f"({config.dataset.manual_dir!r}); give one per dataset, "
                       "comma-separated, in the same order.")
    classes = _classes(config.dataset.classes)
    per_dataset = {n: "all" for n in names}
    if classes != "all":
      # A mixture selects classes by qualified name, 'dataset/class'.
      per_dataset = {n: [] for n in names}
      for qualified in classes:
        prefix, _, name = qualified.partition("/")
        if prefix not in per_dataset or not name:
          raise ValueError(f"dataset.classes entry {qualified!r}: for a mixture write "
                           f"'<dataset>/<class>' with <dataset> one of {names}.")
        per_dataset[prefix].append(name)
    parts = [{"name": n, "manual_dir": m or None, "classes": per_dataset[n]}
             for n, m in zip(names, manual_dirs) if per_dataset[n]]
    load = lambda: datasets.load_mixture(parts, data_dir=data_dir,
                                         image_size=config.image_size)
  # Process 0 prepares missing data; the others wait and then only read.
  if is_main:
    dataset = load()
  multihost_utils.sync_global_devices("ccl_jax dataset prepared")
  if not is_main:
    dataset = load()
  return dataset


def _split(value: str) -> list[str]:
  return [v.strip() for v in str(value).split(",") if v.strip()]


def _classes(value: Any) -> str | tuple[str, ...]:
  if isinstance(value, str):
    return "all" if value == "all" else tuple(_split(value))
  return tuple(value)


def _write_json(path: str, value: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(x: Any):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  raise TypeError(f"Not JSON serialisable: {type(x)}")

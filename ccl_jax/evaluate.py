r"""Scores a test set with a run directory's model or with imported variables, no training.

A run directory (CCL, RD or HierCore; its decision.json, when present, adds the decisions):

  python -m ccl_jax.evaluate --workdir ~/runs/demo

writes metrics.json, results.md, heatmaps/, report.html and events/ into <workdir>/eval.
Imported checkpoints (see data_prep/convert_weights.py), e.g. an RD4AD model on MVTec AD:

  python -m ccl_jax.evaluate --config configs/mvtec_ad.py:rd --workdir ~/runs/rd4ad_eval \
      --variables rd4ad.msgpack \
      --config.model.encoder_weights=wide_resnet50_2.msgpack \
      --config.model.projector=off --config.model.neck_width_per_group=0 \
      --config.dataset.manual_dir=/data/mvtec_anomaly_detection

(RD4AD: no projector, neck width = the encoder's; the authors' CCL checkpoints: the default
CCL config with --variables ccl.msgpack and the converted teacher as encoder_weights.)
writes them into --workdir and prints the table.
"""
from __future__ import annotations

import os
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from ccl_jax.config import settings as settings_lib
from ccl_jax.evaluation import decide
from ccl_jax.results import writing
from ccl_jax.runtime import inference
from ccl_jax.weights import variable_files
from ccl_jax.datasets import selection
from ccl_jax.runs.run_dir import DECISION_FILE, METRICS_FILE, RunDir
from ccl_jax.ccl.detector import restored_rd_detector
from ccl_jax.runs.loading import load_detector


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  config_flags.DEFINE_config_file("config", None, "Config file (for --variables).",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "The run directory to evaluate, or (with --variables) "
                      "the output directory.", flag_values=flag_values)
  flags.DEFINE_string("variables", None, "Flax msgpack file of the model's variables "
                      "(projector/neck/decoder params and batch_stats).",
                      flag_values=flag_values)
  flags.mark_flags_as_required(["workdir"], flag_values=flag_values)


def evaluate_variables(run_settings: settings_lib.RunSettings, workdir: str,
                       variables_path: str) -> dict[str, Any]:
  """Metrics of imported variables on the settings' test set, written into `workdir`."""
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=jax.process_index() == 0)
  detector = restored_rd_detector(
      run_settings, inference.replicated_sharding(),
      lambda template: variable_files.load(variables_path, template, "--variables"))
  summary, outputs = decide.evaluate_test_set(
      detector, dataset, decide.one_group(dataset),
      global_batch_size=run_settings.global_eval_batch_size,
      batch_sharding=inference.batch_sharding(),
      heatmaps_per_class=run_settings.num_heatmaps_per_class)
  result = {"metrics": summary, "variables": os.path.abspath(variables_path),
            "classes": list(dataset.class_names)}
  if jax.process_index() == 0:
    writing.write_results(RunDir(workdir), result, dataset, outputs, run_settings)
  return result


def evaluate_workdir(workdir: str) -> dict[str, Any]:
  """Metrics (and decisions, with a decision.json) of a run directory's model, written
  into its `eval/` folder."""
  run_dir = RunDir(workdir)
  run_settings = run_dir.read_settings()
  detector = load_detector(workdir)
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=jax.process_index() == 0)
  batch_sharding = inference.batch_sharding()
  global_batch_size = run_settings.global_eval_batch_size
  if run_dir.exists(DECISION_FILE):
    groups, estimated, _ = run_dir.read_decision()
    result, outputs = decide.evaluate_decisions(
        detector, dataset, groups, estimated,
        labels_at_evaluation=run_settings.dataset.labels_at_training,
        global_batch_size=global_batch_size, batch_sharding=batch_sharding,
        heatmaps_per_class=run_settings.num_heatmaps_per_class)
  else:
    summary, outputs = decide.evaluate_test_set(
        detector, dataset, decide.one_group(dataset),
        global_batch_size=global_batch_size, batch_sharding=batch_sharding,
        heatmaps_per_class=run_settings.num_heatmaps_per_class)
    result = {"metrics": summary}
  result.update({"evaluated_step": detector.checkpoint_step,
                 "classes": list(dataset.class_names)})
  if run_dir.exists(METRICS_FILE):  # the training curves, for eval/report.html
    trained = run_dir.read_metrics()
    result.update({key: trained[key] for key in ("history", "training_log") if key in trained})
  if jax.process_index() == 0:
    writing.write_results(RunDir(os.path.join(run_dir.path, "eval")), result, dataset,
                            outputs, run_settings)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flags.FLAGS.variables:
    if flags.FLAGS.config is None:
      raise app.UsageError("--variables needs --config (the architecture and the data).")
    evaluate_variables(settings_lib.from_config(flags.FLAGS.config), flags.FLAGS.workdir,
                       flags.FLAGS.variables)
  else:
    evaluate_workdir(flags.FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)

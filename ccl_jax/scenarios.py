r"""The four label scenarios of multi-class anomaly detection, for one model, in one command.

  python -m ccl_jax.scenarios --config configs/demo.py --workdir /tmp/ccl_scenarios
  python -m ccl_jax.scenarios --config configs/demo.py:hiercore --workdir /tmp/hc_scenarios

Class labels present or absent at training (CCL: true classes or K-means pseudo-classes for
the contrastive losses; every model: groups from labels or from clustering) x present or
absent at evaluation (a test image goes to its class's group, or to the nearest group; see
ccl_jax/evaluation/decide.py). The model is trained (or its memory bank built) once per training
scenario, in <workdir>/labels_at_training and <workdir>/no_labels_at_training; a rerun
resumes or reuses them. For each of the four scenarios it reports the threshold-free
metrics (image/pixel AUROC, AUPRO, ...) and the decisions at class-wise and class-agnostic
thresholds estimated from normal training images (per-class precision, recall, F1,
false-alarm rate, threshold efficiency, their mean and spread over classes). Writes
<workdir>/scenarios.json and <workdir>/scenarios.md and prints the table.
"""
from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ccl_jax.training import runner
from ccl_jax.evaluation import decide
from ccl_jax.runtime import inference
from ccl_jax.config import settings as settings_lib
from ccl_jax.datasets import selection
from ccl_jax.runtime.files import atomic_write
from ccl_jax.runs.run_dir import RunDir, to_json
from ccl_jax.runs.loading import load_detector

TRAINING_SCENARIOS = {"labels_at_training": "true", "no_labels_at_training": "kmeans"}


def run_scenarios(run_settings: settings_lib.RunSettings, workdir: str) -> dict:
  """Trains/builds per training scenario, then evaluates both evaluation scenarios."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  batch_sharding = inference.batch_sharding()
  rows = {}
  for name, class_labels in TRAINING_SCENARIOS.items():
    scenario_settings = run_settings.replace(**{"dataset.class_labels": class_labels})
    run_path = os.path.join(workdir, name)
    logging.info("Scenario %s: model in %s", name, run_path)
    runner.run(scenario_settings, run_path)
    detector = load_detector(run_path)
    groups, estimated, _ = RunDir(run_path).read_decision()
    dataset = selection.load_selected(scenario_settings.dataset,
                                      image_size=scenario_settings.image_size,
                                      is_main=jax.process_index() == 0)
    for labels_at_evaluation in (True, False):
      result, _ = decide.evaluate_decisions(
          detector, dataset, groups, estimated, labels_at_evaluation=labels_at_evaluation,
          global_batch_size=scenario_settings.global_eval_batch_size,
          batch_sharding=batch_sharding)
      key = f"{name}/{'labels' if labels_at_evaluation else 'no_labels'}_at_evaluation"
      rows[key] = dict(result, model=detector.name, num_groups=groups.num_groups)
  if jax.process_index() == 0:
    atomic_write(os.path.join(workdir, "scenarios.json"), to_json(rows))
    table = format_scenarios(rows)
    atomic_write(os.path.join(workdir, "scenarios.md"), table + "\n")
    print(table, flush=True)
  return rows


def format_scenarios(rows: dict) -> str:
  """One markdown row per scenario: means over classes, F1 and false-alarm spread (std)."""
  header = ("| model | training | evaluation | groups | routing V | I-AUROC | P-AUROC | AUPRO "
            "| F1 class-wise | FAR class-wise | Eff class-wise | F1 agnostic | FAR agnostic "
            "| F1 std class-wise | F1 std agnostic |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for key, row in rows.items():
    training, evaluation = key.split("/")
    mean = row["metrics"]["mean"]
    cw, ag = row["classwise"], row["agnostic"]
    values = [mean["image_auroc"], mean["pixel_auroc"], mean["aupro"], cw["mean"]["f1"],
              cw["mean"]["false_alarm_rate"], cw["mean"]["threshold_efficiency"],
              ag["mean"]["f1"], ag["mean"]["false_alarm_rate"],
              cw["spread"]["f1"]["std"], ag["spread"]["f1"]["std"]]
    lines.append("| " + " | ".join(
        [row["model"], training.replace("_at_training", ""),
         evaluation.replace("_at_evaluation", ""), str(row["num_groups"]),
         f"{row['routing']['v_measure']:.2f}"] + [f"{100 * v:.1f}" for v in values]) + " |")
  return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  config_flags.DEFINE_config_file("config", None, "Config file of the model.",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (one sub-directory per training "
                      "scenario).", flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run_scenarios(settings_lib.from_config(flags.FLAGS.config), flags.FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)

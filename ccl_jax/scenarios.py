r"""The four label scenarios of multi-class anomaly detection, for one model, in one command.

  python -m ccl_jax.scenarios --config configs/demo.py --workdir /tmp/ccl_scenarios
  python -m ccl_jax.scenarios --config configs/demo.py:hiercore --workdir /tmp/hc_scenarios

Class labels present or absent at training (CCL: true classes or K-means pseudo-classes for
the contrastive losses; every model: groups from labels or from clustering) x present or
absent at evaluation (a test image goes to its class's group, or to the nearest group; see
ccl_jax/decisions.py). The model is trained (or its memory bank built) once per training
scenario, in <workdir>/labels_at_training and <workdir>/no_labels_at_training; a rerun
resumes or reuses them. For each of the four scenarios it reports the threshold-free
metrics (image/pixel AUROC, AUPRO, ...) and the decisions at class-wise and class-agnostic
thresholds estimated from normal held-out training images (per-class precision, recall, F1,
false-alarm rate, their mean and spread over classes). Writes <workdir>/scenarios.json and
<workdir>/scenarios.md and prints the table.
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from ccl_jax import decisions, step, thresholds, train

FLAGS = flags.FLAGS

TRAINING_SCENARIOS = {"labels_at_training": "true", "no_labels_at_training": "kmeans"}


def run_scenarios(config, workdir: str) -> dict:
  """Trains/builds per training scenario, then evaluates both evaluation scenarios."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  batch_sharding = NamedSharding(step.data_mesh(), P("data"))
  rows = {}
  for name, class_labels in TRAINING_SCENARIOS.items():
    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
      run_config.dataset.class_labels = class_labels
    run_dir = os.path.join(workdir, name)
    logging.info("Scenario %s: model in %s", name, run_dir)
    train.train_and_evaluate(run_config, run_dir)
    scoring = train.load_scoring_model(run_dir)
    groups, estimated, _ = thresholds.load_decision(run_dir)
    dataset = train.load_dataset(scoring.config, jax.process_index() == 0)
    for labels_at_evaluation in (True, False):
      result, _ = decisions.evaluate_decisions(
          scoring.score_fn, scoring.variables, scoring.encoder, scoring.encoder_variables,
          dataset, groups, estimated, labels_at_evaluation=labels_at_evaluation,
          global_batch_size=scoring.config.eval_batch_size or scoring.config.batch_size,
          batch_sharding=batch_sharding)
      key = f"{name}/{'labels' if labels_at_evaluation else 'no_labels'}_at_evaluation"
      rows[key] = dict(result, model=scoring.kind, num_groups=groups.num_groups)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "scenarios.json"), "w") as f:
      json.dump(rows, f, indent=2, default=float)
    table = format_scenarios(rows)
    with open(os.path.join(workdir, "scenarios.md"), "w") as f:
      f.write(table + "\n")
    print(table, flush=True)
  return rows


def format_scenarios(rows: dict) -> str:
  """One markdown row per scenario: means over classes, F1 and false-alarm spread (std)."""
  header = ("| model | training | evaluation | groups | routing V | I-AUROC | P-AUROC | AUPRO "
            "| F1 class-wise | FAR class-wise | F1 agnostic | FAR agnostic "
            "| F1 std class-wise | F1 std agnostic |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for key, row in rows.items():
    training, evaluation = key.split("/")
    mean = row["metrics"]["mean"]
    cw, ag = row["classwise"], row["agnostic"]
    values = [mean["image_auroc"], mean["pixel_auroc"], mean["aupro"], cw["mean"]["f1"],
              cw["mean"]["false_alarm_rate"], ag["mean"]["f1"], ag["mean"]["false_alarm_rate"],
              cw["spread"]["f1"]["std"], ag["spread"]["f1"]["std"]]
    lines.append("| " + " | ".join(
        [row["model"], training.replace("_at_training", ""),
         evaluation.replace("_at_evaluation", ""), str(row["num_groups"]),
         f"{row['routing']['v_measure']:.2f}"] + [f"{100 * v:.1f}" for v in values]) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run_scenarios(FLAGS.config, FLAGS.workdir)


def define_flags() -> None:
  """Defined when the program runs, not on import: ccl_jax.main and ccl_jax.evaluate define
  the same names, and tests import all of them into one process."""
  config_flags.DEFINE_config_file("config", None, "Config file of the model.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (one sub-directory per training "
                      "scenario).")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  define_flags()
  app.run(main)

"""What an evaluation leaves for people: metrics.json, results.md (printed too), heatmap
figures, report.html and the final TensorBoard events, through the run directory
(`ccl_jax.runs.run_dir`, the one writer of a run's files)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ccl_jax.config.settings import RunSettings
from ccl_jax.results import events, metrics, report, visualize
from ccl_jax.results.decision_metrics import RATE_METRICS

if TYPE_CHECKING:
  from ccl_jax.runs.run_dir import RunDir


def write_results(run_dir: RunDir, result: dict[str, Any], dataset,
                  outputs: dict[str, np.ndarray], run_settings: RunSettings) -> None:
  """metrics.json, results.md (printed too), heatmaps/, report.html and the final
  TensorBoard events of an evaluation.

  A metric that could not be computed is null in metrics.json (JSON has no NaN) and
  `metrics.skipped[class][metric]` says why; results.md lists the same below its table.
  The settings' warnings (`RunSettings.warnings`) head both files.
  """
  if run_settings.warnings:
    result = {"warnings": list(run_settings.warnings), **result}
  table = metrics.format_table(result["metrics"])
  skipped = metrics.format_skipped(result["metrics"])
  if skipped:
    table += "\n\n" + skipped
  if "classwise" in result:
    alpha = result["classwise"].get("alpha")
    nominal = f", nominal {100 * alpha:.1f}" if alpha is not None else ""
    table += ("\n\nDecisions at the estimated thresholds (%; P precision, R recall, FAR "
              f"false-alarm rate{nominal}; Eff threshold efficiency = F1 / F1-max; n normal "
              "scores that set the threshold):\n\n" + format_decision_table(result))
  table = "".join(f"**Warning:** {w}\n\n" for w in run_settings.warnings) + table
  run_dir.write_results(_nan_to_none(result), table,
                        heatmap_figures(dataset, outputs, run_settings.num_heatmaps_per_class))
  gallery = report.gallery(dataset, outputs)
  run_dir.write_report(report.build_html(result, dataset, outputs, gallery, run_dir.path))
  writer = run_dir.event_writer()
  events.log_results(writer, result.get("evaluated_step") or 0, result,
                     report.worst_per_class(gallery))
  writer.close()
  print(table, flush=True)


def _nan_to_none(value):
  if isinstance(value, dict):
    return {k: _nan_to_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_nan_to_none(v) for v in value]
  if isinstance(value, (float, np.floating)) and np.isnan(value):
    return None
  return value


def heatmap_rows(positions: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
  """The test positions, among one class's (`positions`, their `labels`), that get a
  heatmap figure: up to `per_class` anomalous ones of different defect types, one normal."""
  if positions.size == 0 or per_class <= 0:
    return np.zeros(0, np.int64)
  anomalous = positions[labels == 1]
  # Test images are stored grouped by defect type: evenly spaced picks cover the types.
  picks = np.unique(np.linspace(0, len(anomalous) - 1, min(per_class, len(anomalous)))
                    .round().astype(int)) if len(anomalous) else np.zeros(0, int)
  normal = positions[labels == 0][:1]
  return np.concatenate([anomalous[picks], normal]).astype(np.int64)


def heatmap_figures(dataset, outputs: dict[str, Any],
                    per_class: int) -> list[tuple[str, str, np.ndarray]]:
  """(class, file stem, figure) for the `heatmap_rows` of each class, from the maps that
  outputs['views'] kept."""
  views = outputs["views"]
  figures = []
  for class_id, name in enumerate(dataset.class_names):
    rows = np.flatnonzero(dataset.test_class_ids == class_id)
    for r in heatmap_rows(rows, outputs["label"][rows], per_class):
      record = dataset.test[int(r)]
      stem = os.path.splitext(record["file_name"].replace("/", "_"))[0]
      figures.append((name, stem, visualize.heatmap_figure(
          record["image"], views.masks[int(r)], views.maps[int(r)],
          *views.ranges[class_id])))
  return figures


def figure_rows(positions: np.ndarray, scores: np.ndarray, labels: np.ndarray, *,
                heatmaps_per_class: int, image_thresholds: np.ndarray | None
                ) -> np.ndarray:
  """The test positions of one class's images (`positions`, their `scores` and `labels`)
  that `heatmap_figures` and `report.gallery` show."""
  return np.union1d(
      heatmap_rows(positions, labels, heatmaps_per_class),
      report.gallery_rows(positions, scores, labels,
                          None if image_thresholds is None else image_thresholds[positions]))


def format_decision_table(result: dict[str, Any]) -> str:
  """Markdown table of decisions per class at class-wise and class-agnostic thresholds."""
  header = ["class"] + [f"{c} ({kind})" for kind in ("class-wise", "agnostic")
                        for c in ("P", "R", "F1", "FAR", "Eff", "n")]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

  def row(name, classwise, agnostic):
    cells = [name]
    for block in (classwise, agnostic):
      cells += ["n/a" if block[c] is None or np.isnan(block[c]) else f"{100 * block[c]:.1f}"
                for c in RATE_METRICS]
      cells.append(str(block.get("threshold_support", "")))
    return "| " + " | ".join(cells) + " |"

  classwise, agnostic = result["classwise"], result["agnostic"]
  for name in classwise["per_class"]:
    lines.append(row(name, classwise["per_class"][name], agnostic["per_class"][name]))
  lines.append(row("**mean**", classwise["mean"], agnostic["mean"]))
  lines.append(row("spread (std)", {c: classwise["spread"][c]["std"] for c in RATE_METRICS},
                   {c: agnostic["spread"][c]["std"] for c in RATE_METRICS}))
  table = "\n".join(lines)
  # Both blocks decide on the same images, so a rate is undefined for the same classes.
  skipped = metrics.format_skipped(classwise)
  return table + "\n\n" + skipped if skipped else table

"""report.html: one self-contained page of what a run did.

The metrics tables (every metric metrics.json holds, per class and mean, with the reasons
for those that could not be computed), the decisions at the class-wise and agnostic
thresholds, each class's test-score distributions of normal and defective images with
both thresholds drawn in, the training curves, and a gallery of heatmaps with the worst
misses first. Everything is in the one file: images are base64 data URIs, charts are inline
SVG drawn here, so the page opens offline, can be mailed, and needs no plotting library.
Every number shown is the run's own (the result that metrics.json stores, the scores
and thresholds of its test images); nothing is recomputed here.

A small inline script records, on load, JavaScript errors and images that failed to
render into the `data-load-check` attribute of <html>; the browser test reads it.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ccl_jax.results import metrics, visualize

# Bounds the file (a few MB at 256 px): the worst cases of each class, not all of them.
GALLERY_PER_CLASS = 6
_HISTOGRAM_BINS = 24
_NORMAL_COLOUR, _DEFECT_COLOUR = "#2b6cb0", "#c53030"
_CURVES = (("loss", "total loss"), ("kd", "KD loss"), ("local", "local contrastive loss"),
           ("global", "global contrastive loss"), ("grad_norm", "gradient norm"),
           ("images_per_second", "images/s"))

_LOAD_CHECK = """<script>
(function() {
  var errors = [];
  window.onerror = function(message, source, line) {
    errors.push(String(message) + " (line " + line + ")");
  };
  window.addEventListener("load", function() {
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function(img) { return !img.complete || img.naturalWidth === 0; });
    document.documentElement.setAttribute("data-load-check", JSON.stringify(
        {errors: errors, images: images.length, broken: broken.length}));
  });
})();
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; margin: 24px; color: #1a202c; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #cbd5e0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #cbd5e0; padding: 3px 7px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; background: #edf2f7; }
td.na { color: #a0aec0; }
p.warning { background: #fff5f5; border: 1px solid #c53030; color: #c53030; padding: 8px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0 0 12px 0; }
figcaption { font-size: 12px; }
img.heatmap { height: 256px; image-rendering: pixelated; border: 1px solid #cbd5e0; }
ul.reasons { font-size: 13px; }
</style>"""


@dataclasses.dataclass(frozen=True)
class GalleryItem:
  """One test image of the gallery; `threshold` None when the run has no decisions."""
  class_name: str
  file_name: str
  label: int
  score: float
  threshold: float | None
  figure: np.ndarray  # [H, 3W, 3] uint8: image | ground-truth contour | anomaly map


def gallery_rows(positions: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                 thresholds: np.ndarray | None, per_class: int = GALLERY_PER_CLASS
                 ) -> np.ndarray:
  """The gallery's test positions among one class's (`positions`, their `scores`, `labels`
  and `thresholds`), worst miss first: defective images scored furthest below their
  threshold and normal images furthest above it. Without thresholds (no decision.json) the
  class's median score stands in for one."""
  if not positions.size:
    return positions
  reference = thresholds if thresholds is not None else np.full(scores.size,
                                                                np.median(scores))
  # How far each image lies on the wrong side of the reference (negative: decided right).
  wrongness = np.where(labels == 1, reference - scores, scores - reference)
  return positions[np.argsort(-wrongness, kind="stable")[:per_class]]


def gallery(dataset, outputs: Mapping[str, Any],
            per_class: int = GALLERY_PER_CLASS) -> list[GalleryItem]:
  """Up to `per_class` test images per class (`gallery_rows`), from the maps that
  outputs['views'] (`ccl_jax.evaluation.streaming.Views`) kept."""
  views = outputs["views"]
  has_thresholds = "threshold" in outputs
  items = []
  for class_id, name in enumerate(dataset.class_names):
    rows = np.flatnonzero(dataset.test_class_ids == class_id)
    scores, labels = outputs["score"], outputs["label"]
    for row in gallery_rows(rows, scores[rows], labels[rows],
                            outputs["threshold"][rows] if has_thresholds else None,
                            per_class).tolist():
      record = dataset.test[row]
      items.append(GalleryItem(
          name, record["file_name"], int(labels[row]), float(scores[row]),
          float(outputs["threshold"][row]) if has_thresholds else None,
          visualize.heatmap_figure(record["image"], views.masks[row], views.maps[row],
                                   *views.ranges[class_id])))
  return items


def worst_per_class(items: Sequence[GalleryItem]) -> list[tuple[str, np.ndarray]]:
  """(class, figure) of the first (worst) gallery image of each class."""
  seen: dict[str, np.ndarray] = {}
  for item in items:
    seen.setdefault(item.class_name, item.figure)
  return list(seen.items())


def _is_undefined(value: Any) -> bool:
  return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _cell(column: str, value: Any) -> str:
  """Rates and metrics (fractions) in percent; thresholds as they are; counts whole."""
  if _is_undefined(value):
    return "n/a"
  if isinstance(value, (bool, int, np.integer)):
    return str(int(value))
  if column == "threshold_mean":  # a score, not a rate (threshold_efficiency is a rate)
    return f"{value:.4g}"
  return f"{100 * value:.1f}"


def _table(rows: Mapping[str, Mapping[str, Any]], mean: Mapping[str, Any] | None,
           skipped: Mapping[str, Mapping[str, str]], table_id: str) -> str:
  """Every key of the rows as a column (so new metrics appear without changes here)."""
  columns: list[str] = []
  for row in [*rows.values(), *([mean] if mean else [])]:
    columns.extend(k for k in row if k not in columns)
  lines = [f'<table id="{table_id}"><tr><th>class</th>'
           + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
  named = [(name, row, "") for name, row in rows.items()]
  if mean:
    named.append(("mean", mean, ' class="mean"'))
  for name, row, row_class in named:
    cells = []
    for column in columns:
      if column not in row:  # e.g. counts, which have no mean
        cells.append("<td></td>")
        continue
      value = row[column]
      reason = (skipped.get(name) or {}).get(column, "")
      attributes = (f' data-class="{html.escape(name)}" data-metric="{html.escape(column)}"'
                    f' data-value="{"null" if _is_undefined(value) else repr(float(value))}"')
      if _is_undefined(value):
        attributes += f' class="na" title="{html.escape(reason)}"'
      cells.append(f"<td{attributes}>{_cell(column, value)}</td>")
    lines.append(f"<tr{row_class}><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
  lines.append("</table>")
  return "\n".join(lines)


def _reasons(block: Mapping[str, Any]) -> str:
  """The reasons for the n/a cells of a block (metrics or decisions), as results.md has
  them."""
  text = metrics.format_skipped(block)
  if not text:
    return ""
  header, _, *items = text.split("\n")
  return (f"<p>{html.escape(header)}</p><ul class=\"reasons\">"
          + "".join(f"<li>{html.escape(item[2:])}</li>" for item in items) + "</ul>")


def _histogram(title: str, normal: np.ndarray, defective: np.ndarray,
               lines: Sequence[tuple[str, float]], width: int = 380, height: int = 170) -> str:
  """Overlaid histograms of two score sets with vertical threshold lines (kind, value)."""
  values = np.concatenate([normal, defective, [v for _, v in lines]])
  low, high = float(np.min(values)), float(np.max(values))
  high = high if high > low else low + 1.0
  edges = np.linspace(low, high, _HISTOGRAM_BINS + 1)
  counts = [np.histogram(s, edges)[0] for s in (normal, defective)]
  top = max(1, max(int(c.max()) if c.size else 0 for c in counts))
  left, right, plot_top, bottom = 34, width - 8, 22, height - 30
  x_of = lambda v: left + (v - low) / (high - low) * (right - left)  # noqa: E731
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'class="histogram" data-class="{html.escape(title)}">',
           f'<text x="{left}" y="14" font-size="13" font-weight="bold">'
           f'{html.escape(title)}</text>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#4a5568"/>']
  bin_width = (right - left) / _HISTOGRAM_BINS
  for bin_counts, colour in zip(counts, (_NORMAL_COLOUR, _DEFECT_COLOUR)):
    for i, count in enumerate(bin_counts):
      if count:
        bar = (bottom - plot_top) * count / top
        parts.append(f'<rect x="{left + i * bin_width:.1f}" y="{bottom - bar:.1f}" '
                     f'width="{bin_width:.1f}" height="{bar:.1f}" fill="{colour}" '
                     'fill-opacity="0.55"/>')
  for kind, value in lines:
    x = x_of(value)
    dash = ' stroke-dasharray="5,3"' if kind == "agnostic" else ""
    parts.append(f'<line x1="{x:.1f}" y1="{plot_top}" x2="{x:.1f}" y2="{bottom}" '
                 f'stroke="#1a202c" stroke-width="2"{dash} class="threshold" '
                 f'data-kind="{kind}" data-value="{value!r}"><title>{kind} threshold '
                 f'{value:.4g}</title></line>')
  parts += [f'<text x="{left}" y="{height - 14}" font-size="11">{low:.3g}</text>',
            f'<text x="{right}" y="{height - 14}" font-size="11" text-anchor="end">'
            f'{high:.3g}</text>',
            f'<text x="{(left + right) / 2}" y="{height - 2}" font-size="11" '
            'text-anchor="middle">image score</text>',
            f'<text x="4" y="{plot_top + 8}" font-size="11">{top}</text>', "</svg>"]
  return "".join(parts)


def _line_chart(title: str, xs: Sequence[float], ys: Sequence[float],
                width: int = 300, height: int = 150) -> str:
  left, right, plot_top, bottom = 46, width - 8, 22, height - 24
  x_low, x_high = min(xs), max(xs)
  y_low, y_high = min(ys), max(ys)
  x_span, y_span = (x_high - x_low) or 1.0, (y_high - y_low) or 1.0
  points = [(left + (x - x_low) / x_span * (right - left),
             bottom - (y - y_low) / y_span * (bottom - plot_top)) for x, y in zip(xs, ys)]
  polyline = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
  # Markers too, so that a curve of one point (one epoch) shows.
  markers = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{_NORMAL_COLOUR}"/>'
                    for x, y in points)
  return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
          f'class="curve"><text x="{left}" y="14" font-size="13" font-weight="bold">'
          f'{html.escape(title)}</text>'
          f'<rect x="{left}" y="{plot_top}" width="{right - left}" height="{bottom - plot_top}" '
          'fill="none" stroke="#cbd5e0"/>'
          f'<polyline points="{polyline}" fill="none" stroke="{_NORMAL_COLOUR}" '
          f'stroke-width="1.5"/>{markers}'
          f'<text x="{left - 3}" y="{plot_top + 9}" font-size="10" text-anchor="end">'
          f'{y_high:.3g}</text><text x="{left - 3}" y="{bottom}" font-size="10" '
          f'text-anchor="end">{y_low:.3g}</text>'
          f'<text x="{left}" y="{height - 8}" font-size="10">step {x_low:g}</text>'
          f'<text x="{right}" y="{height - 8}" font-size="10" text-anchor="end">{x_high:g}'
          "</text></svg>")


def _curves(result: Mapping[str, Any]) -> str:
  log = result.get("training_log") or []
  charts = [_line_chart(title, [r["step"] for r in log], [r[key] for r in log])
            for key, title in _CURVES if log and key in log[0]]
  validation = [r for r in result.get("history") or [] if "validation_loss" in r]
  if validation:
    charts.append(_line_chart("validation KD loss (held-out normals)",
                              [r["step"] for r in validation],
                              [r["validation_loss"] for r in validation]))
  if not charts:
    return "<p>No training curves: this model was not trained by this run.</p>"
  return '<div class="charts">' + "".join(charts) + "</div>"


def _distributions(dataset, outputs: Mapping[str, np.ndarray]) -> str:
  charts = []
  for class_id, name in enumerate(dataset.class_names):
    rows = dataset.test_class_ids == class_id
    if not rows.any():
      continue
    scores, labels = outputs["score"][rows], outputs["label"][rows]
    lines = []
    for kind, key in (("classwise", "threshold"), ("agnostic", "agnostic_threshold")):
      if key in outputs:
        lines += [(kind, float(t)) for t in np.unique(outputs[key][rows])]
    charts.append(_histogram(name, scores[labels == 0], scores[labels == 1], lines))
  legend = (f'<p><span style="color:{_NORMAL_COLOUR}">&#9632; normal</span> '
            f'<span style="color:{_DEFECT_COLOUR}">&#9632; defective</span> test images; '
            "solid line: class-wise threshold, dashed: class-agnostic threshold; an image is "
            "flagged when its score is above the line.</p>")
  return legend + '<div class="charts">' + "".join(charts) + "</div>"


def _data_uri(figure: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(figure).save(buffer, format="JPEG", quality=90)
  return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _gallery_html(items: Sequence[GalleryItem]) -> str:
  if not items:
    return "<p>No test images.</p>"
  parts, current = [], None
  for item in items:
    if item.class_name != current:
      current = item.class_name
      parts.append(f"<h3>{html.escape(current)}</h3>")
    kind = "defective" if item.label else "normal"
    if item.threshold is None:
      verdict = ""
    else:
      flagged = item.score > item.threshold
      verdict = ("missed" if item.label and not flagged else
                 "false alarm" if flagged and not item.label else "correct")
      verdict = f", threshold {item.threshold:.4g}: <b>{verdict}</b>"
    parts.append(f'<figure><img class="heatmap" src="{_data_uri(item.figure)}" '
                 f'alt="{html.escape(item.file_name)}"><figcaption>'
                 f"{html.escape(item.file_name)} ({kind}), score {item.score:.4g}{verdict}"
                 "</figcaption></figure>")
  return "".join(parts)


def build_html(result: Mapping[str, Any], dataset, outputs: Mapping[str, np.ndarray],
               items: Sequence[GalleryItem], title: str) -> str:
  """The page of an evaluation `result` (as written to metrics.json, before NaN -> null),
  its per-image `outputs` (score, label, and with decisions the 'threshold' and
  'agnostic_threshold' each image was decided at), and the `gallery` items."""
  summary = result["metrics"]
  sections = [f"<h1>{html.escape(title)}</h1>"]
  sections += [f"<p class=\"warning\"><strong>Warning:</strong> {html.escape(w)}</p>"
               for w in result.get("warnings", ())]
  facts = {key: result[key] for key in ("evaluated_step", "step") if result.get(key) is not None}
  facts["classes"] = len(summary["per_class"])
  facts["test images"] = int(len(outputs["score"]))
  sections.append("<p>" + ", ".join(f"{html.escape(k)}: {v}" for k, v in facts.items())
                  + "</p>")
  sections.append("<h2>Metrics (%)</h2>")
  sections.append(_table(summary["per_class"], summary["mean"], summary.get("skipped") or {},
                         "metrics"))
  sections.append(_reasons(summary))
  if summary.get("per_dataset"):
    sections += ["<h3>Means per dataset</h3>",
                 _table(summary["per_dataset"], None, {}, "per_dataset")]
  for key, heading in (("classwise", "Decisions at the class-wise thresholds"),
                       ("agnostic", "Decisions at the class-agnostic threshold")):
    if key in result:
      block = result[key]
      sections.append(f"<h2>{heading} (rates in %)</h2>")
      sections.append(_table(block["per_class"], block["mean"], block.get("skipped") or {},
                             key))
      sections.append(_reasons(block))
  if "routing" in result:
    sections.append("<p>Routing: " + ", ".join(
        f"{html.escape(k)} {v:.3g}" for k, v in result["routing"].items()) + "</p>")
  sections += ["<h2>Score distributions of the test images</h2>",
               _distributions(dataset, outputs),
               "<h2>Training curves</h2>", _curves(result),
               "<h2>Heatmaps, worst misses first</h2>",
               "<p>Each: image | ground truth (red contour) | anomaly map (one colour scale "
               "per class).</p>", _gallery_html(items)]
  return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title>{_LOAD_CHECK}{_STYLE}</head><body>\n"
          + "\n".join(sections) + "\n</body></html>\n")

r"""Export a trained detector for deployment: a self-contained model directory.

  python -m ccl_jax.export --workdir ~/runs/demo --output ~/models/demo [--format jax,onnx]
  python -m ccl_jax.export --workdir ~/runs/demo --output ~/models/demo_int8 \
      --format openvino --precision int8

Writes the run's inference functions (routing embedding; anomaly maps and image scores:
encoder + neck + decoder + map for CCL / RD, the routed group's nearest-neighbour scoring
for HierCore) and its groups and thresholds into --output, in the layout `ccl_jax.deploy.loader`
describes and loads with jax and numpy only:

* jax: `jax.export` (StableHLO) with a symbolic batch dimension; the weights are arguments,
  stored once in weights.npz (closing over them as constants makes each function carry its
  own copy; benchmarks/README.md compares the two).
* onnx: the same functions as ONNX graphs (`ccl_jax.deploy.jaxpr_onnx`), for ONNX Runtime.
  Needs the export extra: pip install -e ".[export]".
* openvino: the ONNX graphs converted to OpenVINO IR (float32 weights kept as they are),
  for OpenVINO's CPU runtime. Needs the openvino extra: pip install -e ".[openvino]".

--precision bf16 or int8 (with --format openvino only) writes a reduced-precision model:
bf16 runs the IR in bfloat16 (refused on a CPU without BF16 support), int8 quantises the
score graph with NNCF post-training quantisation, calibrated on the run's training images
(the routing embedding stays float32). Either way the thresholds are estimated again, by
the run's rule, from the scores of the same held-out normal images through the
reduced-precision model, and the test set is scored at both precisions: the manifest's
'precision_check' holds I-AUROC, P-AUROC, AUPRO and the class-wise false-alarm rate and
recall at float32 and at the reduced precision (printed too). HierCore runs whose
thresholds came from leave-one-out scores are refused: the exported graph scores against
the whole bank, so it cannot reproduce those normal scores.

The folder is written beside --output and renamed into place whole. An existing --output
that holds another model (another run or checkpoint), or anything that is not a model, is
refused unless --overwrite; re-exporting the same run's checkpoint replaces it.
"""
from __future__ import annotations

import importlib.metadata
import io
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ccl_jax.decisions import grouping
from ccl_jax.deploy import loader
from ccl_jax.evaluation import decide
from ccl_jax.runtime import inference
from ccl_jax.datasets import selection
from ccl_jax.runtime import files as files_lib
from ccl_jax.runtime.files import atomic_directory, atomic_write
from ccl_jax.decisions.grouping import Groups
from ccl_jax.models import input_normalisation
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.decisions.thresholds import Thresholds
from ccl_jax.models.detector import Detector
from ccl_jax.runs.loading import load_detector


class ExportError(ValueError):
  """An export that cannot go ahead as asked; the message says what to do."""


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def parse_formats(text: str) -> tuple[str, ...]:
  formats = tuple(f.strip() for f in text.split(",") if f.strip())
  unknown = sorted(set(formats) - set(loader.BACKENDS))
  if not formats or unknown:
    raise ExportError(f"--format {text!r}: expected a comma-separated subset of "
                      f"{','.join(loader.BACKENDS)}.")
  needed = {"onnx": [("onnx", "export")],
            "openvino": [("onnx", "export"), ("openvino", "openvino")]}
  for fmt in formats:
    for package, extra in needed.get(fmt, []):
      try:
        importlib.import_module(package)
      except ImportError:
        raise ExportError(f'--format {fmt} needs the {package} package: pip install -e '
                          f'".[{extra}]" (or export with --format jax).') from None
  return formats


def check_precision(precision: str, formats: Sequence[str]) -> None:
  """Refuses a reduced precision with other formats than openvino, or one this CPU lacks."""
  if precision not in loader.PRECISIONS:
    raise ExportError(f"--precision {precision!r}: expected one of "
                      f"{', '.join(loader.PRECISIONS)}.")
  if precision == "f32":
    return
  if tuple(formats) != ("openvino",):
    raise ExportError(f"--precision {precision} applies to the OpenVINO model only, and its "
                      "thresholds are those of that precision: export it with --format "
                      "openvino alone (and the float32 formats into another --output).")
  try:
    loader.check_cpu_precision(precision)
  except loader.UnsupportedPrecisionError as err:
    raise ExportError(f"--precision {precision}: {err}") from None
  if precision == "int8":
    try:
      importlib.import_module("nncf")
    except ImportError:
      raise ExportError('--precision int8 needs the nncf package: pip install -e '
                        '".[openvino]".') from None


def check_output(output: str, source: dict[str, Any], overwrite: bool) -> None:
  """Refuses an --output that holds anything but an export of the same `source`."""
  if overwrite or not os.path.exists(output):
    return
  if not os.path.isdir(output):
    raise ExportError(f"--output {output!r} is a file, not a folder; choose another path.")
  if not os.listdir(output):
    return
  manifest_path = os.path.join(output, loader.MANIFEST_FILE)
  try:
    with open(manifest_path, encoding="utf-8") as f:
      previous = json.load(f).get("source")
  except (OSError, ValueError, AttributeError):
    previous = None
  if previous != source:
    what = (f"the export of {previous}" if previous else "files that are not an exported "
            "model")
    raise ExportError(f"--output {output!r} holds {what}; this export is of {source}. "
                      "Choose another --output, or pass --overwrite to replace it.")


def _serialize(fn, specs: Sequence[Any]) -> tuple[bytes, int]:
  """(jax.export bytes, calling convention version) of jitted `fn` at `specs`."""
  exported_fn = jax.export.export(jax.jit(fn))(*specs)
  return bytes(exported_fn.serialize()), exported_fn.calling_convention_version


def input_specs(weights: Sequence[np.ndarray], image_size: int, function: str) -> list[Any]:
  """Abstract arguments of `function` with a symbolic batch dimension 'b'."""
  (batch,) = jax.export.symbolic_shape("b")
  specs = [[jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
           jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)]
  if function == "score":
    specs.append(jax.ShapeDtypeStruct((batch,), jnp.int32))
  return specs


def export_model(workdir: str, output: str, formats: Sequence[str] = ("jax", "onnx"), *,
                 checkpoint: str = "best", overwrite: bool = False,
                 precision: str = "f32") -> dict[str, Any]:
  """Writes the model directory `output` of a run (module docstring); returns its manifest."""
  check_precision(precision, formats)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  output = os.path.abspath(os.path.expanduser(output))
  run = RunDir(workdir)
  groups, thresholds, decision_meta = run.read_decision()
  run_settings = run.read_settings()
  hiercore = run_settings.model.kind == "hiercore"
  if precision != "f32" and decision_meta.get("threshold_source", "holdout") != "holdout":
    raise ExportError(
        f"--precision {precision}: {workdir}'s thresholds came from "
        f"{decision_meta.get('threshold_source')} scores, which the exported graph cannot "
        "reproduce (it scores against the whole memory bank), so they cannot be estimated "
        "again at this precision. Export it at --precision f32, or run HierCore with held-out "
        "thresholds (hiercore.cross_fitted=False).")
  # Checked before the model is built, as the slow part comes after.
  source = {"workdir": workdir, "model_kind": run_settings.model_name,
            "checkpoint": None if hiercore else checkpoint,
            "step": None if hiercore else run.checkpoint_step(checkpoint)}
  check_output(output, source, overwrite)
  detector = load_detector(workdir, checkpoint=checkpoint)
  if precision == "f32":
    return write_model(detector, groups, thresholds, output, formats, source=source)
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=True)
  train_indices, holdout_indices = selection.training_split(run_settings, dataset)
  calibration = (calibration_batches(detector, groups, dataset.train, train_indices)
                 if precision == "int8" else None)

  def rethreshold(model: loader.ExportedModel) -> tuple[Thresholds, dict[str, Any]]:
    return precision_check(detector, model, run_settings, dataset, groups, thresholds,
                           train_indices, holdout_indices)
  return write_model(detector, groups, thresholds, output, formats, source=source,
                     precision=precision, calibration=calibration, rethreshold=rethreshold)


# NNCF's default calibration subset size.
CALIBRATION_IMAGES = 300


def calibration_batches(detector: Detector, groups: Groups, source,
                        indices: np.ndarray) -> list[dict[str, np.ndarray]]:
  """Up to CALIBRATION_IMAGES of `source[indices]` (evenly spaced), one image per item,
  each in the group it is routed to, as inputs of the score graph."""
  picks = indices[np.linspace(0, len(indices) - 1, min(CALIBRATION_IMAGES, len(indices)))
                  .astype(int)]
  images = np.stack([source[int(i)]["image"] for i in picks])
  group_ids = grouping.route(groups, np.asarray(detector.embed(images)))
  return [{"images": images[k:k + 1], "group_ids": np.asarray(group_ids[k:k + 1], np.int32)}
          for k in range(len(images))]


PRECISION_METRICS = (("metrics", "image_auroc"), ("metrics", "pixel_auroc"),
                     ("metrics", "aupro"), ("classwise", "false_alarm_rate"),
                     ("classwise", "recall"))


def precision_check(detector: Detector, model: loader.ExportedModel,
                    run_settings, dataset, groups: Groups, f32_thresholds: Thresholds,
                    train_indices: np.ndarray, holdout_indices: np.ndarray
                    ) -> tuple[Thresholds, dict[str, Any]]:
  """`model`'s thresholds from the held-out normal images' scores through it, and the
  test-set metrics (class means, %) of `detector` (float32, the run's thresholds) and of
  `model` (its own thresholds), per PRECISION_METRICS."""
  common = {"global_batch_size": run_settings.global_eval_batch_size,
            "batch_sharding": inference.batch_sharding()}
  labels = run_settings.dataset.labels_at_training
  _, reduced_thresholds, _ = decide.fit_decision(
      model, dataset, train_indices, holdout_indices, labels_at_training=labels,
      decision=run_settings.decision, seed=run_settings.seed, groups=groups, **common)
  results = {}
  for name, scorer, cutoffs in (("f32", detector, f32_thresholds),
                                (model.precision, model, reduced_thresholds)):
    results[name], _ = decide.evaluate_decisions(
        scorer, dataset, groups, cutoffs, labels_at_evaluation=labels, **common)
  report: dict[str, Any] = {"test_images": len(dataset.test), "mean_over_classes": {}}
  for part, metric in PRECISION_METRICS:
    values = {name: 100 * float(result[part]["mean"][metric])
              for name, result in results.items()}
    values["change_points"] = values[model.precision] - values["f32"]
    report["mean_over_classes"][f"{part}/{metric}"] = values
  report["largest_class_change_points"] = {
      f"{part}/{metric}": max(
          (abs(100 * (results[model.precision][part]["per_class"][c][metric]
                      - results["f32"][part]["per_class"][c][metric]))
           for c in results["f32"][part]["per_class"]), default=0.0)
      for part, metric in PRECISION_METRICS}
  return reduced_thresholds, report


def _openvino_model(onnx_path: str, function: str, precision: str,
                    calibration: list[dict[str, np.ndarray]] | None):
  """The ONNX graph at `onnx_path` as an OpenVINO model; `score` quantised by NNCF for
  int8."""
  import openvino  # pylint: disable=import-outside-toplevel
  model = openvino.Core().read_model(onnx_path)
  if precision != "int8" or function != "score":
    return model
  import nncf  # pylint: disable=import-outside-toplevel
  return nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration))


def write_model(detector: Detector, groups: Groups, thresholds: Thresholds,
                output: str, formats: Sequence[str], *, source: dict[str, Any],
                precision: str = "f32",
                calibration: list[dict[str, np.ndarray]] | None = None,
                rethreshold: Callable[[loader.ExportedModel],
                                      tuple[Thresholds, dict[str, Any]]] | None = None
                ) -> dict[str, Any]:
  """Writes `detector` with its `groups` and `thresholds` as the model directory `output`,
  replacing it whole; returns the manifest. `source` says where the model came from.
  `precision` 'int8' quantises the OpenVINO score graph on the `calibration` inputs;
  `rethreshold(model)` gives the thresholds and precision report of a reduced-precision
  model (loaded from the written files) for its manifest."""
  weights, embed, score = detector.pure_functions()
  mean, std = input_normalisation(detector.encoder)
  manifest: dict[str, Any] = {
      "format_version": loader.FORMAT_VERSION, "model_kind": detector.name,
      "image_size": detector.image_size, "precision": precision,
      "input": {"dtype": "uint8", "layout": "NHWC (batch, height, width, RGB)",
                "normalisation": {"mean": list(mean), "std": list(std),
                                  "applied": "inside the model, to image / 255"}},
      "groups": groups.to_json(), "thresholds": thresholds.to_json(), "source": source,
      "versions": {"jax": jax.__version__, "jaxlib": _version("jaxlib"),
                   "ccl_jax": _version("ccl_jax")},
      "functions": {}, "files": {}}
  with atomic_directory(output) as tmp:
    files: dict[str, str] = {}
    if "jax" in formats:
      buffer = io.BytesIO()
      np.savez(buffer, **{f"{i:05d}": w for i, w in enumerate(weights)})
      files[loader.WEIGHTS_FILE] = atomic_write(os.path.join(tmp, loader.WEIGHTS_FILE),
                                                  buffer.getvalue())
    for name, fn in (("embed", embed), ("score", score)):
      entry = {"inputs": list(loader.INPUTS[name]), "outputs": list(loader.OUTPUTS[name])}
      specs = input_specs(weights, detector.image_size, name)
      if "jax" in formats:
        data, entry["calling_convention_version"] = _serialize(fn, specs)
        file_name = loader.function_file(name, "jax")
        files[file_name] = atomic_write(os.path.join(tmp, file_name), data)
      if "onnx" in formats or "openvino" in formats:
        from ccl_jax.deploy import jaxpr_onnx
        model = jaxpr_onnx.convert(lambda *args, fn=fn: fn(weights, *args), specs[1:],
                                    loader.INPUTS[name], loader.OUTPUTS[name])
        manifest["versions"]["onnx_opset"] = jaxpr_onnx.OPSET
        # OpenVINO reads the graph from this file; without --format onnx it goes again.
        onnx_path = os.path.join(tmp, loader.function_file(name, "onnx"))
        atomic_write(onnx_path, model.SerializeToString())
        if "openvino" in formats:
          import openvino  # pylint: disable=import-outside-toplevel
          manifest["versions"]["openvino"] = openvino.__version__
          xml_path = os.path.join(tmp, loader.function_file(name, "openvino"))
          openvino.save_model(_openvino_model(onnx_path, name, precision, calibration),
                              xml_path, compress_to_fp16=False)
          for file_name in loader.function_files(name, "openvino"):
            files[file_name] = os.path.join(tmp, file_name)
        if "onnx" in formats:
          files[loader.function_file(name, "onnx")] = onnx_path
        else:
          os.remove(onnx_path)
      manifest["functions"][name] = entry
    manifest["files"] = {name: {"sha256": loader.sha256_file(path),
                                "bytes": os.path.getsize(path)}
                         for name, path in sorted(files.items())}
    manifest_path = os.path.join(tmp, loader.MANIFEST_FILE)
    atomic_write(manifest_path, json.dumps(manifest, indent=1))
    if rethreshold is not None:
      reduced_thresholds, manifest["precision_check"] = rethreshold(
          loader.load(tmp, "openvino"))
      manifest["thresholds"] = reduced_thresholds.to_json()
      atomic_write(manifest_path, json.dumps(manifest, indent=1))
  return manifest


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  fv = flag_values
  flags.DEFINE_string("workdir", None, "Training (or HierCore) run with a decision.json.",
                      flag_values=fv)
  flags.DEFINE_string("output", None, "Model directory to write.", flag_values=fv)
  flags.DEFINE_string("format", "jax,onnx", "Comma-separated: jax (jax.export), onnx, "
                      "openvino (OpenVINO IR).", flag_values=fv)
  flags.DEFINE_enum("precision", "f32", list(loader.PRECISIONS), "Arithmetic of the "
                    "OpenVINO model: f32, bf16 or int8 (NNCF, calibrated on the run's "
                    "training images); reduced precisions re-estimate the thresholds and "
                    "report the metric changes.", flag_values=fv)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint of a "
                    "training run to export.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace --output even when it holds another "
                    "model or other files.", flag_values=fv)
  flags.mark_flags_as_required(["workdir", "output"], flag_values=fv)


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
  formats = parse_formats(flag_values.format)
  return export_model(flag_values.workdir, flag_values.output, formats,
                      checkpoint=flag_values.checkpoint, overwrite=flag_values.overwrite,
                      precision=flag_values.precision)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with files_lib.storage_failures_end_the_program(
      lambda: f"{flags.FLAGS.output} was left as it was."):
    manifest = run(flags.FLAGS)
  sizes = ", ".join(f"{name} {entry['bytes'] / 1e6:.1f} MB"
                    for name, entry in manifest["files"].items())
  print(f"Exported {manifest['model_kind']} ({manifest['source']['workdir']}) to "
        f"{flags.FLAGS.output} at {manifest['precision']}: {sizes}", flush=True)
  check = manifest.get("precision_check")
  if check:
    print(f"Test set ({check['test_images']} images), class means, %:")
    for metric, values in check["mean_over_classes"].items():
      print(f"  {metric:28s} f32 {values['f32']:6.2f}  {manifest['precision']} "
            f"{values[manifest['precision']]:6.2f}  change {values['change_points']:+.2f} "
            f"(largest class change {check['largest_class_change_points'][metric]:.2f})",
            flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)

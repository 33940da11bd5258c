r"""Export a trained detector for deployment: a self-contained model directory.

  python -m ccl_jax.export --workdir ~/runs/demo --output ~/models/demo [--format jax,onnx]

Writes the run's inference functions (routing embedding; anomaly maps and image scores:
encoder + neck + decoder + map for CCL / RD, the routed group's nearest-neighbour scoring
for HierCore) and its groups and thresholds into --output, in the layout `ccl_jax.deploy.loader`
describes and loads with jax and numpy only:

* jax: `jax.export` (StableHLO) with a symbolic batch dimension; the weights are arguments,
  stored once in weights.npz (closing over them as constants makes each function carry its
  own copy; benchmarks/README.md compares the two).
* onnx: the same functions as ONNX graphs (`ccl_jax.deploy.jaxpr_onnx`), for ONNX Runtime.
  Needs the export extra: pip install -e ".[export]".

The folder is written beside --output and renamed into place whole. An existing --output
that holds another model (another run or checkpoint), or anything that is not a model, is
refused unless --overwrite; re-exporting the same run's checkpoint replaces it.
"""
from __future__ import annotations

import importlib.metadata
import io
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ccl_jax.deploy import loader
from ccl_jax.runtime import files
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
  if "onnx" in formats:
    try:
      import onnx  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise ExportError('--format onnx needs the onnx package: pip install -e ".[export]" '
                        "(or export with --format jax).") from None
  return formats


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
                 checkpoint: str = "best", overwrite: bool = False) -> dict[str, Any]:
  """Writes the model directory `output` of a run (module docstring); returns its manifest."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  output = os.path.abspath(os.path.expanduser(output))
  run = RunDir(workdir)
  groups, thresholds, _ = run.read_decision()
  run_settings = run.read_settings()
  hiercore = run_settings.model.kind == "hiercore"
  # Checked before the model is built, as the slow part comes after.
  source = {"workdir": workdir, "model_kind": run_settings.model_name,
            "checkpoint": None if hiercore else checkpoint,
            "step": None if hiercore else run.checkpoint_step(checkpoint)}
  check_output(output, source, overwrite)
  detector = load_detector(workdir, checkpoint=checkpoint)
  return write_model(detector, groups, thresholds, output, formats, source=source)


def write_model(detector: Detector, groups: Groups, thresholds: Thresholds,
                output: str, formats: Sequence[str], *, source: dict[str, Any]
                ) -> dict[str, Any]:
  """Writes `detector` with its `groups` and `thresholds` as the model directory `output`,
  replacing it whole; returns the manifest. `source` says where the model came from."""
  weights, embed, score = detector.pure_functions()
  mean, std = input_normalisation(detector.encoder)
  manifest: dict[str, Any] = {
      "format_version": loader.FORMAT_VERSION, "model_kind": detector.name,
      "image_size": detector.image_size,
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
      if "onnx" in formats:
        from ccl_jax.deploy import jaxpr_onnx as onnx_export
        model = onnx_export.convert(lambda *args, fn=fn: fn(weights, *args), specs[1:],
                                    loader.INPUTS[name], loader.OUTPUTS[name])
        manifest["versions"]["onnx_opset"] = onnx_export.OPSET
        file_name = loader.function_file(name, "onnx")
        files[file_name] = atomic_write(os.path.join(tmp, file_name),
                                        model.SerializeToString())
      manifest["functions"][name] = entry
    manifest["files"] = {name: {"sha256": loader.sha256_file(path),
                                "bytes": os.path.getsize(path)}
                         for name, path in sorted(files.items())}
    atomic_write(os.path.join(tmp, loader.MANIFEST_FILE), json.dumps(manifest, indent=1))
  return manifest


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  fv = flag_values
  flags.DEFINE_string("workdir", None, "Training (or HierCore) run with a decision.json.",
                      flag_values=fv)
  flags.DEFINE_string("output", None, "Model directory to write.", flag_values=fv)
  flags.DEFINE_string("format", "jax,onnx", "Comma-separated: jax (jax.export), onnx.",
                      flag_values=fv)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint of a "
                    "training run to export.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace --output even when it holds another "
                    "model or other files.", flag_values=fv)
  flags.mark_flags_as_required(["workdir", "output"], flag_values=fv)


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
  formats = parse_formats(flag_values.format)
  return export_model(flag_values.workdir, flag_values.output, formats,
                      checkpoint=flag_values.checkpoint, overwrite=flag_values.overwrite)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with files.storage_failures_end_the_program(
      lambda: f"{flags.FLAGS.output} was left as it was."):
    manifest = run(flags.FLAGS)
  sizes = ", ".join(f"{name} {entry['bytes'] / 1e6:.1f} MB"
                    for name, entry in manifest["files"].items())
  print(f"Exported {manifest['model_kind']} ({manifest['source']['workdir']}) to "
        f"{flags.FLAGS.output}: {sizes}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)

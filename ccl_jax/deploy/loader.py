"""A model directory written by `python -m ccl_jax.export`, loaded with jax and numpy only.

  model = exported.load("~/models/demo")             # or backend="onnx" (onnxruntime),
                                                     # backend="openvino" (OpenVINO)
  embeddings = model.embed(images)                   # [B, D] routing embeddings
  maps, scores = model.score(images, group_ids)      # [B, S, S], [B]

`images` are uint8 RGB [B, S, S, 3] (S = `model.image_size`, resized bilinearly as
`ccl_jax.predict` does); the normalisation the encoder expects happens inside the model.
Any batch size works (the functions were serialised with a symbolic batch dimension).
An image's group, as `ccl_jax.decisions.grouping.route` picks it: the row of
manifest['groups']['centroids'] (unit vectors) with the largest dot product with the
L2-normalised embedding; its thresholds are manifest['thresholds'].

This module imports nothing of ccl_jax, flax, optax or orbax (a test runs it with those
blocked), so a line PC needs only `pip install jax numpy` (plus onnxruntime for the ONNX
backend, openvino for the OpenVINO one). `ccl_jax.predict --model` uses it to give the
same rows as the workdir mode.

The directory (every file listed in manifest.json with its SHA-256, checked on load):
  manifest.json     FORMAT_VERSION, model kind, image size, input normalisation, the
                    groups (names, centroids) and thresholds (per group, class-agnostic) of
                    the run's decision.json, the versions that wrote it, and the files
  weights.npz       the model's arrays, a flat list ('0000', '0001', ...) in the order
                    the serialised functions take them
  embed.jaxexport   jax.export of embed(weights, images) (StableHLO)
  score.jaxexport   jax.export of score(weights, images, group_ids)
  embed.onnx        the same functions as ONNX graphs (weights inside, opset in the
  score.onnx        manifest), when exported with --format ...,onnx
  embed.xml/.bin    the ONNX graphs converted to OpenVINO IR (float32 weights; score's
  score.xml/.bin    quantised to INT8 for precision 'int8'), with --format ...,openvino

manifest['precision'] (absent: 'f32') is the arithmetic of the model's functions: 'f32',
'bf16' (OpenVINO's CPU plugin computes in bfloat16; only on CPUs that support it) or
'int8' (score.xml quantised by NNCF, calibrated on the run's training images). A
reduced-precision model holds only the OpenVINO files, and its thresholds were estimated
from the scores of the same normal images through that precision (`ccl_jax.export`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.npz"
FUNCTIONS = ("embed", "score")
BACKENDS = ("jax", "onnx", "openvino")
# The first file of each backend is the one its runtime opens.
FILE_EXTENSIONS = {"jax": (".jaxexport",), "onnx": (".onnx",), "openvino": (".xml", ".bin")}
PRECISIONS = ("f32", "bf16", "int8")
OPENVINO_PRECISION_HINTS = {"f32": "f32", "bf16": "bf16", "int8": "f32"}
# Inputs and outputs of the serialised functions, by name (the ONNX graphs use these).
INPUTS = {"embed": ("images",), "score": ("images", "group_ids")}
OUTPUTS = {"embed": ("embedding",), "score": ("anomaly_map", "score")}


class ModelDirError(ValueError):
  """A model directory that cannot be used as it is; the message says what to do."""


class Scores(NamedTuple):
  """What every model's `score` returns (a `ccl_jax.models.detector.Detector`'s: jax
  arrays; an exported model's: numpy arrays)."""
  anomaly_maps: Any  # [B, S, S] float32
  image_scores: Any  # [B] float32, the maximum of each map


def function_file(function: str, backend: str) -> str:
  return function + FILE_EXTENSIONS[backend][0]


def function_files(function: str, backend: str) -> list[str]:
  """Every file of `function` on `backend` (OpenVINO's IR is a graph and its weights)."""
  return [function + extension for extension in FILE_EXTENSIONS[backend]]


class UnsupportedPrecisionError(ValueError):
  """A precision this CPU cannot compute in; the message says which to use instead."""


def cpu_capabilities() -> list[str]:
  """OpenVINO's CPU plugin's OPTIMIZATION_CAPABILITIES here (e.g. FP32, INT8, BF16)."""
  import openvino  # pylint: disable=import-outside-toplevel  # the OpenVINO backend only
  return list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_cpu_precision(precision: str, capabilities: list[str] | None = None) -> None:
  """Raises UnsupportedPrecisionError unless OpenVINO's CPU plugin computes `precision`
  natively on a CPU with `capabilities` (default: this one's). bf16 needs AVX-512 BF16 or
  AMX; without them OpenVINO would compute in float32 without saying so."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
  if capabilities is None:
    capabilities = cpu_capabilities()
  needed = {"bf16": "BF16", "int8": "INT8"}.get(precision)
  if needed and needed not in capabilities:
    raise UnsupportedPrecisionError(
        f"precision {precision!r}: this CPU has no {needed} support in OpenVINO (its "
        f"capabilities: {', '.join(capabilities)}); use precision 'f32'"
        + (" or 'int8'" if "INT8" in capabilities else "") + ", or run on a CPU with "
        f"{needed} (bf16: AVX-512 BF16 or AMX).")


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_manifest(model_dir: str) -> dict[str, Any]:
  """The validated manifest of `model_dir`; every listed file exists with its SHA-256."""
  path = os.path.join(model_dir, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise ModelDirError(f"{path} not found: {model_dir!r} is not a model directory (python "
                        "-m ccl_jax.export --workdir RUN --output MODEL_DIR writes one).")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ModelDirError(f"{path}: not valid JSON ({err}); export the model again.") from None
  if not isinstance(manifest, dict):
    raise ModelDirError(f"{path}: top level must be a JSON object; export the model again.")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ModelDirError(
        f"{path}: format_version is {version!r}; this code reads version {FORMAT_VERSION}. "
        "Export the model again with this ccl_jax version, or load it with the ccl_jax "
        f"version that wrote it ({manifest.get('versions', {}).get('ccl_jax', 'unknown')}).")
  for key in ("model_kind", "image_size", "files", "functions", "groups", "thresholds"):
    if key not in manifest:
      raise ModelDirError(f"{path}: missing key {key!r}; export the model again.")
  for name, entry in manifest["files"].items():
    file_path = os.path.join(model_dir, name)
    if not os.path.isfile(file_path):
      raise ModelDirError(f"{file_path} is missing (listed in {path}); copy the whole model "
                          "directory, or export the model again.")
    if sha256_file(file_path) != entry["sha256"]:
      raise ModelDirError(f"{file_path} is corrupted: its SHA-256 differs from the one in "
                          f"{path}. Copy it again from the exported model, or export again.")
  return manifest


def _read_weights(model_dir: str) -> list[np.ndarray]:
  with np.load(os.path.join(model_dir, WEIGHTS_FILE), allow_pickle=False) as data:
    return [np.asarray(data[key]) for key in sorted(data.files)]


def _deserialize(model_dir: str, manifest: dict[str, Any], function: str):
  """The jax.export.Exported of `function`; an incompatible serialisation is an error
  naming the jax versions."""
  path = os.path.join(model_dir, function_file(function, "jax"))
  written_by = manifest.get("versions", {}).get("jax", "unknown")
  version = manifest["functions"].get(function, {}).get("calling_convention_version")
  low = jax.export.minimum_supported_calling_convention_version
  high = jax.export.maximum_supported_calling_convention_version
  if not isinstance(version, int) or not low <= version <= high:
    raise ModelDirError(
        f"{path}: serialised with calling convention version {version} (jax {written_by}); "
        f"jax {jax.__version__} reads versions {low} to {high}. Install jax=={written_by}, or "
        "export the model again with this jax.")
  with open(path, "rb") as f:
    serialized = f.read()
  try:
    return jax.export.deserialize(bytearray(serialized))
  except Exception as err:  # noqa: BLE001 - flatbuffers/MLIR raise assorted types
    raise ModelDirError(
        f"{path}: jax {jax.__version__} cannot deserialise it ({type(err).__name__}: {err}); "
        f"it was written by jax {written_by}. Install that version, or export again."
    ) from err


class ExportedModel:
  """The functions of a model directory on one backend ('jax', 'onnx' or 'openvino')."""

  def __init__(self, model_dir: str, backend: str = "jax", num_threads: int | None = None,
               onnx_config: dict[str, str] | None = None):
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    self.model_dir = os.path.abspath(os.path.expanduser(model_dir))
    self.manifest = read_manifest(self.model_dir)
    self.backend = backend
    self.name = self.manifest["model_kind"]
    self.image_size = int(self.manifest["image_size"])
    self.precision = self.manifest.get("precision", "f32")
    missing = [f for f in FUNCTIONS if function_file(f, backend) not in self.manifest["files"]]
    if missing:
      raise ModelDirError(
          f"{self.model_dir} has no {backend} export of {', '.join(missing)} (it holds "
          f"{', '.join(sorted(self.manifest['files']))}); export it with --format "
          f"{backend}, or use another backend.")
    if backend == "jax":
      weights = [jax.device_put(w) for w in _read_weights(self.model_dir)]
      self._functions = {}
      for function in FUNCTIONS:
        call = jax.jit(_deserialize(self.model_dir, self.manifest, function).call)
        self._functions[function] = (
            lambda *args, call=call: tuple(
                np.asarray(x) for x in jax.tree_util.tree_leaves(call(weights, *args))))
    elif backend == "onnx":
      self._functions = {f: _onnx_function(os.path.join(self.model_dir, function_file(f, "onnx")),
                                           f, num_threads, onnx_config or {})
                         for f in FUNCTIONS}
    else:
      self._functions = {f: openvino_function(
          os.path.join(self.model_dir, function_file(f, "openvino")), f, self.precision,
          num_threads) for f in FUNCTIONS}

  def embed(self, images: np.ndarray) -> np.ndarray:
    """Routing embeddings [B, D] of uint8 images [B, S, S, 3]."""
    self._check_images(images)
    return self._functions["embed"](images)[0]

  def score(self, images: np.ndarray, group_ids: np.ndarray) -> Scores:
    """Anomaly maps and image scores of uint8 images [B, S, S, 3] in groups `group_ids`
    [B] (ignored by CCL / RD: one model for every class)."""
    self._check_images(images)
    group_ids = np.asarray(group_ids, np.int32)
    if group_ids.shape != (images.shape[0],):
      raise ValueError(f"group_ids must be [{images.shape[0]}], got shape {group_ids.shape}.")
    return Scores(*self._functions["score"](images, group_ids))

  def _check_images(self, images: np.ndarray) -> None:
    shape = (self.image_size, self.image_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
      raise ValueError(f"{self.name} model: expected uint8 images [B, {self.image_size}, "
                       f"{self.image_size}, 3], got {images.dtype} {tuple(images.shape)}.")


def _onnx_function(path: str, function: str, num_threads: int | None,
                   config: dict[str, str]):
  import onnxruntime  # pylint: disable=import-outside-toplevel  # the ONNX backend only
  options = onnxruntime.SessionOptions()
  for key, value in config.items():
    options.add_session_config_entry(key, value)
  options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
  if num_threads:
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
  session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  inputs, outputs = INPUTS[function], list(OUTPUTS[function])
  return lambda *args: tuple(session.run(outputs, dict(zip(inputs, args))))


def openvino_function(path: str, function: str, precision: str, num_threads: int | None):
  """`function`'s IR at `path` compiled by OpenVINO's CPU plugin to compute in `precision`
  (stated, not left to the plugin's default, which is bf16 on CPUs with AMX)."""
  import openvino  # pylint: disable=import-outside-toplevel  # the OpenVINO backend only
  check_cpu_precision(precision)
  core = openvino.Core()
  config = {"PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINTS[precision]}
  if num_threads:
    config["INFERENCE_NUM_THREADS"] = num_threads
  compiled = core.compile_model(core.read_model(path), "CPU", config)
  request = compiled.create_infer_request()
  inputs = INPUTS[function]
  outputs = [compiled.output(name) for name in OUTPUTS[function]]

  def call(*args):
    result = request.infer(dict(zip(inputs, (np.asarray(a) for a in args))))
    # Copies: the request reuses its output buffers on the next call.
    return tuple(np.array(result[output]) for output in outputs)
  return call


def load(model_dir: str, backend: str = "jax", num_threads: int | None = None,
         onnx_config: dict[str, str] | None = None) -> ExportedModel:
  """The model of `model_dir` on `backend` ('jax', 'onnx' or 'openvino'); `num_threads`
  sets ONNX Runtime's or OpenVINO's threads and `onnx_config` adds ONNX Runtime session
  config entries (e.g. session.intra_op.allow_spinning). The OpenVINO backend computes in
  the model's manifest['precision']."""
  return ExportedModel(model_dir, backend, num_threads, onnx_config)

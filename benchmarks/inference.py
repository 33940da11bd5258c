r"""Anomaly maps per second: ccl_jax jit, the exported JAX model, ONNX Runtime, OpenVINO,
PyTorch; float32 and, like for like, INT8 and bf16.

  python -m benchmarks.inference                                  # small and paper settings
  python -m benchmarks.inference --settings small --rounds 3      # a quick look

Settings (random weights and images: speed does not depend on them):
  paper  wide_resnet50_2, 256x256 (the paper's)
  small  resnet18, 128x128
at batch 1 (latency) and batch 16 (throughput), `--batch_sizes`.

One CCL model per setting (the PyTorch reference's random initialisation, converted to
ccl_jax by `benchmarks.torch_reference.jax_variables`, so every path computes the same
maps), timed through four paths, interleaved round by round so load changes hit all alike:
  ccl_jax_jit    `Detector.score` of the run-directory detector (what `predict --workdir`
                 runs), maps copied to the host
  exported_jax   `ccl_jax.deploy.loader.load(model_dir)`: the jax.export functions
  onnxruntime    the same model directory's ONNX graphs in ONNX Runtime (all graph
                 optimisations, float32)
  openvino       the same model directory's OpenVINO IR (`--backend openvino`), float32
  torch_eager    the PyTorch reference's `anomaly_maps` (eval mode, no_grad; its blur is
                 scipy's on the host, as the authors score)
Reduced precision (`--precisions`, each against PyTorch at the same precision):
  openvino_int8  the IR of `--precision int8` (NNCF, calibrated on CALIBRATION_IMAGES
                 random images: the weights are random too, so only the speed means much)
  torch_int8     the reference with net_t, proj_layer, mff_oce and net_s each quantised by
                 PyTorch's FX graph mode (x86 engine: static INT8 convolutions), calibrated
                 on the same images
  openvino_bf16  the float32 IR compiled with INFERENCE_PRECISION_HINT=bf16
  torch_bf16     the reference under torch.autocast("cpu", dtype=torch.bfloat16)
  bf16 is left out, with a note, on a CPU where OpenVINO has no BF16 support.
  torch_compile  the same with the model under torch.compile (--torch_compile)
  exported_jax_constants  the exported functions with the weights closed over as
                 constants instead of passed as arguments (--weights_as_constants)
`--onnx_profile` adds ONNX Runtime's own profile of one batch: its time per operator type,
and OpenVINO's (PERF_COUNT) of the float32 and reduced-precision IRs.
Threads: the process is pinned to `--threads` cores (default: all), and PyTorch
(set_num_threads) and ONNX Runtime (intra_op_num_threads) get that many threads; XLA's CPU
client uses one thread per core it may run on. ONNX Runtime's workers do not spin while
idle, so they leave the cores to the path timed after them.

Prints a markdown table and writes benchmarks/results/inference_<device>.json and .md.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.train_step import RESULTS, interleaved, machine
from ccl_jax import export
from ccl_jax.decisions import grouping, thresholds
from ccl_jax.deploy import loader
from ccl_jax.models import build_encoder
from ccl_jax.ccl.detector import ReverseDistillationDetector
from ccl_jax.models.detector import Detector

SETTINGS = {
    "paper": {"encoder": "wide_resnet50_2", "image_size": 256},
    "small": {"encoder": "resnet18", "image_size": 128},
    "tiny": {"encoder": "resnet18", "image_size": 64},  # the test's: checks that it runs
}
PATHS = ("ccl_jax_jit", "exported_jax", "exported_jax_constants", "onnxruntime", "openvino",
         "torch_eager", "torch_compile", "openvino_int8", "torch_int8", "openvino_bf16",
         "torch_bf16")
CCL_JAX_PATHS = PATHS[:5]
REDUCED = ("int8", "bf16")
CALIBRATION_IMAGES = 32
# ONNX Runtime's idle workers otherwise spin after each call, competing for the cores with
# the path timed next.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def _model_dir(detector: Detector, directory: str, embedding_dim: int,
               precision: str = "f32", calibration: list | None = None) -> str:
  """`detector` written as a model directory (every backend at float32, OpenVINO alone at
  a reduced `precision`) with one dummy group."""
  centroid = np.full((1, embedding_dim), embedding_dim ** -0.5, np.float32)
  groups = grouping.Groups(centroid, ("all",), False)
  cutoffs = thresholds.Thresholds(np.ones(1), 1.0, "quantile", {})
  export.write_model(detector, groups, cutoffs, directory,
                     loader.BACKENDS if precision == "f32" else ("openvino",),
                     source={"benchmark": "random weights"}, precision=precision,
                     calibration=calibration)
  return directory


def _torch_int8(trainer, encoder: str, image_size: int, calibration_images):
  """A copy of `trainer` whose four networks are quantised to INT8 by PyTorch's FX graph
  mode (x86 engine), calibrated on `calibration_images` [N, 3, S, S] in [0, 1]."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch.ao.quantization import (  # pylint: disable=import-outside-toplevel
      get_default_qconfig_mapping, quantize_fx)
  from benchmarks.torch_reference import build_trainer  # pylint: disable=import-outside-toplevel
  torch.backends.quantized.engine = "x86"
  quantised = build_trainer(encoder, image_size=image_size)
  quantised.model.load_state_dict(trainer.model.state_dict())
  quantised.model.eval()
  model = quantised.model
  with torch.no_grad():
    features = model.encode(calibration_images)
    projected = model.proj_layer(features)
    inputs = {"net_t": (model.normalise(calibration_images),), "proj_layer": (features,),
              "mff_oce": (projected,), "net_s": (model.mff_oce(projected),)}
    for name, example in inputs.items():
      prepared = quantize_fx.prepare_fx(getattr(model, name),
                                        get_default_qconfig_mapping("x86"),
                                        example_inputs=example)
      prepared(*example)  # calibration: the activation ranges
      setattr(model, name, quantize_fx.convert_fx(prepared))
  return quantised


def openvino_profile(model_dir: str, images: np.ndarray, num_threads: int
                     ) -> dict[str, float]:
  """Share of OpenVINO's CPU time per executed layer type (PERF_COUNT), one call of
  `score` after a warm-up call; layer types carry their kernel (e.g. Convolution
  jit_avx2_I8)."""
  import openvino  # pylint: disable=import-outside-toplevel
  manifest = loader.read_manifest(model_dir)
  core = openvino.Core()
  compiled = core.compile_model(
      core.read_model(os.path.join(model_dir, loader.function_file("score", "openvino"))),
      "CPU", {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": num_threads,
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT":
              loader.OPENVINO_PRECISION_HINTS[manifest.get("precision", "f32")]})
  request = compiled.create_infer_request()
  feeds = {"images": images, "group_ids": np.zeros(len(images), np.int32)}
  request.infer(feeds)
  request.infer(feeds)
  times: dict[str, float] = {}
  for info in request.profiling_info:
    key = f"{info.node_type} {info.exec_type}"
    times[key] = times.get(key, 0.0) + info.real_time.total_seconds()
  total = sum(times.values())
  return {op: t / total for op, t in sorted(times.items(), key=lambda item: -item[1])}


def _with_constant_weights(detector: Detector) -> tuple[Callable[..., Any], int]:
  """The score function serialised with the weights closed over, deserialised and jitted,
  and its serialised size in bytes."""
  weights, _, score = detector.pure_functions()
  specs = export.input_specs(weights, detector.image_size, "score")[1:]
  serialized = jax.export.export(jax.jit(lambda *args: score(weights, *args)))(*specs)
  data = serialized.serialize()
  call = jax.jit(jax.export.deserialize(data).call)
  return (lambda x, g: [np.asarray(y) for y in call(x, g)]), len(data)


def onnx_profile(model_dir: str, images: np.ndarray, num_threads: int) -> dict[str, float]:
  """Share of ONNX Runtime's kernel time per operator type, one call of `score` (after a
  warm-up call), from its own profiler."""
  import onnxruntime  # pylint: disable=import-outside-toplevel
  options = onnxruntime.SessionOptions()
  options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
  options.intra_op_num_threads = num_threads
  options.enable_profiling = True
  options.profile_file_prefix = os.path.join(model_dir, "profile")
  session = onnxruntime.InferenceSession(
      os.path.join(model_dir, loader.function_file("score", "onnx")), options,
      providers=["CPUExecutionProvider"])
  feeds = {"images": images, "group_ids": np.zeros(len(images), np.int32)}
  session.run(None, feeds)
  session.run(None, feeds)
  with open(session.end_profiling(), encoding="utf-8") as f:
    events = json.load(f)
  times: dict[str, float] = {}
  for event in events:
    if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
      op = event["args"]["op_name"]
      times[op] = times.get(op, 0.0) + event["dur"]
  total = sum(times.values())
  return {op: t / total for op, t in sorted(times.items(), key=lambda item: -item[1])}


def runners(setting: dict, batch_sizes: list[int], num_threads: int, torch_compile: bool,
            directory: str, constants: bool = False, precisions: tuple[str, ...] = ()
            ) -> tuple[dict[int, dict[str, Callable[[], Any]]], dict[str, str], dict[str, int],
                       dict[int, dict[str, float]]]:
  """{batch size: {path: a call computing that batch's maps}}, the model directories by
  precision, the files' sizes and {batch size: {reduced-precision path: largest map
  difference from the float32 maps, as a share of their range}}."""
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks.torch_reference import (  # pylint: disable=import-outside-toplevel
      build_trainer, jax_model, jax_variables)
  torch.set_num_threads(num_threads)
  size = setting["image_size"]
  trainer = build_trainer(setting["encoder"], image_size=size)
  trainer.model.eval()
  encoder_variables, variables = jax_variables(trainer)
  detector = ReverseDistillationDetector(
      "ccl", size, build_encoder(setting["encoder"], jnp.float32),
      jax.device_put(encoder_variables), jax_model(setting["encoder"]),
      jax.device_put(variables))
  embedding_dim = detector.embed(np.zeros((1, size, size, 3), np.uint8)).shape[1]
  root = os.path.join(directory, setting["encoder"])
  model_dirs = {"f32": _model_dir(detector, root, embedding_dim)}
  calibration = np.random.default_rng(1234).integers(0, 256, (CALIBRATION_IMAGES, size, size, 3),
                                                     dtype=np.uint8)
  for precision in precisions:
    items = ([{"images": calibration[k:k + 1], "group_ids": np.zeros(1, np.int32)}
              for k in range(len(calibration))] if precision == "int8" else None)
    model_dirs[precision] = _model_dir(detector, f"{root}_{precision}", embedding_dim,
                                       precision, items)
  models = {"exported_jax": loader.load(model_dirs["f32"], "jax"),
            "onnxruntime": loader.load(model_dirs["f32"], "onnx", num_threads=num_threads,
                                         onnx_config=NO_SPINNING),
            "openvino": loader.load(model_dirs["f32"], "openvino", num_threads=num_threads)}
  for precision in precisions:
    models[f"openvino_{precision}"] = loader.load(model_dirs[precision], "openvino",
                                                    num_threads=num_threads)
  sizes = {f"{name} ({precision})": entry["bytes"]
           for precision, model_dir in model_dirs.items()
           for name, entry in loader.read_manifest(model_dir)["files"].items()}
  constant_score = None
  if constants:
    constant_score, sizes["score with constant weights"] = _with_constant_weights(detector)
  compiled = None
  if torch_compile:
    compiled = build_trainer(setting["encoder"], image_size=size)
    compiled.model.load_state_dict(trainer.model.state_dict())
    compiled.model.eval()
    for part in ("net_t", "proj_layer", "mff_oce", "net_s"):  # what anomaly_maps runs
      setattr(compiled.model, part, torch.compile(getattr(compiled.model, part)))
  quantised = None
  if "int8" in precisions:
    quantised = _torch_int8(trainer, setting["encoder"], size, torch.from_numpy(
        calibration.transpose(0, 3, 1, 2).astype(np.float32) / 255.0))
  result, errors = {}, {}
  for batch_size in batch_sizes:
    images = np.random.default_rng(batch_size).integers(0, 256, (batch_size, size, size, 3),
                                                        dtype=np.uint8)
    groups = np.zeros(batch_size, np.int32)
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)

    def torch_maps(t=trainer, x=torch_images, bf16=False):
      with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return t.anomaly_maps(x)

    calls = {"ccl_jax_jit": lambda x=images, g=groups: np.asarray(
                 detector.score(x, g).anomaly_maps),
             "torch_eager": torch_maps}
    for name, model in models.items():
      calls[name] = lambda x=images, g=groups, m=model: m.score(x, g).anomaly_maps
    if compiled is not None:
      calls["torch_compile"] = lambda c=compiled, x=torch_images: torch_maps(c, x)
    if constant_score is not None:
      calls["exported_jax_constants"] = lambda x=images, g=groups: constant_score(x, g)[0]
    if quantised is not None:
      calls["torch_int8"] = lambda q=quantised, x=torch_images: torch_maps(q, x)
    if "bf16" in precisions:
      calls["torch_bf16"] = lambda x=torch_images: torch_maps(x=x, bf16=True)
    reference = calls["torch_eager"]()
    errors[batch_size] = {}
    for name, call in calls.items():  # every path computes the same maps (and compiles now)
      error = float(np.abs(np.asarray(call()) - reference).max() / np.abs(reference).max())
      if name.endswith(REDUCED):
        errors[batch_size][name] = error
      elif error > 1e-3:
        raise RuntimeError(f"{name} maps differ from PyTorch's by {error:.2g} of their range.")
    result[batch_size] = calls
  return result, model_dirs, sizes, errors


def measure(setting_name: str, args) -> dict[str, Any]:
  setting = SETTINGS[setting_name]
  rows = {}
  with tempfile.TemporaryDirectory() as directory:
    by_batch, model_dirs, sizes, errors = runners(
        setting, [int(b) for b in args.batch_sizes], args.threads, args.torch_compile,
        directory, args.weights_as_constants, precisions(args.precisions))
    for batch_size, calls in by_batch.items():
      print(f"[{setting_name}] batch {batch_size}: {', '.join(calls)}", file=sys.stderr,
            flush=True)
      timings = interleaved(calls, args.warmup, args.rounds)
      for value in timings.values():
        value["maps_per_s"] = batch_size / value["median_s"]
      rows[str(batch_size)] = timings
    profiles: dict[str, dict[str, Any]] = {}
    if args.onnx_profile:
      size = setting["image_size"]
      for batch_size in by_batch:
        images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3),
                                                   dtype=np.uint8)
        profiles[str(batch_size)] = {
            "onnxruntime": onnx_profile(model_dirs["f32"], images, args.threads),
            **{f"openvino {precision}": openvino_profile(model_dir, images, args.threads)
               for precision, model_dir in model_dirs.items()}}
  return {"setting": dict(setting, name=setting_name), "batches": rows,
          "onnx_profile": profiles, "bytes": sizes,
          "reduced_precision_error": {str(b): e for b, e in errors.items()}}


def precisions(names: list[str]) -> tuple[str, ...]:
  """The reduced precisions of --precisions that this CPU runs in OpenVINO (a note on
  stderr for each left out)."""
  kept = []
  for name in names:
    try:
      loader.check_cpu_precision(name)
      kept.append(name)
    except loader.UnsupportedPrecisionError as err:
      print(f"--precisions: {name} left out: {err}", file=sys.stderr, flush=True)
  return tuple(kept)


def markdown(result: dict[str, Any]) -> str:
  paths = [p for p in PATHS if any(p in t for r in result["settings"]
                                   for t in r["batches"].values())]
  reduced = [p for p in REDUCED if f"openvino_{p}" in paths and f"torch_{p}" in paths]
  threads = result["threads"]
  lines = [f"Machine: {result['machine']['cpu']}, {threads} thread{'s' * (threads > 1)} for "
           f"every backend; JAX {result['machine']['jax']}, PyTorch {result['machine']['torch']}, "
           f"ONNX Runtime {result['onnxruntime']}, OpenVINO {result['openvino']}; median of "
           f"{result['rounds']} interleaved rounds.", "",
           "| setting | batch | " + " | ".join(f"{p} maps/s" for p in paths)
           + " | fastest f32 ccl_jax / torch_eager |"
           + "".join(f" openvino_{p} / torch_{p} |" for p in reduced),
           "|---|---:|" + "---:|" * (len(paths) + 1 + len(reduced))]
  for entry in result["settings"]:
    for batch_size, timings in entry["batches"].items():
      cells = [f"{timings[p]['maps_per_s']:.1f}" if p in timings else "n/a" for p in paths]
      best = max(timings[p]["maps_per_s"] for p in CCL_JAX_PATHS if p in timings)
      ratios = [best / timings["torch_eager"]["maps_per_s"]] + [
          timings[f"openvino_{p}"]["maps_per_s"] / timings[f"torch_{p}"]["maps_per_s"]
          for p in reduced]
      lines.append(f"| {entry['setting']['name']} ({entry['setting']['encoder']}, "
                   f"{entry['setting']['image_size']} px) | {batch_size} | "
                   + " | ".join(cells) + "".join(f" | {r:.2f}x" for r in ratios) + " |")
  for entry in result["settings"]:
    for batch_size, errors in entry.get("reduced_precision_error", {}).items():
      if errors:
        text = ", ".join(f"{name} {error:.2%}" for name, error in errors.items())
        lines.append(f"\nLargest map difference from PyTorch float32 (share of the range), "
                     f"{entry['setting']['name']}, batch {batch_size}: {text}")
    for batch_size, by_runtime in entry["onnx_profile"].items():
      for runtime, shares in by_runtime.items():
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:6])
        lines.append(f"\n{runtime} profile, {entry['setting']['name']}, batch {batch_size}: "
                     f"{top}")
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in entry["bytes"].items())
    lines.append(f"\nModel files, {entry['setting']['name']}: {sizes}")
  return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = flag_values
  flags.DEFINE_list("settings", ["small", "paper"], f"Of {sorted(SETTINGS)}.", flag_values=fv)
  flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to time.", flag_values=fv)
  flags.DEFINE_integer("rounds", 10, "Timed rounds (each runs every path once).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed rounds first.", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("threads", len(os.sched_getaffinity(0)), "Cores and threads for "
                       "every backend.", lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("torch_compile", False, "Also time the model under torch.compile.",
                    flag_values=fv)
  flags.DEFINE_bool("weights_as_constants", False, "Also time the exported functions with "
                    "the weights closed over as constants.", flag_values=fv)
  flags.DEFINE_bool("onnx_profile", False, "Also report ONNX Runtime's and OpenVINO's time "
                    "per operator type.", flag_values=fv)
  flags.DEFINE_list("precisions", list(REDUCED), "Reduced precisions to time, each in "
                    "OpenVINO and PyTorch (left out where OpenVINO has no CPU support).",
                    flag_values=fv)
  flags.DEFINE_string("output", None, "JSON result path (default benchmarks/results/"
                      "inference_<device>.json, with a .md beside it).", flag_values=fv)
  flags.register_validator(
      "settings", lambda names: set(names) <= set(SETTINGS),
      f"--settings: expected some of {sorted(SETTINGS)}.", flag_values=fv)
  flags.register_validator(
      "batch_sizes", lambda sizes: all(s.isdigit() and int(s) > 0 for s in sizes),
      "--batch_sizes: expected positive integers.", flag_values=fv)
  flags.register_validator(
      "precisions", lambda names: set(names) <= set(REDUCED),
      f"--precisions: expected some of {list(REDUCED)}.", flag_values=fv)
  flags.register_validator(
      "threads", lambda n: n <= len(os.sched_getaffinity(0)),
      "--threads: at most the number of cores this process may use.", flag_values=fv)


def run(flag_values) -> dict[str, Any]:
  # Before XLA starts its thread pool: it sizes it from the cores it may use.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:flag_values.threads])
  import onnxruntime  # pylint: disable=import-outside-toplevel
  import openvino  # pylint: disable=import-outside-toplevel
  result = {"machine": machine(), "threads": flag_values.threads, "rounds": flag_values.rounds,
            "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
            "settings": [measure(name, flag_values) for name in flag_values.settings]}
  output = flag_values.output or os.path.join(
      RESULTS, f"inference_{jax.default_backend()}.json")
  table = markdown(result)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  with open(os.path.splitext(output)[0] + ".md", "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table, flush=True)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  app.run(main)

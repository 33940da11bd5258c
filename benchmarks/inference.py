r"""Anomaly maps per second: ccl_jax jit, the exported JAX model, ONNX Runtime, PyTorch.

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
  torch_eager    the PyTorch reference's `anomaly_maps` (eval mode, no_grad; its blur is
                 scipy's on the host, as the authors score)
  torch_compile  the same with the model under torch.compile (--torch_compile)
  exported_jax_constants  the exported functions with the weights closed over as
                 constants instead of passed as arguments (--weights_as_constants)
`--onnx_profile` adds ONNX Runtime's own profile of one batch: its time per operator type.
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
PATHS = ("ccl_jax_jit", "exported_jax", "exported_jax_constants", "onnxruntime",
         "torch_eager", "torch_compile")
CCL_JAX_PATHS = PATHS[:4]
# ONNX Runtime's idle workers otherwise spin after each call, competing for the cores with
# the path timed next.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def _model_dir(detector: Detector, directory: str, embedding_dim: int) -> str:
  """`detector` written as a model directory (jax and onnx) with one dummy group."""
  centroid = np.full((1, embedding_dim), embedding_dim ** -0.5, np.float32)
  groups = grouping.Groups(centroid, ("all",), False)
  cutoffs = thresholds.Thresholds(np.ones(1), 1.0, "quantile", {})
  export.write_model(detector, groups, cutoffs, directory, loader.BACKENDS,
                     source={"benchmark": "random weights"})
  return directory


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
            directory: str, constants: bool = False
            ) -> tuple[dict[int, dict[str, Callable[[], Any]]], str, dict[str, int]]:
  """{batch size: {path: a call computing that batch's maps}}."""
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
  model_dir = _model_dir(detector, os.path.join(directory, setting["encoder"]), embedding_dim)
  models = {"exported_jax": loader.load(model_dir, "jax"),
            "onnxruntime": loader.load(model_dir, "onnx", num_threads=num_threads,
                                         onnx_config=NO_SPINNING)}
  files = loader.read_manifest(model_dir)["files"]
  sizes = {name: entry["bytes"] for name, entry in files.items()}
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
  result = {}
  for batch_size in batch_sizes:
    images = np.random.default_rng(batch_size).integers(0, 256, (batch_size, size, size, 3),
                                                        dtype=np.uint8)
    groups = np.zeros(batch_size, np.int32)
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)

    def torch_maps(t=trainer, x=torch_images):
      with torch.no_grad():
        return t.anomaly_maps(x)

    calls = {"ccl_jax_jit": lambda x=images, g=groups: np.asarray(
                 detector.score(x, g).anomaly_maps),
             "exported_jax": lambda x=images, g=groups: models["exported_jax"].score(x, g),
             "onnxruntime": lambda x=images, g=groups: models["onnxruntime"].score(x, g),
             "torch_eager": torch_maps}
    if compiled is not None:
      calls["torch_compile"] = lambda c=compiled, x=torch_images: torch_maps(c, x)
    if constant_score is not None:
      calls["exported_jax_constants"] = lambda x=images, g=groups: constant_score(x, g)
    reference = calls["torch_eager"]()
    for name, call in calls.items():  # every path computes the same maps (and compiles now)
      maps = np.asarray(call()[0] if name.startswith(("exported", "onnx")) else call())
      error = np.abs(maps - reference).max() / np.abs(reference).max()
      if error > 1e-3:
        raise RuntimeError(f"{name} maps differ from PyTorch's by {error:.2g} of their range.")
    result[batch_size] = calls
  return result, model_dir, sizes


def measure(setting_name: str, args) -> dict[str, Any]:
  setting = SETTINGS[setting_name]
  rows = {}
  with tempfile.TemporaryDirectory() as directory:
    by_batch, model_dir, sizes = runners(setting, [int(b) for b in args.batch_sizes], args.threads,
                                         args.torch_compile, directory,
                                         args.weights_as_constants)
    for batch_size, calls in by_batch.items():
      print(f"[{setting_name}] batch {batch_size}: {', '.join(calls)}", file=sys.stderr,
            flush=True)
      timings = interleaved(calls, args.warmup, args.rounds)
      for value in timings.values():
        value["maps_per_s"] = batch_size / value["median_s"]
      rows[str(batch_size)] = timings
    profiles = {}
    if args.onnx_profile:
      size = setting["image_size"]
      for batch_size in by_batch:
        images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3),
                                                   dtype=np.uint8)
        profiles[str(batch_size)] = onnx_profile(model_dir, images, args.threads)
  return {"setting": dict(setting, name=setting_name), "batches": rows,
          "onnx_profile": profiles, "bytes": sizes}


def markdown(result: dict[str, Any]) -> str:
  paths = [p for p in PATHS if any(p in t for r in result["settings"]
                                   for t in r["batches"].values())]
  threads = result["threads"]
  lines = [f"Machine: {result['machine']['cpu']}, {threads} thread{'s' * (threads > 1)} for "
           f"every backend; JAX {result['machine']['jax']}, PyTorch {result['machine']['torch']}, "
           f"ONNX Runtime {result['onnxruntime']}; median of {result['rounds']} interleaved "
           "rounds.", "",
           "| setting | batch | " + " | ".join(f"{p} maps/s" for p in paths)
           + " | fastest ccl_jax / torch_eager |",
           "|---|---:|" + "---:|" * len(paths) + "---:|"]
  for entry in result["settings"]:
    for batch_size, timings in entry["batches"].items():
      cells = [f"{timings[p]['maps_per_s']:.1f}" if p in timings else "n/a" for p in paths]
      best = max(timings[p]["maps_per_s"] for p in CCL_JAX_PATHS if p in timings)
      ratio = best / timings["torch_eager"]["maps_per_s"]
      lines.append(f"| {entry['setting']['name']} ({entry['setting']['encoder']}, "
                   f"{entry['setting']['image_size']} px) | {batch_size} | "
                   + " | ".join(cells) + f" | {ratio:.2f}x |")
  for entry in result["settings"]:
    for batch_size, shares in entry["onnx_profile"].items():
      top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:5])
      lines.append(f"\nONNX Runtime profile, {entry['setting']['name']}, batch {batch_size}: "
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
  flags.DEFINE_bool("onnx_profile", False, "Also report ONNX Runtime's time per operator "
                    "type.", flag_values=fv)
  flags.DEFINE_string("output", None, "JSON result path (default benchmarks/results/"
                      "inference_<device>.json, with a .md beside it).", flag_values=fv)
  flags.register_validator(
      "settings", lambda names: set(names) <= set(SETTINGS),
      f"--settings: expected some of {sorted(SETTINGS)}.", flag_values=fv)
  flags.register_validator(
      "batch_sizes", lambda sizes: all(s.isdigit() and int(s) > 0 for s in sizes),
      "--batch_sizes: expected positive integers.", flag_values=fv)
  flags.register_validator(
      "threads", lambda n: n <= len(os.sched_getaffinity(0)),
      "--threads: at most the number of cores this process may use.", flag_values=fv)


def run(flag_values) -> dict[str, Any]:
  # Before XLA starts its thread pool: it sizes it from the cores it may use.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:flag_values.threads])
  import onnxruntime  # pylint: disable=import-outside-toplevel
  result = {"machine": machine(), "threads": flag_values.threads, "rounds": flag_values.rounds,
            "onnxruntime": onnxruntime.__version__,
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

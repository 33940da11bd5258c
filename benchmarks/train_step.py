r"""ccl_jax against the PyTorch reference: training step, inference, local loss, FLOP/s, memory.

  python -m benchmarks.train_step                     # everything (about 70 min on 2 CPU cores)
  python -m benchmarks.train_step --settings small --repeats 3   # a quick look

Runs the same command on a CPU or a GPU (PyTorch on CUDA when available). Settings:
  paper  wide_resnet50_2, 256x256, batch 16 (the paper's)
  small  resnet18, 128x128, batch 16
  tiny   resnet18, 64x64, batch 4 (checks that the benchmark runs; not a measurement)
Random weights and images: speed does not depend on them. Both frameworks get the same
batch and the same augmented view (fixed augmentation: ccl_jax's `image_aug` input), so
augmentation is outside the timed step on both sides.

What is measured, per memory allocator (glibc malloc, and tcmalloc when
libtcmalloc_minimal.so.4 is installed: `apt-get install libtcmalloc-minimal4`; each
allocator runs in its own process with LD_PRELOAD; torch.compile, inference and the
local-loss sweep run only under the last allocator listed, tcmalloc by default):
  * train step (forward, backward, clipping, Adam update), median ms over `--repeats` after
    `--warmup`, the runners interleaved in one process so load changes hit all alike:
      - "same computation": ccl_jax's step and the PyTorch reference mode='minimal' (encoder
        once per view, no unused neck pass, whole-map matching, all other-class negatives);
        PyTorch eager and torch.compile;
      - "as the authors run it": the PyTorch reference mode='authors' (their code's extra
        work and Python loops) against ccl_jax under the `:authors` preset's loss settings
        (`ccl_jax.config.default_config.as_authors`);
  * inference: anomaly maps per second (ccl_jax `rd_outputs` vs the reference's
    `anomaly_maps`, the authors' scoring with scipy's blur on the host);
  * local loss: ccl_jax step time with window 1, 3, 5 and whole map against no local loss;
  * FLOP/s: FLOPs of one step (XLA's cost analysis; torch's FlopCounterMode) over the
    median time, against a measured float32 matmul peak of each framework;
  * peak memory: GPU: the frameworks' peak device allocation; CPU: the process's peak
    resident memory during two steps (after warm-up) above its resident memory once both
    frameworks are imported: parameters, optimiser state, inputs, the step's working
    memory and each runtime's caches (each framework alone in a fresh process; JAX loads
    its compiled step from a persistent cache written by a first process, so compiler
    memory is not counted; glibc malloc set to return freed memory at once; tcmalloc
    keeps freed memory, so it is not used here).
Writes benchmarks/results/train_step_<device>.json and .md and prints the tables.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ccl_jax.ccl import step
from ccl_jax.config import default_config
from ccl_jax.runtime import xla_options
from ccl_jax.weights import encoder_weights
from ccl_jax.config import settings as settings_lib
from ccl_jax.models import AUTHORS_NOISE_PROBABILITY, build_encoder
from ccl_jax.config.settings import LossSettings, OptimizerSettings
from ccl_jax.ccl.detector import rd_outputs

SETTINGS = {
    "paper": {"encoder": "wide_resnet50_2", "image_size": 256, "batch_size": 16},
    "small": {"encoder": "resnet18", "image_size": 128, "batch_size": 16},
    "tiny": {"encoder": "resnet18", "image_size": 64, "batch_size": 4},  # the test's
}
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NUM_CLASSES = 4


# ----------------------------------------------------------------------------- inputs
def make_batch(setting: dict, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b, s = setting["batch_size"], setting["image_size"]
  return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
          "image_aug": rng.random((b, s, s, 3), dtype=np.float32),
          "class_id": (np.arange(b) % NUM_CLASSES).astype(np.int32)}


def torch_inputs(batch: dict[str, np.ndarray], device: str):
  import torch  # pylint: disable=import-outside-toplevel
  to = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
  return (to(batch["image"].astype(np.float32) / 255.0), to(batch["image_aug"]),
          torch.from_numpy(batch["class_id"].astype(np.int64)).to(device))


# ------------------------------------------------------------------------- JAX side
class JaxStep:
  """A ccl_jax train step on one batch, as the training loop runs it (jitted, donated)."""

  def __init__(self, setting: dict, settings: LossSettings, batch: dict[str, np.ndarray]):
    from benchmarks.torch_reference import jax_model  # pylint: disable=import-outside-toplevel
    model = jax_model(setting["encoder"]).clone(noise_probability=AUTHORS_NOISE_PROBABILITY)
    encoder = build_encoder(setting["encoder"], jnp.float32)
    self.encoder_variables = encoder_weights.encoder_variables(encoder, "none", seed=0,
                                                       image_size=setting["image_size"])
    tx = step.make_optimizer(OptimizerSettings(
      projector_learning_rate=1e-3, learning_rate=5e-3, b1=0.5, b2=0.999, clip_norm=5.0))
    self.state = jax.jit(lambda v, k: step.create_train_state(
        model, encoder, v, tx, setting["image_size"], k))(self.encoder_variables,
                                                          jax.random.key(0))
    self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
    self.compiled = step.jit_train_step(encoder, settings).lower(
        self.state, self.encoder_variables, self.batch).compile()

  def __call__(self) -> None:
    self.state, metrics = self.compiled(self.state, self.encoder_variables, self.batch)
    jax.block_until_ready(metrics)

  def planned_bytes(self) -> int:
    """XLA's buffer assignment for the step: arguments (state, encoder, batch) + outputs -
    donated aliases + temporaries, i.e. the step's peak tensor memory."""
    plan = self.compiled.memory_analysis()
    return (plan.argument_size_in_bytes + plan.output_size_in_bytes - plan.alias_size_in_bytes
            + plan.temp_size_in_bytes)

  def flops(self) -> float:
    analysis = self.compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def jax_loss_settings(variant: str, window: int | None = None,
                      local_weight: float = 1.0) -> LossSettings:
  if variant == "authors":
    return settings_lib.from_config(
        default_config.as_authors(default_config.base_config())).loss
  return LossSettings(window=window, local_weight=local_weight)


# ----------------------------------------------------------------------- torch side
class TorchStep:
  def __init__(self, setting: dict, mode: str, batch, device: str, compiled: bool = False):
    from benchmarks.torch_reference import build_trainer  # pylint: disable=import-outside-toplevel
    extra = ({"local_negatives": "one_random", "global_views": "original",
              "noise_probability": AUTHORS_NOISE_PROBABILITY} if mode == "authors"
             else {"noise_probability": AUTHORS_NOISE_PROBABILITY})
    self.trainer = build_trainer(setting["encoder"], image_size=setting["image_size"],
                                 mode=mode, compiled=compiled, **extra)
    self.trainer.model.to(device)
    self.inputs = torch_inputs(batch, device)
    self.device = device

  def __call__(self) -> None:
    self.trainer.train_step(*self.inputs)
    _torch_sync(self.device)

  def flops(self) -> float:
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
    counter = FlopCounterMode(display=False)
    with counter:
      terms = self.trainer.loss_terms(*self.inputs)
      terms["total"].backward()
    self.trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _torch_sync(device: str) -> None:
  if device == "cuda":
    import torch  # pylint: disable=import-outside-toplevel
    torch.cuda.synchronize()


def torch_device() -> str:
  import torch  # pylint: disable=import-outside-toplevel
  return "cuda" if torch.cuda.is_available() else "cpu"


# -------------------------------------------------------------------------- timing
def interleaved(runners: dict[str, Callable[[], None]], warmup: int,
                repeats: int) -> dict[str, dict[str, float]]:
  """Median/min seconds per call of each runner, the runners taking turns every round."""
  times: dict[str, list[float]] = {name: [] for name in runners}
  for round_index in range(warmup + repeats):
    for name, run in runners.items():
      start = time.perf_counter()
      run()
      if round_index >= warmup:
        times[name].append(time.perf_counter() - start)
  return {name: {"median_s": statistics.median(t), "min_s": min(t), "repeats": len(t)}
          for name, t in times.items()}


def matmul_peak(framework: str, device: str, n: int = 2048, repeats: int = 10) -> float:
  """Float32 matmul FLOP/s of the framework on this device (best of `repeats`)."""
  if framework == "jax":
    a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
    mm = jax.jit(lambda x: x @ x)
    run = lambda: jax.block_until_ready(mm(a))
  else:
    import torch  # pylint: disable=import-outside-toplevel
    a = torch.rand(n, n, device=device)
    run = lambda: (a @ a, _torch_sync(device))
  run()
  best = min(_timed(run) for _ in range(repeats))
  return 2 * n ** 3 / best


def _timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# ------------------------------------------------------------------ the measurements
def train_step_section(name: str, setting: dict, args) -> dict[str, Any]:
  """Two comparisons, each interleaved on its own so that only its runners are alive (at the
  paper setting all five at once outgrew 24 GiB under tcmalloc): ccl_jax's step against
  PyTorch eager and torch.compile, then both frameworks with the authors' loss settings."""
  device = torch_device()
  batch = make_batch(setting)
  groups = (
      {"jax": lambda: JaxStep(setting, jax_loss_settings("minimal"), batch),
       "torch_eager": lambda: TorchStep(setting, "minimal", batch, device)},
      {"jax_authors_settings": lambda: JaxStep(setting, jax_loss_settings("authors"), batch),
       "torch_authors_eager": lambda: TorchStep(setting, "authors", batch, device)},
  )
  timings: dict[str, Any] = {}
  flops: dict[str, float] = {}
  for group in groups:
    runners = {key: build() for key, build in group.items()}
    if args.torch_compile and "torch_eager" in runners:
      try:
        compiled = TorchStep(setting, "minimal", batch, device, compiled=True)
        compiled()  # compile now, outside the timed rounds
        runners["torch_compile"] = compiled
      except RuntimeError as error:
        print(f"[{name}] torch.compile unavailable: {error}", file=sys.stderr, flush=True)
    timings.update(interleaved(runners, args.warmup, args.repeats))
    flops.update({key: runners[key].flops() for key in group})
    del runners
    gc.collect()
  for key, value in timings.items():
    value["images_per_s"] = setting["batch_size"] / value["median_s"]
    source = key.replace("torch_compile", "torch_eager")
    if source in flops:
      value["flops"] = flops[source]
      value["flop_per_s"] = flops[source] / value["median_s"]
  return timings


def inference_section(setting: dict, args) -> dict[str, Any]:
  from benchmarks.torch_reference import build_trainer  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  device = torch_device()
  batch = make_batch(setting)
  trainer = build_trainer(setting["encoder"], image_size=setting["image_size"])
  trainer.model.to(device)
  images, _, _ = torch_inputs(batch, device)
  encoder_variables, variables = _jax_variables_of(trainer)
  encoder = build_encoder(setting["encoder"], jnp.float32)
  from benchmarks.torch_reference import jax_model  # pylint: disable=import-outside-toplevel
  network = jax_model(setting["encoder"])
  predict = jax.jit(lambda v, e, x: rd_outputs(v, e, x, network=network,
                                                        encoder=encoder))
  jax_images = jnp.asarray(batch["image"])

  def run_torch():
    with torch.no_grad():
      trainer.anomaly_maps(images)

  timings = interleaved({"jax": lambda: jax.block_until_ready(
      predict(variables, encoder_variables, jax_images)), "torch_eager": run_torch},
                        args.warmup, args.repeats)
  for value in timings.values():
    value["maps_per_s"] = setting["batch_size"] / value["median_s"]
  return timings


def _jax_variables_of(trainer):
  from benchmarks.torch_reference import jax_variables  # pylint: disable=import-outside-toplevel
  encoder_variables, variables = jax_variables(trainer)
  return jax.device_put(encoder_variables), jax.device_put(variables)


def local_loss_section(setting: dict, args) -> dict[str, Any]:
  """Each window's step interleaved head to head with the step without the local loss, one
  pair alive at a time (five steps at once outgrew 24 GiB at the paper setting): its
  `added_fraction` is against the baseline's median of the same rounds."""
  batch = make_batch(setting)
  baseline = JaxStep(setting, jax_loss_settings("minimal", local_weight=0.0), batch)
  baseline_times: list[float] = []
  timings: dict[str, Any] = {}
  for window in (1, 3, 5, None):
    variant = JaxStep(setting, jax_loss_settings("minimal", window=window), batch)
    pair = interleaved({"no_local": baseline, "local": variant}, args.warmup, args.repeats)
    timings[f"window_{window or 'whole'}"] = dict(
        pair["local"], added_fraction=pair["local"]["median_s"] / pair["no_local"]["median_s"]
        - 1.0, no_local_median_s=pair["no_local"]["median_s"])
    baseline_times.append(pair["no_local"]["median_s"])
    del variant
    gc.collect()
  timings["no_local"] = {"median_s": statistics.median(baseline_times),
                         "pair_medians_s": baseline_times}
  return timings


# ---------------------------------------------------------------------- peak memory
def _proc_status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(framework: str, setting_name: str) -> dict[str, float]:
  """Peak memory of `framework`'s step alone in this (fresh) process."""
  import torch  # pylint: disable=import-outside-toplevel,unused-import
  if framework == "jax":
    jax.config.update("jax_compilation_cache_dir", os.environ["CCL_JAX_BENCH_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  baseline = _proc_status_kib("VmRSS")  # both frameworks imported, nothing built yet
  setting = SETTINGS[setting_name]
  batch = make_batch(setting)
  device = torch_device() if framework == "torch" else jax.devices()[0].platform
  runner = (JaxStep(setting, jax_loss_settings("minimal"), batch) if framework == "jax"
            else TorchStep(setting, "minimal", batch, torch_device()))
  runner()
  runner()
  if device in ("gpu", "cuda"):
    if framework == "jax":
      runner()
      stats = jax.devices()[0].memory_stats()
      return {"peak_mib": stats["peak_bytes_in_use"] / 2**20, "kind": "device peak"}
    import torch  # pylint: disable=import-outside-toplevel
    torch.cuda.reset_peak_memory_stats()
    runner()
    return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "kind": "device peak"}
  resting = _proc_status_kib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM (peak RSS) to the current RSS
  for _ in range(2):
    runner()
  peak = _proc_status_kib("VmHWM")
  result = {"peak_mib": (peak - baseline) / 1024, "step_transient_mib": (peak - resting) / 1024,
            "kind": "peak resident memory during the step above the process's after imports"}
  if framework == "jax":
    result["xla_buffer_plan_mib"] = runner.planned_bytes() / 2**20
  return result


def memory_section(setting_name: str) -> dict[str, Any]:
  results = {}
  # JAX runs twice with a persistent compilation cache: the second process loads its
  # executables instead of compiling, so the compiler's own memory is not counted.
  cache = tempfile.mkdtemp(prefix="ccl_jax_bench_cache_")
  for framework in ("jax", "jax", "torch"):
    env = dict(os.environ, CCL_JAX_BENCH_CACHE=cache)
    env.pop("LD_PRELOAD", None)
    # A fixed mmap threshold (no dynamic raise) and no trim delay: glibc returns freed
    # blocks to the system at once, so resident memory follows live memory.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--memory_worker", framework,
         "--settings", setting_name], env=env, capture_output=True, text=True, check=False)
    if out.returncode:
      raise RuntimeError(f"memory worker {framework}/{setting_name} failed:\n{out.stderr[-3000:]}")
    results[framework] = json.loads(out.stdout.strip().splitlines()[-1])
  results["jax_over_torch"] = results["jax"]["peak_mib"] / results["torch"]["peak_mib"]
  return results


# ------------------------------------------------------------------------ drivers
def worker(args) -> dict[str, Any]:
  """All timing sections under the allocator this process was started with."""
  import torch  # pylint: disable=import-outside-toplevel
  if torch_device() == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  device = torch_device()
  out: dict[str, Any] = {"allocator": args.allocator, "settings": {}}
  out["matmul_peak_flop_per_s"] = {"jax": matmul_peak("jax", device),
                                   "torch": matmul_peak("torch", device)}
  for name in args.settings:
    setting = SETTINGS[name]
    print(f"[{args.allocator}] {name}: train step", file=sys.stderr, flush=True)
    section = {"train_step": train_step_section(name, setting, args)}
    if not args.skip_inference:
      print(f"[{args.allocator}] {name}: inference", file=sys.stderr, flush=True)
      section["inference"] = inference_section(setting, args)
    if not args.skip_local_loss:
      print(f"[{args.allocator}] {name}: local loss", file=sys.stderr, flush=True)
      section["local_loss"] = local_loss_section(setting, args)
    out["settings"][name] = section
  return out


def machine() -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  cpu = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "jax_device": str(jax.devices()[0].device_kind),
          "torch": torch.__version__, "torch_device": torch_device(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "date": time.strftime("%Y-%m-%d")}


def run_all(args) -> dict[str, Any]:
  allocators = list(args.allocators)
  options = {f.name: f.value for f in args.get_flags_for_module(sys.modules[__name__])}
  result: dict[str, Any] = {"machine": machine(), "args": options, "runs": {}}
  for allocator in allocators:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if allocator == "tcmalloc":
      if not os.path.exists(TCMALLOC):
        print(f"tcmalloc not found at {TCMALLOC}; skipped (apt-get install "
              "libtcmalloc-minimal4).", flush=True)
        continue
      env["LD_PRELOAD"] = TCMALLOC
    # The allocator matters for the step comparison; torch.compile (minutes of compiling),
    # inference and the local-loss sweep run once, under the last (fastest) allocator.
    last = allocator == allocators[-1]
    command = [sys.executable, "-m", "benchmarks.train_step", "--worker", "--allocator",
               allocator] + _passthrough(args, everything=last)
    out = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode:
      raise RuntimeError(f"The {allocator} run failed (exit {out.returncode}); see above.")
    result["runs"][allocator] = json.loads(out.stdout.strip().splitlines()[-1])
  if not args.skip_memory:
    result["memory"] = {name: memory_section(name) for name in args.settings}
  return result


def _passthrough(args, everything: bool) -> list[str]:
  argv = ["--settings", ",".join(args.settings), "--warmup", str(args.warmup), "--repeats",
          str(args.repeats)]
  argv += ["--torch_compile"] if args.torch_compile and everything else ["--notorch_compile"]
  argv += ["--skip_inference"] if args.skip_inference or not everything else []
  argv += ["--skip_local_loss"] if args.skip_local_loss or not everything else []
  return argv


# --------------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
  m = result["machine"]
  lines = [f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['platform']}; JAX {m['jax']} "
           f"({m['jax_device']}), PyTorch {m['torch']} ({m['torch_device']}); {m['date']}.",
           f"XLA_FLAGS: {m.get('xla_flags') or '(none)'}", ""]
  best_torch = {}
  lines += ["Training step (median of the interleaved repeats; ratio = JAX time / PyTorch "
            "time):", "",
            "| setting | allocator | JAX ms | PyTorch eager ms | JAX/eager | torch.compile ms "
            "| JAX/compile | JAX img/s | authors: JAX ms | authors: PyTorch ms | JAX/PyTorch |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for allocator, run in result["runs"].items():
    for name, section in run["settings"].items():
      t = section["train_step"]
      jax_ms, eager_ms = 1e3 * t["jax"]["median_s"], 1e3 * t["torch_eager"]["median_s"]
      compiled_ms = 1e3 * t["torch_compile"]["median_s"] if "torch_compile" in t else None
      a_jax = 1e3 * t["jax_authors_settings"]["median_s"]
      a_torch = 1e3 * t["torch_authors_eager"]["median_s"]
      best_torch.setdefault(name, []).append((eager_ms, allocator))
      lines.append(
          f"| {name} | {allocator} | {jax_ms:.0f} | {eager_ms:.0f} | {jax_ms / eager_ms:.2f} | "
          + (f"{compiled_ms:.0f} | {jax_ms / compiled_ms:.2f}" if compiled_ms else "n/a | n/a")
          + f" | {t['jax']['images_per_s']:.1f} | {a_jax:.0f} | {a_torch:.0f} | "
          f"{a_jax / a_torch:.2f} |")
  lines += ["", "Inference (anomaly maps per second):", "",
            "| setting | allocator | JAX maps/s | PyTorch eager maps/s | JAX/PyTorch speed-up |",
            "|---|---|---:|---:|---:|"]
  for allocator, run in result["runs"].items():
    for name, section in run["settings"].items():
      if "inference" in section:
        i = section["inference"]
        lines.append(f"| {name} | {allocator} | {i['jax']['maps_per_s']:.1f} | "
                     f"{i['torch_eager']['maps_per_s']:.1f} | "
                     f"{i['jax']['maps_per_s'] / i['torch_eager']['maps_per_s']:.2f} |")
  local_loss_rows = []
  for allocator, run in result["runs"].items():
    for name, section in run["settings"].items():
      if "local_loss" in section:
        ll = section["local_loss"]
        cells = [f"{1e3 * ll[k]['median_s']:.0f} ms ({100 * ll[k]['added_fraction']:+.1f}%)"
                 for k in ("window_1", "window_3", "window_5", "window_whole")]
        local_loss_rows.append(f"| {name} | {allocator} | "
                               f"{1e3 * ll['no_local']['median_s']:.0f} | " + " | ".join(cells)
                               + " |")
  if local_loss_rows:  # not measured with --skip_local_loss
    lines += ["", ("Local loss: ccl_jax step time and the share the local loss adds to it "
                   "(each window interleaved with its own run of the step without it; no "
                   "local = the median of those runs):"), "",
              "| setting | allocator | no local ms | window 1 | window 3 | window 5 | whole map |",
              "|---|---|---:|---:|---:|---:|---:|", *local_loss_rows]
  lines += ["", "Achieved FLOP/s of the training step against each framework's measured "
            "float32 matmul peak:", "",
            "| setting | allocator | JAX GFLOP/step | JAX GFLOP/s (% peak) | PyTorch GFLOP/step "
            "| PyTorch GFLOP/s (% peak) |", "|---|---|---:|---:|---:|---:|"]
  for allocator, run in result["runs"].items():
    peak = run["matmul_peak_flop_per_s"]
    for name, section in run["settings"].items():
      t = section["train_step"]
      lines.append(
          f"| {name} | {allocator} | {t['jax']['flops'] / 1e9:.0f} | "
          f"{t['jax']['flop_per_s'] / 1e9:.0f} ({100 * t['jax']['flop_per_s'] / peak['jax']:.0f}%)"
          f" | {t['torch_eager']['flops'] / 1e9:.0f} | {t['torch_eager']['flop_per_s'] / 1e9:.0f}"
          f" ({100 * t['torch_eager']['flop_per_s'] / peak['torch']:.0f}%) |")
  if "memory" in result:
    lines += ["", "Peak memory of the training step (" +
              next(iter(result["memory"].values()))["jax"]["kind"] + "):", "",
              "| setting | JAX MiB | PyTorch MiB | JAX/PyTorch |", "|---|---:|---:|---:|"]
    for name, mem in result["memory"].items():
      lines.append(f"| {name} | {mem['jax']['peak_mib']:.0f} | {mem['torch']['peak_mib']:.0f} "
                   f"| {mem['jax_over_torch']:.2f} |")
    lines += ["", "JAX's own plan for the step (XLA buffer assignment: state, encoder, batch, "
              "outputs, temporaries): " + ", ".join(
                  f"{name} {mem['jax']['xla_buffer_plan_mib']:.0f} MiB"
                  for name, mem in result["memory"].items() if "xla_buffer_plan_mib" in
                  mem["jax"]) + "."]
  if best_torch:
    lines += ["", "JAX against the fastest PyTorch eager step of any allocator:", ""]
    for name, candidates in best_torch.items():
      eager_ms, allocator = min(candidates)
      jax_best = min(1e3 * run["settings"][name]["train_step"]["jax"]["median_s"]
                     for run in result["runs"].values())
      lines.append(f"- {name}: JAX {jax_best:.0f} ms vs PyTorch {eager_ms:.0f} ms ({allocator})"
                   f" = {jax_best / eager_ms:.2f}x")
  return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags; defined when it runs, never on import."""
  fv = flag_values
  flags.DEFINE_list("settings", "small,paper", "Comma-separated of: " + ", ".join(SETTINGS),
                    flag_values=fv)
  flags.DEFINE_list("allocators", "default,tcmalloc", "Memory allocators, each in its own "
                    "process: default (glibc malloc), tcmalloc.", flag_values=fv)
  flags.DEFINE_integer("warmup", 1, "Untimed steps before timing.", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed steps (median).", lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("torch_compile", True, "Also time torch.compile.", flag_values=fv)
  flags.DEFINE_bool("skip_inference", False, "Skip the inference section.", flag_values=fv)
  flags.DEFINE_bool("skip_local_loss", False, "Skip the local-loss sweep.", flag_values=fv)
  flags.DEFINE_bool("skip_memory", False, "Skip the peak-memory section.", flag_values=fv)
  flags.DEFINE_string("output", None, "JSON path (default: benchmarks/results/"
                      "train_step_<device>.json, with a .md beside it)", flag_values=fv)
  flags.DEFINE_bool("worker", False, "Internal: run the timing sections in this process.",
                    flag_values=fv)
  flags.DEFINE_string("allocator", "default", "Internal: the allocator a worker runs under.",
                      flag_values=fv)
  flags.DEFINE_string("memory_worker", None, "Internal: measure this framework's (jax, torch) "
                      "peak memory in this process.", flag_values=fv)
  flags.register_validator(
      "settings", lambda names: set(names) <= set(SETTINGS),
      f"--settings: expected some of {sorted(SETTINGS)}.", flag_values=fv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  # As ccl_jax.main does by default; the worker processes inherit it through XLA_FLAGS.
  xla_options.use_cpu_low_memory_schedule(True)
  if args.memory_worker:
    if len(args.settings) != 1:
      raise app.UsageError("--memory_worker measures one setting; give one --settings name.")
    print(json.dumps(memory_worker(args.memory_worker, args.settings[0])))
    return
  if args.worker:
    print(json.dumps(worker(args)))
    return
  result = run_all(args)
  output = args.output or os.path.join(
      RESULTS, f"train_step_{result['machine']['torch_device']}.json")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  table = markdown(result)
  with open(os.path.splitext(output)[0] + ".md", "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  define_flags()
  app.run(main)

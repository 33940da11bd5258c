r"""Does the input pipeline keep up with the training step? Both measured in one run.

  python -m benchmarks.input_pipeline                       # the demo (synthetic, 96 px)
  python -m benchmarks.input_pipeline --config configs/demo.py --batches 100
  python -m benchmarks.input_pipeline --augmented_view_source_size 192   # view cut from 192 px

Times the training stream alone (`input_pipeline.train_batches`: the config's sampler's
epoch order, decoding, batching, and with augmented_view_source_size the second read of each
row from the larger prepared images; nothing else running) and then the jitted training step
of the same config on a batch already in memory, and prints images/s of each and their
ratio. The pipeline should deliver several times what the step consumes, so the step never
waits.
"""
from __future__ import annotations

import importlib.util
import statistics
import time

import jax
from absl import app, flags

from ccl_jax.ccl import step
from ccl_jax.config import settings
from ccl_jax.datasets import input_pipeline
from ccl_jax.runtime import inference
from ccl_jax.datasets import selection
from ccl_jax.ccl.detector import build_network
from ccl_jax.weights.encoder_weights import frozen_encoder


def load_config(path: str):
  """`configs/<name>.py[:variant]` as ccl_jax.main reads it."""
  module_path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("benchmark_config", module_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _stream(config, dataset, train_indices, view_source):
  return input_pipeline.train_batches(
      dataset.train, train_indices, dataset.train_class_ids[train_indices],
      global_batch_size=config.batch_size, seed=config.seed, worker_count=config.worker_count,
      sampler=config.sampler, view_source=view_source)


def pipeline_images_per_second(config, dataset, train_indices, batches: int,
                               view_source=None) -> float:
  stream = _stream(config, dataset, train_indices, view_source)
  next(stream)  # start-up (threads, first reads) is not steady state
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  return batches * config.batch_size / (time.perf_counter() - start)


def step_images_per_second(config, dataset, train_indices, repeats: int,
                           view_source=None) -> float:
  run_settings = settings.from_config(config)
  replicated, batch_sharding = inference.replicated_sharding(), inference.batch_sharding()
  encoder, encoder_variables = frozen_encoder(run_settings, replicated)
  state = step.initial_state(build_network(run_settings), encoder, encoder_variables,
                             run_settings.optimizer, run_settings.image_size,
                             run_settings.seed, replicated)
  train_step = step.jit_train_step(encoder, run_settings.loss)
  stream = _stream(config, dataset, train_indices, view_source)
  batch = input_pipeline.to_global_array(next(stream), batch_sharding)
  state, metrics = train_step(state, encoder_variables, batch)  # compile
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = train_step(state, encoder_variables, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return config.batch_size / statistics.median(times)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags; defined when it runs, never on import."""
  flags.DEFINE_string("config", "configs/demo.py", "Config file, configs/<name>.py[:variant].",
                      flag_values=flag_values)
  flags.DEFINE_integer("batches", 60, "Batches drawn from the input pipeline.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("repeats", 5, "Timed training steps (median).", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("augmented_view_source_size", None, "Overrides the config's key of "
                       "that name (0: the augmented view from the image_size image).",
                       flag_values=flag_values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  config = load_config(args.config)
  if args.augmented_view_source_size is not None:
    config.augmented_view_source_size = args.augmented_view_source_size
  run_settings = settings.from_config(config)
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=True)
  view_source = None
  if run_settings.augmented_view_source_size:
    view_source = selection.load_view_source(
        run_settings.dataset, dataset, size=run_settings.augmented_view_source_size,
        is_main=True)
  train_indices, _ = selection.training_split(run_settings, dataset)
  pipeline = pipeline_images_per_second(config, dataset, train_indices, args.batches,
                                        view_source)
  consumed = step_images_per_second(config, dataset, train_indices, args.repeats, view_source)
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; config "
        f"{args.config} ({config.model.encoder}, {config.image_size} px, batch "
        f"{config.batch_size}, augmented view from "
        f"{run_settings.augmented_view_source_size or config.image_size} px)")
  print(f"input pipeline alone: {pipeline:8.1f} images/s")
  print(f"training step:        {consumed:8.1f} images/s")
  print(f"pipeline / step:      {pipeline / consumed:8.1f}x")


if __name__ == "__main__":
  define_flags()
  app.run(main)

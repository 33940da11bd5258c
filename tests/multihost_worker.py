"""One process of a (possibly multi-process) smoke training run, for tests/test_multihost.py.

  python tests/multihost_worker.py --workdir W --data_dir D [--variant ccl|rd] [--float64]
      [--distributed] [--checkpoint_every_steps N] [--stop_after_steps N] [--record FILE]

Runs the program's body (`ccl_jax.training.runner.run`) on configs/demo.py:smoke (or its RD baseline)
for one epoch, and exits as the program does when preempted (`ccl_jax.runtime.preemption`). With
--distributed it joins the run described by JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (ccl_jax.runtime.distributed), as the program does with
--distributed. The device count and CPU collectives come from the environment too
(JAX_NUM_CPU_DEVICES, JAX_CPU_COLLECTIVES_IMPLEMENTATION).

With --record, appends to FILE.<process index> one JSON line per batch this process's input
pipeline handed over: the dataset indices of its training rows ("train", per step; rows
are recognised by their pixels, so the pipeline itself is not changed) and the positions
of its real, not padding, evaluation rows ("eval", per pass over a split).
"""
import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from ccl_jax.training import runner
from ccl_jax.config import default_config
from ccl_jax.datasets import input_pipeline
from ccl_jax.runtime import distributed, preemption
from ccl_jax.config import settings
from ccl_jax.runtime import xla_options
from configs import demo  # noqa: E402


def _digest(image) -> bytes:
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest()


def _record_pipeline(path: str) -> None:
  """Wraps the train and eval streams so that every batch they yield is logged to `path`."""
  train_batches, eval_batches = input_pipeline.train_batches, input_pipeline.eval_batches
  log = open(f"{path}.{jax.process_index()}", "a")
  eval_passes = [0]

  def write(entry):
    # Line by line: a killed process keeps what it had handed over.
    log.write(json.dumps(entry) + "\n")
    log.flush()

  def recording_train_batches(source, *args, start_step=0, **kwargs):
    by_pixels = {_digest(source[i]["image"]): i for i in range(len(source))}
    if len(by_pixels) != len(source):
      raise RuntimeError("Two training images are identical: rows cannot be identified.")
    for step, batch in enumerate(train_batches(source, *args, start_step=start_step, **kwargs),
                                 start_step):
      write({"kind": "train", "step": step,
             "indices": [by_pixels[_digest(image)] for image in batch["image"]]})
      yield batch

  def recording_eval_batches(source, indices, **kwargs):
    eval_passes[0] += 1
    for batch in eval_batches(source, indices, **kwargs):
      real = np.asarray(batch["index"])[np.asarray(batch["valid"])]
      write({"kind": "eval", "pass": eval_passes[0], "size": len(indices),
             "positions": real.tolist()})
      yield batch

  input_pipeline.train_batches = recording_train_batches
  input_pipeline.eval_batches = recording_eval_batches


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = flag_values
  flags.DEFINE_string("workdir", None, "The run directory.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "Where the smoke data is prepared.", flag_values=fv)
  flags.DEFINE_bool("distributed", False, "Join the run the environment describes.",
                    flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout_s", distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
                       "Seconds after which a silent process stops the others.",
                       flag_values=fv)
  flags.DEFINE_enum("variant", "ccl", ["ccl", "rd"], "The smoke config (CCL), or its RD "
                    "baseline: no contrastive terms, no augmented view, a third of the "
                    "compilation time.", flag_values=fv)
  flags.DEFINE_bool("float64", False, "x64 and a float64 model, for comparisons across "
                    "device layouts.", flag_values=fv)
  flags.DEFINE_integer("checkpoint_every_steps", 0, "Checkpoint interval.", flag_values=fv)
  flags.DEFINE_integer("stop_after_steps", None, "Stop (as a preemption would) here.",
                       flag_values=fv)
  flags.DEFINE_string("record", None, "Log this process's batches to <record>.<process>.",
                      flag_values=fv)
  flags.mark_flags_as_required(["workdir", "data_dir"], flag_values=fv)


def main_worker(argv):
  del argv
  args = flags.FLAGS
  config = demo.get_config("smoke")
  config.dataset.data_dir = args.data_dir
  config.num_epochs = 1
  config.num_heatmaps_per_class = 0
  config.checkpoint_every_steps = args.checkpoint_every_steps
  if args.variant == "rd":
    config = default_config.as_rd_baseline(config)
  if args.float64:
    jax.config.update("jax_enable_x64", True)
    config.model.dtype = "float64"
  run_settings = settings.from_config(config)
  # What the program does first, before any backend starts.
  xla_options.use_cpu_low_memory_schedule(run_settings.xla_cpu_low_memory_schedule)
  if args.distributed:
    distributed.initialize(heartbeat_timeout_s=args.heartbeat_timeout_s)
  if args.record:
    _record_pipeline(args.record)
  try:
    runner.run(run_settings, args.workdir, stop_after_steps=args.stop_after_steps)
  except preemption.Preempted as e:
    print(e, flush=True)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  define_flags()
  app.run(main_worker)

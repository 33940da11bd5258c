r"""Entry point: `python -m ccl_jax.main --config configs/<name>.py[:variant] --workdir DIR`.

Overrides: `--config.<key>=<value>` (the config is locked: an unknown key is an error).

Multi-host (TPU pods, multi-node GPU): pass `--distributed` (or set CCL_JAX_DISTRIBUTED=1)
on every host; `jax.distributed.initialize()` then discovers the cluster from the TPU
metadata, SLURM or Open MPI environment, or from JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID. A single multi-GPU host needs no flag: every local
device is used.
"""
import logging as logging_std
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ccl_jax import distributed, train, xla_options

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and heatmaps.")
flags.DEFINE_bool("distributed", os.environ.get("CCL_JAX_DISTRIBUTED", "") == "1",
                  "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_integer("heartbeat_timeout", distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
                     "With --distributed: seconds after which a silent (dead) process stops "
                     "the others.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Drops the per-save INFO chatter of Orbax so the progress bar and results stay readable."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  xla_options.use_cpu_low_memory_schedule(FLAGS.config.xla_cpu_low_memory_schedule)
  if FLAGS.distributed:
    distributed.initialize(heartbeat_timeout_s=FLAGS.heartbeat_timeout)
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  run(FLAGS.config, FLAGS.workdir)


def run(config, workdir: str, *, stop_after_steps: int | None = None):
  """Trains (or fits HierCore) and evaluates `config` in `workdir`; the program's body."""
  return train.train_and_evaluate(config, workdir, stop_after_steps=stop_after_steps)


if __name__ == "__main__":
  app.run(main)

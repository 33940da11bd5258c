r"""Trains (RD/CCL) or fits (HierCore) a model, then evaluates it and fits its decisions.

  python -m ccl_jax.main --config configs/<name>.py[:variant] --workdir DIR \
      [--config.<key>=<value> ...]

The config is locked (an unknown key is an error) and read once, here, into typed settings
(`ccl_jax.config.settings`) validated before any work starts. A workdir holds one run: the same
command resumes it; a command with other settings is refused with the differing keys
(`ccl_jax.runs.run_dir`), and two programs never write one workdir at the same time.

Multi-host (TPU pods, multi-node GPU): pass `--distributed` (or set CCL_JAX_DISTRIBUTED=1)
on every process; `ccl_jax.runtime.distributed.initialize()` then finds the cluster in
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or in the TPU metadata, SLURM
or Open MPI environment (docs/multihost.md). A single multi-GPU host needs no flag: every
local device is used.
"""
from __future__ import annotations

import logging as logging_std
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ccl_jax.config import settings as settings_lib
from ccl_jax.runtime import distributed, files, preemption, xla_options
from ccl_jax.datasets.common import DatasetError


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import, as in every program)."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, heatmaps.",
                      flag_values=flag_values)
  flags.DEFINE_bool("distributed", os.environ.get("CCL_JAX_DISTRIBUTED", "") == "1",
                    "Join a multi-process run (ccl_jax.runtime.distributed.initialize).",
                    flag_values=flag_values)
  flags.DEFINE_integer("heartbeat_timeout", distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
                       "With --distributed: seconds after which a silent (dead) process "
                       "stops the others.", flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


class _QuietLibraries(logging_std.Filter):
  """Drops the per-save INFO chatter of Orbax so the progress bar and results stay readable,
  and the tracebacks of a storage failure that libraries log from each of their threads and
  tasks: the program says it once, in one line, as it ends."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.exc_info and files.storage_error(record.exc_info[1], "") is not None:
      return False
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    run_settings = settings_lib.from_config(flags.FLAGS.config)
  except settings_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  logging.get_absl_handler().addFilter(_QuietLibraries())
  xla_options.use_cpu_low_memory_schedule(run_settings.xla_cpu_low_memory_schedule)
  if flags.FLAGS.distributed:
    distributed.initialize(heartbeat_timeout_s=flags.FLAGS.heartbeat_timeout)
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)

  def after_storage_failure() -> str:
    from ccl_jax.runs.run_dir import RunDir  # pylint: disable=import-outside-toplevel
    return (f"Stopped; {RunDir(flags.FLAGS.workdir).newest_checkpoint()}. Make room or allow "
            "writing there, then rerun the same command to resume.")

  try:
    # Imported here: the XLA options must be set before JAX's backend starts.
    from ccl_jax.training import runner  # pylint: disable=import-outside-toplevel
    with files.storage_failures_end_the_program(after_storage_failure):
      runner.run(run_settings, flags.FLAGS.workdir)
  except DatasetError as e:
    # The dataset's problems are the user's to fix: their list, not a traceback.
    print(f"error: {e}", file=sys.stderr)
    return 1
  except preemption.Preempted as e:
    logging.warning("%s", e)
    return e.exit_code
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)

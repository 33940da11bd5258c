"""Joining a multi-process run: TPU pod slices, multi-node GPU clusters, CPU processes.

`initialize()` wraps `jax.distributed.initialize` with four changes:

* The cluster may be given as JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
  on any machine. JAX itself reads only the address from the environment; the count and
  the id it takes from TPU metadata, SLURM or Open MPI, so elsewhere (a hand-started
  cluster, Kubernetes without the `kubernetes` package, tests) it had no way to get them.
* A coordinator that cannot be reached is a Python error naming the address. JAX aborts
  the process instead, with "Terminating process because the JAX distributed service
  detected fatal errors ... another task died", which sends people looking for a dead task.
* Missing settings are an error that says which variables to set.
* A process that dies or fails no longer leaves the others hanging. JAX's coordination
  service already stops every process once one has missed heartbeats for
  `heartbeat_timeout_s` (they abort with "Terminating process because the JAX distributed
  service detected fatal errors ... The following tasks are unhealthy (stopped sending
  heartbeats)"); its default of 100 s is shortened here. But a process that fails with a
  Python exception keeps sending heartbeats while its exit waits, up to JAX's shutdown
  timeout (300 s), at the shutdown barrier for the others, and they wait for it inside a
  collective: so in a multi-process run an uncaught exception ends the process at once,
  and the others stop within the heartbeat timeout. (A survivor blocked in a collective
  may also see the dead peer's connection drop first: that is such an exception too.)
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback

import jax
from absl import logging

# Long enough for a host that is merely busy (heartbeats come from their own thread, so
# compilation, checkpoint writes and input decoding do not delay them), short enough that
# a dead peer stops the job in about a minute rather than JAX's 100 s.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# JAX's default: time for every process of a large slice to start and find the coordinator.
DEFAULT_INITIALIZATION_TIMEOUT_S = 300

_HOW_TO = ("Start every process with the same coordinator address (host:port of process 0) "
           "and process count and a distinct process id. On a TPU pod slice, under SLURM or "
           "Open MPI they are found automatically; elsewhere set JAX_COORDINATOR_ADDRESS, "
           "JAX_NUM_PROCESSES and JAX_PROCESS_ID.")


def _int_from_env(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once process 0's coordinator accepts connections; raises after `timeout_s`."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f"Could not reach the coordinator at {address} within {timeout_s:g} s ({e}). "
            "Is process 0 running, and is that port open to this host? " + _HOW_TO) from e
      # Process 0 may simply not have started yet: the processes of a job start in any order.
      time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               initialization_timeout_s: int = DEFAULT_INITIALIZATION_TIMEOUT_S) -> None:
  """Joins this process to the cluster; call it on every process before any JAX computation.

  Arguments left None come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, or else from the TPU, SLURM or Open MPI environment (JAX's detection).
  Returns with JAX's backend started (it asks for the process count), and, in a run of
  several processes, with an uncaught exception set to end this process at once.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None:
    num_processes = _int_from_env("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _int_from_env("JAX_PROCESS_ID")
  if heartbeat_timeout_s < 1:
    raise ValueError(f"heartbeat_timeout_s must be at least 1, got {heartbeat_timeout_s}.")
  if coordinator_address and process_id not in (None, 0):  # process 0 hosts it
    _wait_for_coordinator(coordinator_address, initialization_timeout_s)
  try:
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s)
  except (ValueError, TypeError, jax.errors.JaxRuntimeError) as e:
    this = "unknown" if process_id is None else process_id
    raise RuntimeError(
        f"Could not join the multi-process run (coordinator {coordinator_address or 'unknown'}"
        f", {num_processes or 'unknown'} processes, this is process {this}): "
        f"{type(e).__name__}: {str(e).rstrip('.')}. " + _HOW_TO) from e
  if jax.process_count() > 1:
    _exit_at_once_on_uncaught_exceptions()
  logging.info("Joined a run of %d processes as process %d; if one dies the others stop "
               "within ~%d s (the heartbeat timeout).", jax.process_count(),
               jax.process_index(), heartbeat_timeout_s)


def _exit_at_once_on_uncaught_exceptions() -> None:
  previous = sys.excepthook

  def hook(kind, value, tb):
    try:
      previous(kind, value, tb)
    except Exception:  # the report must not stop the exit
      traceback.print_exception(kind, value, tb)
    print(f"ccl_jax: process {jax.process_index()} of {jax.process_count()} stopped on the "
          "error above (a lost connection or a failed collective usually means that another "
          "process died first: see its log). Exiting now, so that the other processes stop "
          "within the heartbeat timeout instead of waiting for this one.",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: a normal exit first waits at JAX's shutdown barrier for processes that
    # are themselves waiting for this one.
    os._exit(1)

  sys.excepthook = hook

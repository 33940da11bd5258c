"""Stopping on SIGTERM or SIGINT without losing work: `StopSignals`, `Preempted`, EXIT_CODE.

TPU VMs, SLURM and Kubernetes preempt a job with SIGTERM and a grace period before SIGKILL.
While the signals are watched (`StopSignals`, installed by `ccl_jax.training.runner.run`):

* during training, a signal is only noted. Every process stops after the same step: in a
  single process the first step boundary after the signal; in a multi-process run the step
  that JAX's preemption sync point names (`multihost_utils.reached_preemption_sync_point`:
  the signalled process tells the others through the coordination service, and all agree
  on the step after the furthest one reached). There the loop saves a checkpoint (unless
  that step is saved already) and raises `Preempted`;
* elsewhere (data preparation, building the model, evaluation, HierCore fitting) nothing is
  left that a rerun cannot redo: in a single process the signal raises `Preempted` at once.
  Every file is written atomically and a checkpoint is committed by a rename, so the
  interrupted write leaves the previous version.

A program ends on `Preempted` with EXIT_CODE (75, EX_TEMPFAIL of sysexits.h: "try again
later"), and the same command resumes the run.

In a multi-process run SIGTERM is JAX's: its preemption notifier (installed by
`jax.distributed.initialize`) receives it, and SIGINT is passed on to it as SIGTERM. Outside
training the processes carry on with the phase they are in (stopping one of them there would
leave the others waiting in a collective); the scheduler's SIGKILL at the end of the grace
period ends them, and the rerun repeats that phase.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal; what it had done is saved, and a rerun resumes it."""

  exit_code = EXIT_CODE


def _multi_process() -> bool:
  return jax.process_count() > 1


class StopSignals:
  """Watches SIGTERM and SIGINT while installed (a context manager, main thread only)."""

  def __init__(self):
    self.received: str | None = None
    self._deferring = False

  @contextlib.contextmanager
  def installed(self) -> Iterator["StopSignals"]:
    if threading.current_thread() is not threading.main_thread():
      # Python delivers signals to the main thread only: nothing to watch from here.
      yield self
      return
    watched = (signal.SIGINT,) if _multi_process() else _SIGNALS
    previous = {s: signal.signal(s, self._handle) for s in watched}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)

  def _handle(self, signum: int, frame) -> None:
    del frame
    if _multi_process():
      # JAX's notifier owns SIGTERM and runs the agreement on the stopping step.
      os.kill(os.getpid(), signal.SIGTERM)
      return
    self.received = signal.Signals(signum).name
    if not self._deferring:
      raise Preempted(f"Stopped by {self.received} outside training (nothing there needs "
                      f"saving); exiting with code {EXIT_CODE}. Rerun the same command to "
                      "resume.")

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """Within the block a signal is only noted, for `should_stop` to act on."""
    self._deferring = True
    try:
      yield
    finally:
      self._deferring = False

  def should_stop(self, step: int) -> bool:
    """True at the step every process stops at; call it after every training step, on
    every process (the multi-process agreement counts the calls)."""
    if _multi_process():
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  def stop_requested(self) -> bool:
    """A signal arrived while deferred and nothing has acted on it (one process)."""
    return not _multi_process() and self.received is not None

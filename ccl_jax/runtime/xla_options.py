"""Process-wide XLA options, set before JAX initialises its backends.

XLA:CPU orders independent operations for concurrency by default, which keeps many
activations live at once (and, in the whole-map positive search, every block of the
similarity matrix). Its memory-minimising schedule runs the same kernels in another order:
XLA's buffer plan for the paper setting's training step falls from 10.2 to 6.8 GiB, at the
same speed on a 2-core CPU (`python -m benchmarks.cpu_schedule`). The option only exists as a
process flag: jit's per-function `compiler_options` accept it but this XLA's CPU compiler
does not act on it there.
"""
from __future__ import annotations

import os

CPU_SCHEDULER_OPTION = "xla_cpu_enable_concurrency_optimized_scheduler"


def _backends_started() -> bool:
  # JAX has no public query for this; its private one is looked up defensively, and where a
  # JAX version lacks it the flag is set and simply has no effect on a started backend.
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def use_cpu_low_memory_schedule(enabled: bool) -> None:
  """Ask XLA:CPU for its memory-minimising schedule (enabled) or leave its default.

  A choice already made in XLA_FLAGS wins. Must run before the first JAX computation or
  device query: XLA reads its flags once, when the first backend starts.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if not enabled or CPU_SCHEDULER_OPTION in flags:
    return
  if _backends_started():
    raise RuntimeError(
        "use_cpu_low_memory_schedule must be called before JAX initialises its backends "
        f"(before any computation or jax.devices()); or set XLA_FLAGS=--{CPU_SCHEDULER_OPTION}"
        "=false in the environment.")
  os.environ["XLA_FLAGS"] = f"{flags} --{CPU_SCHEDULER_OPTION}=false".strip()

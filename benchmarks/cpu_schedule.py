"""XLA:CPU's two schedules for ccl_jax's training step: memory-minimising against concurrent.

  python -m benchmarks.cpu_schedule --settings small --rounds 10   # about 3 min on 2 cores
  python -m benchmarks.cpu_schedule --settings paper --rounds 3    # about 8 min, ~20 GiB

The schedule is a process-wide XLA flag (`ccl_jax.runtime.xla_options`), so each schedule gets its
own worker process holding one compiled step (the benchmark's `JaxStep`: same model, batch and
loss settings as `benchmarks.train_step`); the workers take turns, one step each per round,
after one warm-up step. Prints each schedule's XLA buffer plan and median s/step, and writes
benchmarks/results/cpu_schedule_<setting>.json.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from benchmarks.train_step import RESULTS, SETTINGS
from ccl_jax.runtime.xla_options import CPU_SCHEDULER_OPTION

SCHEDULES = {"low_memory": "false", "concurrent": "true"}  # CPU_SCHEDULER_OPTION's value


def worker(setting_name: str) -> None:
  """Compile and warm one step, then run one step per line read from stdin."""
  from benchmarks.train_step import JaxStep, jax_loss_settings, make_batch  # pylint: disable=import-outside-toplevel
  setting = SETTINGS[setting_name]
  runner = JaxStep(setting, jax_loss_settings("minimal"), make_batch(setting))
  runner()
  print(json.dumps({"planned_mib": runner.planned_bytes() / 2**20}), flush=True)
  for _ in sys.stdin:
    start = time.perf_counter()
    runner()
    print(time.perf_counter() - start, flush=True)


def compare(setting_name: str, rounds: int) -> dict:
  workers = {}
  for name, value in SCHEDULES.items():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --{CPU_SCHEDULER_OPTION}={value}".strip()
    env = dict(os.environ, XLA_FLAGS=flags)
    workers[name] = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.cpu_schedule", "--worker", setting_name], env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  result = {name: json.loads(w.stdout.readline()) for name, w in workers.items()}
  times = {name: [] for name in workers}
  for _ in range(rounds):
    for name, w in workers.items():
      w.stdin.write("step\n")
      w.stdin.flush()
      times[name].append(float(w.stdout.readline()))
  for name, w in workers.items():
    w.stdin.close()
    w.wait()
    result[name].update(median_s=statistics.median(times[name]), times_s=times[name])
  return result


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags; defined when it runs, never on import."""
  flags.DEFINE_list("settings", "small", "Comma-separated of: " + ", ".join(SETTINGS),
                    flag_values=flag_values)
  flags.DEFINE_integer("rounds", 5, "Interleaved rounds of one step per schedule.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_string("worker", None, "Internal: run as the worker process of this setting.",
                      flag_values=flag_values)
  flags.register_validator(
      "settings", lambda names: set(names) <= set(SETTINGS),
      f"--settings: expected some of {sorted(SETTINGS)}.", flag_values=flag_values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  if args.worker:
    worker(args.worker)
    return
  for name in args.settings:
    result = compare(name, args.rounds)
    result["machine"] = {"cpu_count": os.cpu_count(), "ld_preload": os.environ.get("LD_PRELOAD"),
                         "date": time.strftime("%Y-%m-%d")}
    with open(os.path.join(RESULTS, f"cpu_schedule_{name}.json"), "w") as f:
      json.dump(result, f, indent=2)
    low, concurrent = result["low_memory"], result["concurrent"]
    print(f"{name}: XLA plan {low['planned_mib']:.0f} MiB (low_memory) vs "
          f"{concurrent['planned_mib']:.0f} MiB (concurrent) = "
          f"{low['planned_mib'] / concurrent['planned_mib']:.2f}x; step {low['median_s']:.3f} s "
          f"vs {concurrent['median_s']:.3f} s = {low['median_s'] / concurrent['median_s']:.2f}x "
          f"(median of {args.rounds} interleaved rounds)", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)

"""SIGTERM and SIGINT on one process: the program saves the step it is at, says so in one
line, exits with code 75, and the same command resumes to the uninterrupted run's result.

The program test sends a real SIGTERM to `python -m ccl_jax.main` while it trains; the others
send it from inside the program's body (`ccl_jax.training.runner.run`) at a chosen moment: during a
checkpoint save, during the final evaluation and during data preparation. The two-process
case is tests/test_multihost.py's (f).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccl_jax.training import runner
from ccl_jax.evaluation import decide
from ccl_jax.runtime import preemption
from ccl_jax.datasets import builders
from ccl_jax.runs.run_dir import RunDir

EPOCHS = 3
STEPS = 27  # 3 epochs of 9 steps: 72 training images (80 less 10 % held out) / batch 8
TIMEOUT_S = 600


def _state(workdir: str) -> tuple[int, dict[str, np.ndarray]]:
  """Step and every array of checkpoints/latest (parameters, BatchNorm, optimizer)."""
  directory = os.path.join(workdir, "checkpoints", "latest")
  step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          tree)))
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def _assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  assert a.keys() == b.keys()
  different = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not different, different[:5]


def _metrics(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.json")) as f:
    result = json.load(f)
  # Wall-clock figures differ between any two runs.
  for entry in result["training_log"]:
    entry.pop("images_per_second")
  return result


def _command(workdir: str, data_dir: str) -> list[str]:
  return [sys.executable, "-m", "ccl_jax.main", "--config", "configs/demo.py:smoke",
          "--workdir", workdir, f"--config.dataset.data_dir={data_dir}",
          f"--config.num_epochs={EPOCHS}", "--config.num_heatmaps_per_class=0"]


def _env(cache_dir: str) -> dict[str, str]:
  # One compilation cache for the three runs: the resumed ones find everything compiled.
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def _steps_shown(log: str) -> int:
  """The last step count of the progress bar ('train: ... 5/27 [...')."""
  with open(log, errors="replace") as f:
    counts = re.findall(rf"\b(\d+)/{STEPS} \[", f.read())
  return int(counts[-1]) if counts else 0


@pytest.mark.slow
def test_sigterm_saves_the_step_and_the_rerun_resumes_bit_exact(repo_root, smoke_data_dir,
                                                                tmp_path, smoke_settings):
  """SIGTERM at step >= 3 of 27: exit 75 after one line naming the saved step, which is
  the step the run had reached; the same command then finishes with the state (every
  array, bit for bit) and metrics of an uninterrupted run."""
  smoke_settings()  # the session's smoke data exists before the runs read it
  env = _env(str(tmp_path / "cache"))
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "preempted")
  subprocess.run(_command(reference, smoke_data_dir), cwd=repo_root, env=env, check=True,
                 capture_output=True, timeout=TIMEOUT_S)
  log = str(tmp_path / "preempted.log")
  with open(log, "w") as out:
    process = subprocess.Popen(_command(workdir, smoke_data_dir), cwd=repo_root, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
  try:
    started = time.monotonic()
    while _steps_shown(log) < 3 and process.poll() is None:
      assert time.monotonic() - started < TIMEOUT_S
      time.sleep(0.02)
    # Held still while signalled, so that the signal lands in training whatever the load.
    process.send_signal(signal.SIGSTOP)
    signalled_at = _steps_shown(log)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    process.wait(timeout=TIMEOUT_S)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  with open(log, errors="replace") as f:
    output = f.read()
  assert process.returncode == preemption.EXIT_CODE == 75, output[-3000:]
  lines = [line for line in output.splitlines() if "Preempted" in line]
  assert len(lines) == 1, output[-3000:]
  saved = int(re.search(r"saved step (\d+) of 27", lines[0]).group(1))
  assert "SIGTERM" in lines[0] and "Rerun the same command" in lines[0]
  assert 3 <= signalled_at <= saved < STEPS
  step, _ = _state(workdir)
  assert step == saved
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))

  subprocess.run(_command(workdir, smoke_data_dir), cwd=repo_root, env=env, check=True,
                 capture_output=True, timeout=TIMEOUT_S)
  (step_a, state_a), (step_b, state_b) = _state(reference), _state(workdir)
  assert step_a == step_b == STEPS
  _assert_identical(state_b, state_a)
  resumed, expected = _metrics(workdir), _metrics(reference)
  assert resumed["metrics"] == expected["metrics"]
  assert resumed["history"] == expected["history"]


def _settings(smoke_settings, **overrides):
  return smoke_settings(num_epochs=1, validation_fraction=0.25, num_heatmaps_per_class=0,
                        **overrides)


def _signal_self() -> None:
  os.kill(os.getpid(), signal.SIGTERM)


def _run_signalled_in(monkeypatch, owner, name: str, signal_now, run_settings, workdir: str,
                      stopped: str) -> None:
  """`runner.run` with `owner.name` wrapped to send this process a SIGTERM before the call
  where `signal_now(*args)` holds; the run must stop with a Preempted matching `stopped`."""
  real = getattr(owner, name)

  def signalled(*args, **kwargs):
    if signal_now(*args):
      _signal_self()
    return real(*args, **kwargs)

  monkeypatch.setattr(owner, name, signalled)
  with pytest.raises(preemption.Preempted, match=stopped):
    runner.run(run_settings, workdir)
  monkeypatch.undo()


# Slow: SIGTERM goes to the pytest process itself, beside JAX and Orbax threads; after many
# other tests in one process this has ended the process silently (twice), while a fresh
# process passes them. The real program path is the subprocess test above.
@pytest.mark.slow
def test_signal_during_a_save_ends_the_save_then_stops_after_the_next_step(
    trained_smoke_run, smoke_settings, tmp_path, monkeypatch):
  """A SIGTERM that arrives while the checkpoint of step 3 is written: that save completes,
  the run stops after step 4, which it saves, and resuming reaches the uninterrupted run
  (the session's trained smoke run) bit for bit."""
  reference = trained_smoke_run[1]
  run_settings = _settings(smoke_settings, checkpoint_every_steps=3)
  workdir = str(tmp_path / "run")
  _run_signalled_in(monkeypatch, RunDir, "save_checkpoint",
                    lambda self, which, state, meta: int(state.step) == 3, run_settings,
                    workdir, "by SIGTERM: saved step 4 of")
  assert _state(workdir)[0] == 4
  runner.run(run_settings, workdir)
  (step_a, state_a), (step_b, state_b) = _state(reference), _state(workdir)
  assert step_a == step_b
  _assert_identical(state_b, state_a)
  assert _metrics(workdir)["metrics"] == _metrics(reference)["metrics"]


@pytest.mark.slow
def test_signal_during_evaluation_stops_at_once_and_the_rerun_evaluates(
    trained_smoke_run, smoke_settings, tmp_path, monkeypatch):
  """Training is done and saved: a SIGTERM during the final evaluation ends the run there,
  with no results written, and the rerun evaluates the saved state to the uninterrupted
  run's metrics."""
  reference = trained_smoke_run[1]
  run_settings = _settings(smoke_settings)
  workdir = str(tmp_path / "run")
  _run_signalled_in(monkeypatch, decide, "fit_and_evaluate", lambda *args: True,
                    run_settings, workdir, "outside training")
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))
  assert _state(workdir)[0] == _state(reference)[0]
  runner.run(run_settings, workdir)
  assert _metrics(workdir)["metrics"] == _metrics(reference)["metrics"]


@pytest.mark.slow
def test_signal_during_data_preparation_leaves_data_and_workdir_that_rerun(
    smoke_settings, tmp_path, monkeypatch, prepared_dirs, incomplete_dirs):
  """SIGTERM while the dataset is being written: nothing half-prepared is left, and the
  same command prepares the data and trains."""
  data_dir, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  run_settings = _settings(smoke_settings, **{"dataset.data_dir": data_dir})
  calls = []

  def fourth_call(*args):
    calls.append(1)
    return len(calls) == 4

  _run_signalled_in(monkeypatch, builders, "encode_sample", fourth_call, run_settings,
                    workdir, "outside training")
  assert len(calls) == 4
  assert not incomplete_dirs(data_dir)
  result = runner.run(run_settings, workdir, stop_after_steps=1)
  assert result["step"] == 1
  assert len(prepared_dirs(data_dir)) == 2  # carpet and washer


def test_outside_a_run_the_signals_are_left_as_they_were():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with preemption.StopSignals().installed():
    assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
  assert {s: signal.getsignal(s) for s in before} == before

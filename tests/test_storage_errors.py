"""Storage failures (a full disk, a read-only file system, a refused write) end the programs
with one line naming the path, the free space where it applies and the newest intact
checkpoint, exit code 74, and no temporary files left.

The file systems are real: small tmpfs mounts (a test that cannot mount fails, it is not
skipped: these tests need root, as CI has), remounted read-only where needed, and an
immutable folder (chattr +i, which root cannot write into either).
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys

import flax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ccl_jax.runtime import files
from ccl_jax.runs.run_dir import RunDir

STORAGE_EXIT_CODE = 74


@contextlib.contextmanager
def _tmpfs(path, size: str = "4m", read_only: bool = False):
  path = str(path)
  os.makedirs(path, exist_ok=True)
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
  try:
    if read_only:
      subprocess.run(["mount", "-o", "remount,ro", path], check=True)
    yield path
  finally:
    subprocess.run(["umount", path], check=True)


def _run(repo_root, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], cwd=repo_root, capture_output=True,
                        text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _leftovers(folder: str) -> list[str]:
  return [os.path.join(d, n) for d, dirs, names in os.walk(folder) for n in dirs + names
          if ".orbax-checkpoint-tmp" in n or n.endswith(".tmp")]


def _train(repo_root, workdir: str, data_dir: str) -> subprocess.CompletedProcess:
  return _run(repo_root, "ccl_jax.main", "--config", "configs/demo.py:smoke", "--workdir",
              workdir, f"--config.dataset.data_dir={data_dir}")


def _assert_one_line_error(out: subprocess.CompletedProcess, *parts: str) -> str:
  assert out.returncode == STORAGE_EXIT_CODE, out.stderr[-3000:]
  assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cannot write "), out.stderr[-3000:]
  for part in parts:
    assert part in last, last
  return last


@pytest.mark.slow
def test_training_on_a_full_disk_says_so_in_one_line(repo_root, smoke_data_dir,
                                                     smoke_settings, tmp_path):
  """A 4 MB file system holds the run's small files but not its first checkpoint (10 MB):
  the run ends at that save with one line naming the folder, the space free and needed,
  and that there is no checkpoint yet; nothing temporary is left."""
  smoke_settings()  # the session's smoke data exists before the run reads it
  with _tmpfs(tmp_path / "small") as small:
    workdir = os.path.join(small, "run")
    out = _train(repo_root, workdir, smoke_data_dir)
    last = _assert_one_line_error(
        out, os.path.join(workdir, "checkpoints", "best"), "No space left on device",
        "free of 4.2 MB on its file system", "needed", "no checkpoint has been saved yet")
    assert len(last) < 400
    assert not _leftovers(small)
    assert os.path.exists(os.path.join(workdir, "config.json"))


@flax.struct.dataclass
class _State:
  step: jnp.ndarray
  params: dict
  batch_stats: dict


def _state(step: int, size: int) -> _State:
  # Random values: Orbax compresses, and a constant array would take almost no space.
  weights = np.random.default_rng(step).standard_normal(size).astype(np.float32)
  return _State(jnp.asarray(step), {"w": jnp.asarray(weights)},
                {"mean": jnp.zeros((2,), jnp.float32)})


def test_a_save_that_runs_out_of_space_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
  """When the disk fills during a save (here: the free-space check told there was room),
  the Orbax error becomes the one-line StorageError, the half-written step is deleted and
  the earlier step still restores."""
  with _tmpfs(tmp_path / "small") as small:
    run_dir = RunDir(os.path.join(small, "run"))
    run_dir.save_checkpoint("latest", _state(1, 1000), {"n": 1})
    monkeypatch.setattr("ccl_jax.runs.run_dir.disk_space", lambda path: (1 << 40, 1 << 40))
    with pytest.raises(files.StorageError) as failure:
      run_dir.save_checkpoint("latest", _state(2, 2_000_000), {"n": 2})  # 8 MB
    assert failure.value.errno == errno.ENOSPC
    assert str(failure.value).startswith(
        f"cannot write {run_dir.checkpoint_dir('latest')}: No space left on device (")
    assert not _leftovers(small)
    assert run_dir.checkpoint_step("latest") == 1
    state, meta = run_dir.restore_checkpoint("latest", _state(0, 1000))
    assert int(state.step) == 1 and meta == {"n": 1}
    np.testing.assert_array_equal(state.params["w"], _state(1, 1000).params["w"])


def test_training_into_a_read_only_workdir_says_so_before_any_work(repo_root, smoke_data_dir,
                                                                   smoke_settings, tmp_path):
  smoke_settings()
  with _tmpfs(tmp_path / "ro", read_only=True) as read_only:
    workdir = os.path.join(read_only, "run")
    out = _train(repo_root, workdir, smoke_data_dir)
    _assert_one_line_error(out, workdir, "Read-only file system",
                           "no checkpoint has been saved yet")
    assert "train:" not in out.stderr


def test_preparing_data_on_a_read_only_data_dir_names_it(repo_root, tmp_path):
  with _tmpfs(tmp_path / "ro", read_only=True) as read_only:
    out = _train(repo_root, str(tmp_path / "run"), read_only)
    _assert_one_line_error(out, read_only, "Read-only file system")


def test_a_workdir_that_refuses_writes_keeps_its_checkpoint(repo_root, trained_smoke_run,
                                                            tmp_path):
  """An immutable workdir (chattr +i: even root gets 'Operation not permitted'), holding a
  finished run: rerunning names the workdir and its newest checkpoint, which is intact."""
  run_settings, trained = trained_smoke_run
  step = RunDir(trained).checkpoint_step("latest")
  subprocess.run(["chattr", "+i", trained], check=True)
  try:
    out = _run(repo_root, "ccl_jax.main", "--config", "configs/demo.py:smoke", "--workdir",
               trained, f"--config.dataset.data_dir={run_settings.dataset.data_dir}",
               "--config.num_epochs=1", "--config.validation_fraction=0.25",
               "--config.num_heatmaps_per_class=0")
  finally:
    subprocess.run(["chattr", "-i", trained], check=True)
  _assert_one_line_error(out, trained, "Operation not permitted",
                         f"the newest checkpoint is step {step} in")
  assert RunDir(trained).checkpoint_step("latest") == step


def test_export_to_a_full_disk_leaves_nothing(repo_root, trained_smoke_run, tmp_path):
  with _tmpfs(tmp_path / "small", size="1m") as small:
    output = os.path.join(small, "model")
    out = _run(repo_root, "ccl_jax.export", "--workdir", trained_smoke_run[1], "--output",
               output, "--format", "jax")
    _assert_one_line_error(out, output, "No space left on device", "free of 1.0 MB",
                           "was left as it was")
    assert os.listdir(small) == []


def test_predict_output_on_a_read_only_file_system_is_refused_first(repo_root,
                                                                    trained_smoke_run,
                                                                    tmp_path):
  image = tmp_path / "images" / "part.png"
  image.parent.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
  with _tmpfs(tmp_path / "ro", read_only=True) as read_only:
    output = os.path.join(read_only, "predictions.csv")
    out = _run(repo_root, "ccl_jax.predict", "--workdir", trained_smoke_run[1], "--images",
               str(image.parent), "--output", output)
    _assert_one_line_error(out, output, "Read-only file system")

"""The run directory: its files written atomically and read back with clear errors, the
lock, refusing a workdir of another run, and checkpoints that never hold a NaN and survive a
kill at any point."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from ccl_jax import hiercore
from ccl_jax.decisions import grouping, thresholds
from ccl_jax.runs import run_dir
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.runs.loading import load_detector


def test_memory_bank_save_load_round_trip_and_errors(tmp_path):
  bank = hiercore.MemoryBank.create(
      np.random.default_rng(7).normal(size=(2, 5, 4)).astype(np.float32), np.array([5, 3]))
  path = RunDir(str(tmp_path / "sub")).write_memory_bank(bank)
  loaded = RunDir(str(tmp_path / "sub")).read_memory_bank()
  np.testing.assert_array_equal(loaded.features, bank.features)
  np.testing.assert_array_equal(loaded.counts, bank.counts)
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["memory_bank.npz"]  # no temporary left

  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match="bank.npz.*not a readable .npz"):
    run_dir.read_memory_bank_file(path)
  np.savez(path, features=bank.features, format_version=np.int32(1))
  with pytest.raises(ValueError, match=r"bank.npz.*lacks the keys \['counts'\]"):
    run_dir.read_memory_bank_file(path)
  np.savez(path, features=bank.features, counts=np.array([5, 6], np.int32),
           format_version=np.int32(1))
  with pytest.raises(ValueError, match="bank.npz.*inconsistent.*1 to 5 coreset points"):
    run_dir.read_memory_bank_file(path)
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    run_dir.read_memory_bank_file(str(tmp_path / "missing.npz"))



# ----------------------------------------------------------------------------
# decision.json
# ----------------------------------------------------------------------------


def _decision():
  groups = grouping.Groups(np.array([[0.6, 0.8], [1.0, 0.0]], np.float32), ("bottle", "cable"),
                           True)
  estimated = thresholds.estimate_thresholds(np.array([0.1, 0.2, 0.3, 0.7]),
                                             np.array([0, 0, 1, 1]), 2, alpha=0.1)
  meta = {"model": "hiercore", "embedding_dim": 2, "rule": estimated.rule}
  return groups, estimated, meta


def test_save_load_round_trip(tmp_path):
  groups, estimated, meta = _decision()
  workdir = str(tmp_path / "run")
  path = RunDir(workdir).write_decision(groups, estimated, meta)
  assert path == os.path.join(workdir, run_dir.DECISION_FILE)
  assert os.listdir(workdir) == ["decision.json"]  # no temp file left behind
  loaded_groups, loaded_thresholds, loaded_meta = RunDir(workdir).read_decision()
  assert loaded_groups == groups and loaded_thresholds == estimated and loaded_meta == meta
  np.testing.assert_array_equal(loaded_thresholds.per_group, estimated.per_group)
  # Overwriting replaces the file in place.
  RunDir(workdir).write_decision(groups, estimated, {"model": "rd"})
  assert RunDir(workdir).read_decision()[2] == {"model": "rd"}
  assert os.listdir(workdir) == ["decision.json"]


def test_save_rejects_inconsistent_or_unserialisable_input(tmp_path):
  groups, estimated, meta = _decision()
  three = grouping.Groups(np.eye(3), ("a", "b", "c"), False)
  with pytest.raises(ValueError, match="must match"):
    RunDir(str(tmp_path)).write_decision(three, estimated, meta)
  with pytest.raises(ValueError, match="meta"):
    RunDir(str(tmp_path)).write_decision(groups, estimated, {"auroc": float("nan")})
  with pytest.raises(ValueError, match="meta"):
    RunDir(str(tmp_path)).write_decision(groups, estimated, {"x": object()})
  assert not os.listdir(tmp_path)  # a failed save writes nothing


def _corrupt(tmp_path, edit):
  groups, estimated, meta = _decision()
  path = RunDir(str(tmp_path)).write_decision(groups, estimated, meta)
  with open(path) as f:
    document = json.load(f)
  edit(document)
  with open(path, "w") as f:
    json.dump(document, f)
  return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("thresholds"), "missing key 'thresholds'"),
    (lambda d: d.pop("meta"), "missing key 'meta'"),
    (lambda d: d["groups"].pop("centroids"), "key 'groups': missing key 'centroids'"),
    (lambda d: d["thresholds"].pop("per_group"), "key 'thresholds': missing key 'per_group'"),
    (lambda d: d["thresholds"].update(rule="median"), "key 'thresholds'.*rule must be one of"),
    (lambda d: d["thresholds"].update(params={"k": 2}), "key 'thresholds'.*unknown"),
    (lambda d: d["thresholds"].update(per_group=[1.0], num_normal=[4]),
     "'thresholds.per_group' has 1 values"),
    (lambda d: d["groups"].update(names="bottle"), "key 'groups': key 'names'"),
    (lambda d: d.update(format_version=99), "format_version"),
    (lambda d: d.update(meta=[1]), "key 'meta' must be a JSON object"),
])
def test_load_names_file_and_key_on_corruption(tmp_path, edit, message):
  path = _corrupt(tmp_path, edit)
  with pytest.raises(ValueError, match=message) as err:
    RunDir(str(tmp_path)).read_decision()
  assert path in str(err.value)


def test_load_missing_and_malformed_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="decision.json"):
    RunDir(str(tmp_path)).read_decision()
  path = tmp_path / "decision.json"
  path.write_text('{"groups": ')
  with pytest.raises(ValueError, match="decision.json: not valid JSON"):
    RunDir(str(tmp_path)).read_decision()
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match="top level must be a JSON object"):
    RunDir(str(tmp_path)).read_decision()


# ----------------------------------------------------------------------------
# One run per workdir
# ----------------------------------------------------------------------------


def test_a_workdir_of_another_run_is_refused_before_any_work(smoke_settings, tmp_path):
  from ccl_jax.training import runner
  workdir = tmp_path / "run"
  stored = smoke_settings()
  RunDir(str(workdir)).write_settings(stored)
  before = (workdir / "config.json").read_text()
  other = smoke_settings(**{"dataset.classes": "grid,tile", "seed": 7,
                            "optimizer.learning_rate": 0.5})
  with pytest.raises(run_dir.RunDirError) as err:
    runner.run(other, str(workdir))
  message = str(err.value)
  for line in ("dataset.classes: ['carpet', 'washer'] -> ['grid', 'tile']", "seed: 0 -> 7",
               "optimizer.learning_rate: 0.005 -> 0.5"):
    assert line in message
  assert "another --workdir" in message and "ccl_jax.evaluate --workdir" in message
  assert (workdir / "config.json").read_text() == before
  assert sorted(os.listdir(workdir)) == [".lock", "config.json"]
  # Keys that do not change what is trained (how long, where the data lies, the decision
  # rule, logging) do not make another run.
  extended = smoke_settings(num_epochs=5, log_every_steps=7,
                            **{"decision.rule": "max", "dataset.data_dir": "/elsewhere"})
  RunDir(str(workdir)).check_same_run(extended)


def test_a_locked_workdir_is_refused_at_once(smoke_settings, tmp_path):
  from ccl_jax.training import runner
  workdir = str(tmp_path / "run")
  with RunDir(workdir).lock():
    with pytest.raises(run_dir.RunDirError, match="is in use by process .*another --workdir"):
      runner.run(smoke_settings(), workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  # Released with its holder: the lock can be taken again.
  with RunDir(workdir).lock():
    pass


def test_reading_a_run_creates_nothing(trained_smoke_run, tmp_path):
  _, trained = trained_smoke_run
  shutil.copy(os.path.join(trained, "config.json"), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    load_detector(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="decision.json not found"):
    RunDir(str(tmp_path)).read_decision()
  assert os.listdir(tmp_path) == ["config.json"]


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def _latest_params(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  return step, state


def test_a_non_finite_state_is_never_saved(smoke_settings, tmp_path):
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from ccl_jax.config import settings
  from ccl_jax.training import train
  workdir = str(tmp_path / "run")
  good = smoke_settings(checkpoint_every_steps=1, log_every_steps=100)
  train.train_and_evaluate(good, workdir, stop_after_steps=2)
  # A NaN learning rate (refused by the settings, so set behind their back) makes every
  # later state NaN; checkpoints every step, metrics read only at the epoch end.
  nan_optimizer = settings.OptimizerSettings(float("nan"), float("nan"), 0.5, 0.999, 5.0)
  with pytest.raises(FloatingPointError, match=r"last finite checkpoint \(step 2\) is kept"):
    train.train_and_evaluate(dataclasses.replace(good, optimizer=nan_optimizer), workdir)
  step, state = _latest_params(workdir)
  assert step == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))
  # ... so the same command with a sane learning rate resumes from it.
  result = train.train_and_evaluate(good, workdir, stop_after_steps=3)
  assert result["step"] == 3
  step, state = _latest_params(workdir)
  assert step == 3
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))


def test_a_kill_between_the_best_and_latest_saves_resumes(smoke_settings, tmp_path,
                                                           monkeypatch):
  from ccl_jax.training import train
  workdir = str(tmp_path / "run")
  save = RunDir.save_checkpoint

  def killed_before_latest(self, which, state, meta):
    if which == "latest" and int(state.step) == 9:  # the first epoch end, after best/9
      raise KeyboardInterrupt("killed")
    save(self, which, state, meta)

  monkeypatch.setattr(RunDir, "save_checkpoint", killed_before_latest)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(smoke_settings(), workdir)
  assert RunDir(workdir).checkpoint_step("best") == 9
  assert RunDir(workdir).checkpoint_step("latest") is None
  monkeypatch.setattr(RunDir, "save_checkpoint", save)
  result = train.train_and_evaluate(smoke_settings(), workdir)
  assert result["step"] == 18
  assert RunDir(workdir).checkpoint_step("latest") == 18


def test_resuming_with_another_model_shape_names_the_parameter(smoke_settings, tmp_path):
  from ccl_jax.training import train
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(smoke_settings(), workdir, stop_after_steps=1)
  # resnet18's feature maps have other channel counts than efficientnet_lite0's.
  other = smoke_settings(**{"model.encoder": "resnet18", "model.encoder_weights": "none"})
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(other, workdir)
  message = str(err.value)
  assert "does not fit the model" in message and "params/decoder/" in message
  assert "checkpoint (" in message and ", model (" in message
  assert len(message.splitlines()) < 30

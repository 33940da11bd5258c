"""The training loop end to end on the synthetic smoke config."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccl_jax import datasets
from ccl_jax.config import settings
from ccl_jax.decisions import grouping
from ccl_jax.training import train
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.ccl.detector import build_network
from ccl_jax.models.detector import Router
from ccl_jax.weights.encoder_weights import frozen_encoder
from configs import demo, mvtec_ad


def latest_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


@pytest.fixture(scope="module")
def full_run(smoke_settings, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  result = train.train_and_evaluate(smoke_settings(), workdir)
  return workdir, result


def test_end_to_end_writes_metrics_table_and_heatmaps(full_run):
  workdir, result = full_run
  with open(os.path.join(workdir, "metrics.json")) as f:
    saved = json.load(f)
  keys = {"image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1_max",
          "pixel_f1_max", "mad"}
  assert set(saved["metrics"]["per_class"]) == {"carpet", "washer"}
  for row in list(saved["metrics"]["per_class"].values()) + [saved["metrics"]["mean"]]:
    assert set(row) == keys
    assert all(0.0 <= v <= 1.0 for v in row.values())
  assert saved["step"] == result["step"] == 18
  assert [h["epoch"] for h in saved["history"]] == [1, 2]
  assert all(np.isfinite(h["validation_loss"]) for h in saved["history"])
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| carpet |" in table and "| mean |" in table
  heatmaps = sorted(os.listdir(os.path.join(workdir, "heatmaps", "washer")))
  assert len(heatmaps) == 2  # one anomalous (num_heatmaps_per_class=1) + one normal
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert os.listdir(os.path.join(workdir, "checkpoints", "best"))


def test_interrupted_run_resumes_to_identical_parameters(full_run, smoke_settings, tmp_path,
                                                         read_events):
  workdir, _ = full_run
  resumed = str(tmp_path / "resumed")
  partial = train.train_and_evaluate(smoke_settings(), resumed, stop_after_steps=7)
  assert partial["metrics"] is None and partial["step"] == 7
  assert not os.path.exists(os.path.join(resumed, "metrics.json"))
  # What a run killed at step 9 would have logged past its checkpoint (step 7).
  killed = RunDir(resumed).event_writer()
  for step in (8, 9):
    killed.add_scalar("train/loss", -1.0, step)
  killed.close()
  result = train.train_and_evaluate(smoke_settings(), resumed)
  assert result["step"] == 18
  (state_a, meta_a), (state_b, meta_b) = latest_state(workdir), latest_state(resumed)
  assert int(state_a["step"]) == int(state_b["step"]) == 18
  leaves_a = [np.asarray(x) for x in jax.tree_util.tree_leaves(state_a["params"])]
  leaves_b = [np.asarray(x) for x in jax.tree_util.tree_leaves(state_b["params"])]
  for a, b in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert meta_a["best_step"] == meta_b["best_step"]
  assert [h["validation_loss"] for h in meta_a["history"]] == pytest.approx(
      [h["validation_loss"] for h in meta_b["history"]], rel=1e-5)
  # The curves go on at the checkpoint's step: every step once, the killed run's purged.
  losses = {path: read_events(os.path.join(path, "events")).Scalars("train/loss")
            for path in (workdir, resumed)}
  assert [s.step for s in losses[resumed]] == list(range(1, 19))
  assert [s.value for s in losses[resumed]] == pytest.approx(
      [s.value for s in losses[workdir]], rel=1e-5)
  assert [r["step"] for r in result["training_log"]] == list(range(1, 19))
  # A finished run is not trained again by a rerun.
  again = train.train_and_evaluate(smoke_settings(), resumed)
  assert again["step"] == 18


def test_ccl_and_rd_baseline_differ_only_in_the_two_loss_weights():
  for module in (demo, mvtec_ad):
    ccl = module.get_config().to_dict()
    rd = module.get_config("rd").to_dict()
    flat = lambda d, p="": {f"{p}{k}": v for k, x in d.items() for k, v in (
        flat(x, f"{p}{k}.").items() if isinstance(x, dict) else [(k, x)])}
    diff = {k for k in flat(ccl) if flat(ccl)[k] != flat(rd)[k]}
    assert diff == {"loss.local_weight", "loss.global_weight"}
    assert flat(rd)["loss.local_weight"] == flat(rd)["loss.global_weight"] == 0.0
  ccl_model = build_network(settings.from_config(demo.get_config()))
  rd_model = build_network(settings.from_config(demo.get_config("rd")))
  assert ccl_model.use_projector and not rd_model.use_projector


def test_non_finite_loss_stops_with_a_clear_message(smoke_settings, tmp_path):
  run_settings = smoke_settings(log_every_steps=1)
  # NaN learning rates are refused by the settings, so they are set behind their back.
  nan_optimizer = settings.OptimizerSettings(float("nan"), float("nan"), 0.5, 0.999, 5.0)
  run_settings = dataclasses.replace(run_settings, optimizer=nan_optimizer)
  with pytest.raises(FloatingPointError, match="Non-finite training metrics at step 2"):
    train.train_and_evaluate(run_settings, str(tmp_path / "nan"))
  assert not os.path.exists(tmp_path / "nan" / "metrics.json")


def test_missing_manual_dir_names_the_path(tmp_path):
  config = mvtec_ad.get_config("smoke")
  config.dataset.data_dir = str(tmp_path / "data")
  config.dataset.manual_dir = str(tmp_path / "no_such_download")
  with pytest.raises(datasets.DatasetError, match="no_such_download"):
    train.train_and_evaluate(settings.from_config(config), str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "data" / "mvtec_ad" / "bottle_64")


def test_unknown_config_key_is_an_error_naming_it(repo_root, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "ccl_jax.main", "--config",
       os.path.join(repo_root, "configs", "demo.py"), "--workdir", str(tmp_path),
       "--config.loss.widow=3"],
      capture_output=True, text=True, cwd=repo_root, timeout=300)
  assert out.returncode != 0
  assert "widow" in out.stderr


def test_batch_size_not_divisible_by_devices_is_rejected(smoke_settings, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  with pytest.raises(ValueError, match="divisible by the number of devices"):
    train.train_and_evaluate(smoke_settings(), str(tmp_path))


def test_kmeans_pseudo_classes_recover_visually_distinct_classes(smoke_settings):
  from ccl_jax.evaluation import decide
  from ccl_jax.runtime import inference
  from ccl_jax.datasets import selection
  run_settings = smoke_settings()
  dataset = selection.load_selected(run_settings.dataset, image_size=32, is_main=True)
  encoder, encoder_variables = frozen_encoder(run_settings,
                                                        inference.replicated_sharding())
  indices = np.arange(len(dataset.train))
  embeddings = decide.routing_embeddings(Router(encoder, encoder_variables),
                                       dataset.train, indices, global_batch_size=8,
                                       batch_sharding=inference.batch_sharding())
  clusters, v_measure = grouping.pseudo_classes(embeddings, dataset.train_class_ids[indices],
                                                num_classes=2, seed=0)
  assert clusters.shape == indices.shape and set(clusters) == {0, 1}
  # carpet (red weave) and washer (grey ring on slate) separate even with random features.
  assert v_measure > 0.8
  with pytest.raises(ValueError, match="num_pseudo_classes"):
    grouping.pseudo_classes(embeddings, dataset.train_class_ids[indices], num_classes=1,
                            seed=0)


def test_training_with_pseudo_classes_records_their_v_measure(smoke_settings, smoke_config,
                                                             tmp_path):
  run_settings = smoke_settings(**{"dataset.class_labels": "kmeans",
                                   "dataset.num_pseudo_classes": 3})
  result = train.train_and_evaluate(run_settings, str(tmp_path / "km"), stop_after_steps=2)
  assert result["step"] == 2
  _, meta = latest_state(str(tmp_path / "km"))
  assert meta["pseudo_classes"]["num_clusters"] == 3
  assert 0.0 <= meta["pseudo_classes"]["v_measure"] <= 1.0
  bad = smoke_config(**{"dataset.class_labels": "clusters"})
  with pytest.raises(ValueError, match="class_labels"):
    settings.from_config(bad)

"""The training program end to end on the synthetic smoke config."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccl_jax import datasets, inference, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo, mvtec_ad  # noqa: E402  (configs/ is not an installed package)
from tests.conftest import smoke_config  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(smoke_data_dir):
  return smoke_data_dir


def latest_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  result = train.train_and_evaluate(smoke_config(data_dir), workdir)
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


def test_interrupted_run_resumes_to_identical_parameters(full_run, data_dir, tmp_path):
  workdir, _ = full_run
  resumed = str(tmp_path / "resumed")
  partial = train.train_and_evaluate(smoke_config(data_dir), resumed, stop_after_steps=7)
  assert partial["metrics"] is None and partial["step"] == 7
  assert not os.path.exists(os.path.join(resumed, "metrics.json"))
  result = train.train_and_evaluate(smoke_config(data_dir), resumed)
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
  # A finished run is not trained again by a rerun.
  again = train.train_and_evaluate(smoke_config(data_dir), resumed)
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
  _, ccl_model = train.build_models(demo.get_config())
  _, rd_model = train.build_models(demo.get_config("rd"))
  assert ccl_model.use_projector and not rd_model.use_projector


def test_non_finite_loss_stops_with_a_clear_message(data_dir, tmp_path):
  config = smoke_config(data_dir, **{"optimizer.learning_rate": float("nan"),
                                     "optimizer.projector_learning_rate": float("nan")})
  with pytest.raises(FloatingPointError, match="Non-finite training metrics at step 2"):
    train.train_and_evaluate(config, str(tmp_path / "nan"))
  assert not os.path.exists(tmp_path / "nan" / "metrics.json")


def test_missing_manual_dir_names_the_path(tmp_path):
  config = mvtec_ad.get_config("smoke")
  config.dataset.data_dir = str(tmp_path / "data")
  config.dataset.manual_dir = str(tmp_path / "no_such_download")
  with pytest.raises(datasets.DatasetError, match="no_such_download"):
    train.train_and_evaluate(config, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "data" / "mvtec_ad" / "bottle_64")


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "ccl_jax.main", "--config", os.path.join(REPO, "configs", "demo.py"),
       "--workdir", str(tmp_path), "--config.loss.widow=3"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode != 0
  assert "widow" in out.stderr


def test_batch_size_not_divisible_by_devices_is_rejected(data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  with pytest.raises(ValueError, match="divisible by the number of devices"):
    train.train_and_evaluate(smoke_config(data_dir), str(tmp_path))


def test_dataset_mixture_has_one_class_space_and_per_dataset_metrics(data_dir, tmp_path):
  from tests.test_datasets import make_mvtec_tree
  mvtec = tmp_path / "mvtec"
  make_mvtec_tree(mvtec, classes=("bottle",), size=48)
  config = smoke_config(data_dir)
  config.dataset.name = "synthetic,mvtec_ad"
  config.dataset.manual_dir = f",{mvtec}"
  config.dataset.classes = "synthetic/carpet,synthetic/washer,mvtec_ad/bottle"
  dataset = train.load_dataset(config, is_main=True)
  assert dataset.class_names == ("synthetic/carpet", "synthetic/washer", "mvtec_ad/bottle")
  assert sorted(set(dataset.test_class_ids)) == list(range(len(dataset.class_names)))
  config.dataset.classes = "bottle"
  with pytest.raises(ValueError, match="'<dataset>/<class>'"):
    train.load_dataset(config, is_main=True)
  config.dataset.manual_dir = str(mvtec)
  with pytest.raises(ValueError, match="one per dataset"):
    train.load_dataset(config, is_main=True)


def test_per_dataset_means_group_qualified_class_names():
  rows = {"a/x": {"image_auroc": 0.5, "aupro": 1.0}, "a/y": {"image_auroc": 1.0, "aupro": 0.0},
          "b/z": {"image_auroc": 0.25, "aupro": 0.5}}
  means = inference.per_dataset_means(rows)
  assert means == {"a": {"image_auroc": 0.75, "aupro": 0.5},
                   "b": {"image_auroc": 0.25, "aupro": 0.5}}


def test_kmeans_pseudo_classes_recover_visually_distinct_classes(data_dir):
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ccl_jax import step, weights
  config = smoke_config(data_dir)
  dataset = train.load_dataset(config, is_main=True)
  encoder, _ = train.build_models(config)
  encoder_variables = weights.encoder_variables(encoder, "none", seed=0, image_size=32)
  sharding = NamedSharding(step.data_mesh(), P("data"))
  indices = np.arange(len(dataset.train))
  clusters, v_measure = train.pseudo_class_ids(
      encoder, encoder_variables, dataset, indices, num_classes=2, seed=0,
      global_batch_size=8, batch_sharding=sharding)
  assert clusters.shape == indices.shape and set(clusters) == {0, 1}
  # carpet (red weave) and washer (grey ring on slate) separate even with random features.
  assert v_measure > 0.8
  with pytest.raises(ValueError, match="num_pseudo_classes"):
    train.pseudo_class_ids(encoder, encoder_variables, dataset, indices, num_classes=1, seed=0,
                           global_batch_size=8, batch_sharding=sharding)


def test_training_with_pseudo_classes_records_their_v_measure(data_dir, tmp_path):
  config = smoke_config(data_dir, **{"dataset.class_labels": "kmeans",
                                     "dataset.num_pseudo_classes": 3})
  result = train.train_and_evaluate(config, str(tmp_path / "km"), stop_after_steps=2)
  assert result["step"] == 2
  _, meta = latest_state(str(tmp_path / "km"))
  assert meta["pseudo_classes"]["num_clusters"] == 3
  assert 0.0 <= meta["pseudo_classes"]["v_measure"] <= 1.0
  bad = smoke_config(data_dir, **{"dataset.class_labels": "clusters"})
  with pytest.raises(ValueError, match="class_labels"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_confusion_analysis_of_a_trained_workdir(full_run, tmp_path):
  from ccl_jax import confusion
  workdir, _ = full_run
  trained = train.load_trained(workdir)
  assert trained.step > 0
  dataset = train.load_dataset(trained.config, is_main=True)
  embeddings = confusion.embeddings_of(trained, dataset)
  assert embeddings.shape[0] == len(dataset.test) and np.all(np.isfinite(embeddings))
  score = confusion.v_measure(embeddings, dataset.test_class_ids)
  assert 0.0 <= score <= 1.0
  separated = np.concatenate([np.zeros((5, 3)), np.ones((5, 3))])
  assert confusion.v_measure(separated, np.array([0] * 5 + [1] * 5)) == pytest.approx(1.0)
  panel = confusion.scatter_panel(np.random.default_rng(0).normal(size=(10, 2)),
                                  np.arange(10) % 2, "t")
  assert panel.size == (420, 444)
  with pytest.raises(FileNotFoundError, match="not a ccl_jax workdir"):
    train.load_trained(str(tmp_path))


def test_evaluate_command_scores_saved_variables_and_workdirs(full_run, data_dir, tmp_path):
  import flax
  from ccl_jax import evaluate, variable_files
  workdir, result = full_run
  trained = train.load_trained(workdir)
  path = str(tmp_path / "model.msgpack")
  variable_files.save(path, flax.core.unfreeze(trained.variables))
  evaluated = evaluate.evaluate_variables(smoke_config(data_dir), str(tmp_path / "eval"), path)
  with open(os.path.join(workdir, "metrics.json")) as f:
    trained_metrics = json.load(f)["metrics"]["mean"]
  # The same variables give the same metrics as the training run's own evaluation.
  assert evaluated["metrics"]["mean"] == pytest.approx(trained_metrics, abs=1e-6)
  assert os.path.exists(tmp_path / "eval" / "metrics.json")
  again = evaluate.evaluate_workdir(workdir)
  assert again["metrics"]["mean"] == pytest.approx(trained_metrics, abs=1e-6)
  # A file for another architecture is refused, listing what does not match.
  rd = smoke_config(data_dir, **{"loss.local_weight": 0.0, "loss.global_weight": 0.0})
  with pytest.raises(ValueError, match="unexpected"):
    evaluate.evaluate_variables(rd, str(tmp_path / "eval_rd"), path)

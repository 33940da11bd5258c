"""Decisions for every model: routing at evaluation, thresholds from held-out normal images
only, HierCore end to end and the four label scenarios (synthetic smoke data)."""
import json
import os

import numpy as np
import pytest

from ccl_jax import scenarios
from ccl_jax.decisions import grouping, thresholds
from ccl_jax.evaluation import decide
from ccl_jax.runtime import inference
from ccl_jax.datasets import selection
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.runs.loading import load_detector


def _blobs(seed=0):
  rng = np.random.default_rng(seed)
  centres = np.eye(3, 8) * 10
  class_ids = np.repeat(np.arange(3), 10)
  return centres[class_ids] + rng.normal(size=(30, 8)), class_ids


def test_evaluation_groups_from_labels_use_the_given_class():
  embeddings, class_ids = _blobs()
  groups, _ = grouping.fit_groups(embeddings, labels=class_ids, class_names=["a", "b", "c"])
  # Swap the labels of two classes: a given label wins over the nearest centroid.
  given = np.array([1, 0, 2])[class_ids]
  assert np.array_equal(decide.evaluation_groups(groups, embeddings, given, ["a", "b", "c"]),
                        given)
  assert np.array_equal(decide.evaluation_groups(groups, embeddings, None, ["a", "b", "c"]),
                        class_ids)


def test_evaluation_groups_for_clusters_keep_a_given_class_together():
  embeddings, class_ids = _blobs()
  groups, assignment = grouping.fit_groups(embeddings, num_groups=3, seed=0)
  moved = embeddings.copy()
  moved[0] = embeddings[15]  # one class-0 image that looks like class 1
  routed = decide.evaluation_groups(groups, moved, None, ["a", "b", "c"])
  assert routed[0] == assignment[15]
  kept = decide.evaluation_groups(groups, moved, class_ids, ["a", "b", "c"])
  assert kept[0] == assignment[1]  # the majority group of its class
  assert np.array_equal(kept[1:], assignment[1:])


@pytest.fixture(scope="module")
def hiercore_scenarios(smoke_settings, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("scenarios"))
  rows = scenarios.run_scenarios(smoke_settings(**{
      "validation_fraction": 0.25, "num_heatmaps_per_class": 0, "model.kind": "hiercore",
      "hiercore.threshold_folds": 0}),
                                 workdir)
  return workdir, rows


def test_thresholds_come_from_the_held_out_normal_images_only(hiercore_scenarios):
  workdir, _ = hiercore_scenarios
  run_dir = RunDir(os.path.join(workdir, "labels_at_training"))
  detector = load_detector(run_dir.path)
  run_settings = run_dir.read_settings()
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=True)
  train_indices, holdout = selection.training_split(run_settings, dataset)
  assert len(holdout) and not set(holdout) & set(train_indices)
  groups, estimated, meta = run_dir.read_decision()
  assert groups.names == ("carpet", "washer") and meta["model"] == "hiercore"
  assert meta["num_holdout_images"] == len(holdout)
  holdout_groups = dataset.train_class_ids[holdout]
  scores = inference.run_inference(
      decide.score_fn(detector), dataset.train, holdout, outputs=("score",),
      per_image_inputs={"group_id": holdout_groups}, global_batch_size=8,
      batch_sharding=inference.batch_sharding())["score"]
  for g in range(2):
    expected = thresholds.threshold_from_normal_scores(scores[holdout_groups == g])
    assert estimated.per_group[g] == pytest.approx(expected, rel=1e-5)
  assert estimated.agnostic == pytest.approx(
      thresholds.threshold_from_normal_scores(scores), rel=1e-5)


def test_four_scenarios_report_metrics_and_decisions(hiercore_scenarios):
  workdir, rows = hiercore_scenarios
  assert set(rows) == {f"{t}/{e}_at_evaluation" for t in scenarios.TRAINING_SCENARIOS
                       for e in ("labels", "no_labels")}
  with open(os.path.join(workdir, "scenarios.json")) as f:
    saved = json.load(f)
  assert set(saved) == set(rows)
  for row in saved.values():
    assert row["model"] == "hiercore"
    assert 0.5 < row["metrics"]["mean"]["image_auroc"] <= 1.0
    for kind in ("classwise", "agnostic"):
      assert set(row[kind]["per_class"]) == {"carpet", "washer"}
      for name, values in row[kind]["per_class"].items():
        assert values["n_normal"] + values["n_anomalous"] == 22, name
        assert 0.0 <= values["false_alarm_rate"] <= 1.0
  labelled = saved["labels_at_training/labels_at_evaluation"]
  assert labelled["routing"]["accuracy"] == 1.0
  table = open(os.path.join(workdir, "scenarios.md")).read()
  assert table.count("| hiercore |") == 4


def test_ccl_training_writes_a_decision_file_with_its_groups(trained_smoke_run):
  _, workdir = trained_smoke_run
  groups, estimated, meta = RunDir(workdir).read_decision()
  assert meta["model"] == "ccl" and groups.from_labels
  assert estimated.per_group.shape == (2,)
  with open(os.path.join(workdir, "metrics.json")) as f:
    saved = json.load(f)
  assert set(saved["classwise"]["per_class"]) == {"carpet", "washer"}
  with open(os.path.join(workdir, "results.md")) as f:
    assert "Decisions at the estimated thresholds" in f.read()


def test_per_dataset_means_group_qualified_class_names():
  rows = {"a/x": {"image_auroc": 0.5, "aupro": 1.0}, "a/y": {"image_auroc": 1.0, "aupro": 0.0},
          "b/z": {"image_auroc": 0.25, "aupro": 0.5}}
  means = decide.per_dataset_means(rows)
  assert means == {"a": {"image_auroc": 0.75, "aupro": 0.5},
                   "b": {"image_auroc": 0.25, "aupro": 0.5}}

"""Which data a run reads: the hold-out split and dataset mixtures."""
import subprocess
import sys

import numpy as np
import pytest

from ccl_jax.datasets import selection


def skewed_class_ids(sizes, seed=0):
  ids = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
  return np.random.default_rng(seed).permutation(ids)


def test_holdout_stratified_and_deterministic():
  class_ids = skewed_class_ids([100, 40, 7, 1, 2, 3])
  train, val = selection.holdout_split(class_ids, 0.2, seed=3)
  assert train.dtype == np.int64 and val.dtype == np.int64
  assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
  assert np.intersect1d(train, val).size == 0
  np.testing.assert_array_equal(np.union1d(train, val),
                                np.arange(class_ids.size))
  expected_val = {0: 20, 1: 8, 2: 1, 3: 0, 4: 0, 5: 1}
  for c, n_val in expected_val.items():
    assert np.sum(class_ids[val] == c) == n_val, c
    assert np.sum(class_ids[train] == c) >= 1, c

  train2, val2 = selection.holdout_split(class_ids, 0.2, seed=3)
  np.testing.assert_array_equal(train, train2)
  np.testing.assert_array_equal(val, val2)
  _, val3 = selection.holdout_split(class_ids, 0.2, seed=4)
  assert not np.array_equal(val, val3)


def test_holdout_edge_cases():
  class_ids = skewed_class_ids([10, 1, 2])
  train, val = selection.holdout_split(class_ids, 0.0, seed=0)
  assert val.size == 0
  np.testing.assert_array_equal(train, np.arange(13))

  # Huge fraction: every class keeps one training image; singletons all.
  train, val = selection.holdout_split(class_ids, 0.99, seed=0)
  for c, n in [(0, 10), (1, 1), (2, 2)]:
    assert np.sum(class_ids[train] == c) == 1
    assert np.sum(class_ids[val] == c) == n - 1

  train, val = selection.holdout_split(np.zeros(0, np.int32), 0.1, seed=0)
  assert train.size == 0 and val.size == 0
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match="fraction"):
      selection.holdout_split(class_ids, bad, seed=0)


def test_holdout_class_choice_independent_of_other_classes():
  a = np.array([0] * 20 + [1] * 20, np.int32)
  b = np.array([0] * 20 + [2] * 5, np.int32)
  _, val_a = selection.holdout_split(a, 0.25, seed=1)
  _, val_b = selection.holdout_split(b, 0.25, seed=1)
  np.testing.assert_array_equal(val_a[a[val_a] == 0], val_b[b[val_b] == 0])


def test_dataset_mixture_has_one_class_space(smoke_settings, make_mvtec_tree, tmp_path):
  mvtec = tmp_path / "mvtec"
  make_mvtec_tree(mvtec, classes=("bottle",), size=48)

  def load(**data):
    run_settings = smoke_settings(**{f"dataset.{k}": v for k, v in data.items()})
    return selection.load_selected(run_settings.dataset, image_size=32, is_main=True)

  dataset = load(name="synthetic,mvtec_ad", manual_dir=f",{mvtec}",
                 classes="synthetic/carpet,synthetic/washer,mvtec_ad/bottle")
  assert dataset.class_names == ("synthetic/carpet", "synthetic/washer", "mvtec_ad/bottle")
  assert sorted(set(dataset.test_class_ids)) == list(range(len(dataset.class_names)))
  with pytest.raises(ValueError, match="'<dataset>/<class>'"):
    load(name="synthetic,mvtec_ad", manual_dir=f",{mvtec}", classes="bottle")
  with pytest.raises(ValueError, match="one per dataset"):
    load(name="synthetic,mvtec_ad", manual_dir=str(mvtec), classes="bottle")


def test_the_datasets_package_does_not_import_the_settings(repo_root):
  # Arrows point down: ccl_jax.config.settings reads the datasets' choice lists, never the reverse.
  out = subprocess.run(
      [sys.executable, "-c", "import sys, ccl_jax.datasets.selection; "
       "print(sorted(m for m in sys.modules if m.startswith('ccl_jax.config.settings')))"],
      capture_output=True, text=True, cwd=repo_root, timeout=300, check=True)
  assert out.stdout.strip() == "[]"


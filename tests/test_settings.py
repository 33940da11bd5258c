"""The config read once into typed settings: every invalid key reported at once, before any
work, naming the key, its value and the expected form."""
import subprocess
import sys

import pytest

from ccl_jax.config import default_config, settings
from configs import all_in_all, btad, demo, manta, mvtec_ad, real_iad, visa

PRESETS = ("", "authors", "paper", "rd")


@pytest.mark.parametrize("module, variants", [(demo, ("", "rd", "hiercore", "random_encoder",
                                                      "smoke")),
                                              (mvtec_ad, PRESETS + ("smoke",)),
                                              (visa, PRESETS), (btad, PRESETS),
                                              (real_iad, PRESETS), (manta, PRESETS),
                                              (all_in_all, PRESETS)])
def test_every_shipped_config_is_valid_and_round_trips(module, variants):
  for variant in variants:
    run_settings = settings.from_config(module.get_config(variant))
    assert settings.from_dict(run_settings.to_dict()) == run_settings


def test_the_schema_gives_the_config_the_settings_and_the_checks():
  defaults = settings.from_config(default_config.base_config())
  # The typed settings' own defaults are the config's.
  assert (defaults.dataset, defaults.model, defaults.loss, defaults.optimizer,
          defaults.hiercore, defaults.decision) == (
              settings.DataSettings(), settings.ModelSettings(), settings.LossSettings(),
              settings.OptimizerSettings(), settings.HierCoreSettings(),
              settings.DecisionSettings())
  assert set(settings.flat_values(defaults)) == set(settings.KEYS)
  assert set(settings.RUN_IDENTITY_KEYS) < set(settings.KEYS)
  # Every key with a check refuses a value of the wrong kind, each named in one error.
  checked = [key for key, (definition, _) in settings.KEYS.items() if definition.accepts]
  with pytest.raises(settings.ConfigError) as err:
    defaults.replace(**{key: [] for key in checked})
  message = str(err.value)
  assert f"{len(checked)} invalid key(s)" in message
  for key in checked:
    assert f"\n  {key}=[]: expected " in message, key


def test_every_problem_is_reported_at_once_with_its_key():
  config = demo.get_config("smoke")
  config.image_size = 48
  config.loss.window = 4
  config.model.encoder = "vgg16"
  config.decision.rule = "median"
  config.validation_fraction = 1.0
  config.hiercore.threshold_folds = -1
  config.hiercore.fold_split = "blocks"
  config.hiercore.reweight_neighbours = -3
  config.validation_min_images = -2
  with pytest.raises(settings.ConfigError) as err:
    settings.from_config(config)
  message = str(err.value)
  assert "9 invalid key(s)" in message
  assert "image_size=48: expected a positive multiple of 32" in message
  assert "loss.window=4: expected an odd integer" in message
  assert "model.encoder='vgg16': expected one of" in message and "'resnet18'" in message
  assert "decision.rule='median'" in message
  assert "validation_fraction=1.0: expected a fraction in [0, 1)" in message
  assert "hiercore.threshold_folds=-1: expected an integer >= 0" in message
  assert "hiercore.fold_split='blocks': expected one of 'leave_one_out', 'random', 'clusters'" in message
  assert "hiercore.reweight_neighbours=-3: expected an integer >= 0" in message
  assert "validation_min_images=-2: expected an integer >= 0" in message


def test_calibration_keys_identify_a_run():
  base = settings.from_config(demo.get_config("hiercore"))
  assert base.hiercore.cross_fitted and not base.replace(
      **{"hiercore.threshold_folds": 1}).hiercore.cross_fitted
  changed = base.replace(**{"hiercore.threshold_folds": 0, "hiercore.fold_split": "random",
                             "hiercore.reweight_neighbours": 3, "validation_min_images": 20})
  assert settings.changed_keys(base, changed) == [
      "hiercore.threshold_folds: 5 -> 0", "hiercore.fold_split: 'leave_one_out' -> 'random'",
      "hiercore.reweight_neighbours: 0 -> 3", "validation_min_images: 0 -> 20"]


def test_the_preset_switches_are_validated_with_their_key():
  values = settings.from_config(mvtec_ad.get_config("authors")).to_dict()
  values["loss"].update(global_form="infonce", neck_on_augmented_view="yes")
  values.update(sampler="balanced", augmented_view_source_size=128)
  values["dataset"].update(mask_resize="bicubic", real_iad_resolution="2048",
                           real_iad_views="C6", manta_views="all")
  values["model"]["anomaly_map_scale"] = 0.0
  with pytest.raises(settings.ConfigError) as err:
    settings.from_dict(values)
  message = str(err.value)
  assert "9 invalid key(s)" in message
  for expected in ("loss.global_form='infonce': expected one of 'supcon', 'authors'",
                   "loss.neck_on_augmented_view='yes': expected True or False",
                   "sampler='balanced': expected one of 'class_mixing', 'shuffle'",
                   "augmented_view_source_size=128: expected 0 (the image_size image) or an "
                   "integer > image_size",
                   "dataset.mask_resize='bicubic': expected one of 'nearest', "
                   "'bilinear_threshold'",
                   "dataset.real_iad_resolution='2048': expected one of '256', '512', '1024'",
                   "dataset.real_iad_views='C6'", "dataset.manta_views='all'",
                   "model.anomaly_map_scale=0.0: expected a number > 0"):
    assert expected in message, expected
  with pytest.raises(ValueError, match="Unknown variant 'author' of configs/visa.py; "
                                       "expected one of authors, paper, rd"):
    visa.get_config("author")


def test_switches_that_change_the_trained_model_refuse_a_resume():
  stored = settings.from_config(mvtec_ad.get_config(""))
  authors = settings.from_config(mvtec_ad.get_config("authors"))
  changed = {line.split(":")[0] for line in settings.changed_keys(stored, authors)}
  assert {"loss.temperature", "loss.global_form", "loss.neck_on_augmented_view", "sampler",
          "augmented_view_source_size", "validation_fraction"} <= changed
  # Read only when evaluating (refitted, never part of the trained model):
  assert not changed & {"dataset.mask_resize", "model.anomaly_map_scale",
                        "evaluate_checkpoint"}
  real_iad_1024 = stored.replace(**{"dataset.real_iad_resolution": "1024",
                                    "dataset.manta_views": "stacked"})
  assert {line.split(":")[0] for line in settings.changed_keys(stored, real_iad_1024)} == {
      "dataset.real_iad_resolution", "dataset.manta_views"}


def test_unknown_keys_of_a_stored_run_are_named():
  values = settings.from_config(demo.get_config("smoke")).to_dict()
  values["loss"]["widow"] = 3
  values["colour"] = "red"
  with pytest.raises(settings.ConfigError, match=r"config.json: unknown key 'loss.widow'; "
                                                 r"unknown key 'colour'"):
    settings.from_dict(values, source="config.json")


def test_replace_changes_dotted_keys_and_revalidates():
  base = settings.from_config(demo.get_config("smoke"))
  kmeans = base.replace(**{"dataset.class_labels": "kmeans"})
  assert kmeans.dataset.class_labels == "kmeans" and not kmeans.dataset.labels_at_training
  assert base.dataset.class_labels == "true"
  with pytest.raises(settings.ConfigError, match="dataset.class_labels='clusters'"):
    base.replace(**{"dataset.class_labels": "clusters"})
  with pytest.raises(settings.ConfigError, match="Unknown config key 'dataset.colour'"):
    base.replace(**{"dataset.colour": 1})


def test_the_program_refuses_a_bad_image_size_before_preparing_data(repo_root, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "ccl_jax.main", "--config", "configs/demo.py:smoke",
       "--workdir", str(tmp_path / "run"), f"--config.dataset.data_dir={tmp_path / 'data'}",
       "--config.image_size=48"],
      capture_output=True, text=True, cwd=repo_root, timeout=300)
  assert out.returncode != 0
  assert "image_size=48: expected a positive multiple of 32" in out.stderr
  assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()

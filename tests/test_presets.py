"""The `:authors` and `:paper` presets: complete against docs/faithfulness.md and README.md,
and `:authors` runs end to end (with the random-encoder warning a real dataset gets; slow,
`pytest -m slow tests/test_presets.py`)."""
import json
import logging
import os
import re

import numpy as np
import pytest

from ccl_jax.config import default_config, settings
from configs import mvtec_ad

PRESETS = {"authors": default_config.as_authors, "paper": default_config.as_paper}


def _values(config):
  return settings.flat_values(settings.from_config(config))


def _table(path, header_start):
  """{key: [cells after the key]} of the markdown table whose header starts so."""
  rows, inside = {}, False
  for line in open(path, encoding="utf-8"):
    if line.startswith(header_start):
      inside = True
      continue
    if inside and not line.startswith("|"):
      break
    if inside and not line.startswith("|---"):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      rows[cells[0].strip("`")] = cells[1:]
  return rows


def _cell_value(cell):
  token = cell.replace("`", "").split()[0]
  if re.fullmatch(r"\d+/\d+", token):
    numerator, denominator = token.split("/")
    return int(numerator) / int(denominator)
  for kind in (int, float):
    try:
      return kind(token)
    except ValueError:
      pass
  return {"True": True, "False": False}.get(token, token)


def _differing_keys():
  default = _values(default_config.base_config())
  presets = {name: _values(f(default_config.base_config())) for name, f in PRESETS.items()}
  return default, presets, {k for values in presets.values() for k in values
                            if values[k] != default[k]}


@pytest.mark.parametrize("path, header", [("docs/faithfulness.md", "| key | paper |"),
                                          ("README.md", "| key | paper |")])
def test_every_difference_between_default_and_presets_is_one_table_row(repo_root, path,
                                                                        header):
  default, presets, differing = _differing_keys()
  table = _table(os.path.join(repo_root, path), header)
  assert set(table) == differing, (set(table) ^ differing)
  for key, cells in table.items():
    authors, paper, ours = (_cell_value(c) for c in cells[-3:])
    for shown, actual in ((authors, presets["authors"][key]), (paper, presets["paper"][key]),
                          (ours, default[key])):
      if isinstance(actual, float):
        assert shown == pytest.approx(actual), (key, shown, actual)
      else:
        assert shown == actual or (actual is None and shown == "None"), (key, shown, actual)


@pytest.mark.slow
def test_authors_preset_runs_end_to_end_and_warns_about_the_random_encoder(
    make_mvtec_tree, prepared_dirs, tmp_path, caplog):
  from ccl_jax.training import runner  # pylint: disable=import-outside-toplevel
  root = make_mvtec_tree(tmp_path / "mvtec")
  config = mvtec_ad.get_config("authors")
  config.dataset.manual_dir = str(root)
  config.dataset.data_dir = str(tmp_path / "data")
  config.dataset.classes = "bottle,grid"
  config.model.encoder = "resnet18"
  config.image_size = 32
  config.augmented_view_source_size = 64
  config.batch_size = 4
  config.num_epochs = 1
  config.num_heatmaps_per_class = 0
  run_settings = settings.from_config(config)
  assert run_settings.sampler == "shuffle" and run_settings.loss.global_form == "authors"
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.WARNING):
    result = runner.run(run_settings, workdir)
  assert "encoder is randomly initialised" in caplog.text

  # No hold-out: 6 training images, one step of 4; the last checkpoint is evaluated.
  assert result["evaluated_step"] == result["step"] == 1
  assert not os.path.exists(os.path.join(workdir, "decision.json"))
  metrics = json.load(open(os.path.join(workdir, "metrics.json"), encoding="utf-8"))
  assert metrics["warnings"] == list(run_settings.warnings) and metrics["warnings"]
  assert open(os.path.join(workdir, "results.md"), encoding="utf-8").read().startswith(
      "**Warning:** model.encoder_weights='none'")
  assert np.isfinite(metrics["metrics"]["mean"]["image_auroc"])
  # Masks resized as the authors do, and the view source at 64: own prepared configs.
  names = [os.path.basename(os.path.dirname(p)) for p in prepared_dirs(tmp_path / "data")]
  assert sorted(names) == sorted(f"{c}_{s}_mask_resizebilinear_threshold"
                                 for c in ("bottle", "grid") for s in (32, 64))


def test_the_warning_is_logged_before_any_work(tmp_path, caplog):
  from ccl_jax.training import runner  # pylint: disable=import-outside-toplevel
  from ccl_jax.datasets import DatasetError  # pylint: disable=import-outside-toplevel
  config = mvtec_ad.get_config("smoke")
  config.dataset.manual_dir = str(tmp_path / "not_downloaded")
  config.dataset.data_dir = str(tmp_path / "data")
  with caplog.at_level(logging.WARNING), pytest.raises(DatasetError):
    runner.run(settings.from_config(config), str(tmp_path / "run"))
  assert "the resnet18 encoder is randomly initialised" in caplog.text


def test_the_warning_heads_metrics_json_results_md_and_the_report(tmp_path):
  from ccl_jax.evaluation import streaming  # pylint: disable=import-outside-toplevel
  from ccl_jax.results import metrics, writing  # pylint: disable=import-outside-toplevel
  from ccl_jax.runs.run_dir import RunDir  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  masks = np.zeros((4, 8, 8), np.uint8)
  masks[2:, 2:5, 2:5] = 1
  maps = rng.random((4, 8, 8)).astype(np.float32)
  outputs = {"label": np.array([0, 0, 1, 1]), "score": rng.random(4),
             "views": streaming.Views(dict(enumerate(maps)), dict(enumerate(masks)),
                                      {0: (float(maps.min()), float(maps.max()))})}
  summary = metrics.summarize({"bottle": {"labels": outputs["label"],
                                          "scores": outputs["score"], "masks": masks,
                                          "maps": maps}})
  test = [{"image": np.full((8, 8, 3), 99, np.uint8), "file_name": f"{i}.png"}
          for i in range(4)]
  dataset = type("Dataset", (), {"class_names": ("bottle",), "test": test,
                                 "test_class_ids": np.zeros(4, np.int32)})()
  for weights, expected in (("none", True), ("/weights/resnet18.msgpack", False)):
    config = mvtec_ad.get_config("smoke")
    config.model.encoder_weights = weights
    config.num_heatmaps_per_class = 0
    run_settings = settings.from_config(config)
    run_dir = RunDir(str(tmp_path / weights.replace("/", "_")))
    writing.write_results(run_dir, {"metrics": summary}, dataset, outputs, run_settings)
    written = json.load(open(run_dir.file("metrics.json"), encoding="utf-8"))
    table = open(run_dir.file("results.md"), encoding="utf-8").read()
    page = open(run_dir.file("report.html"), encoding="utf-8").read()
    assert ("warnings" in written) == expected
    assert ("<strong>Warning:</strong> model.encoder_weights=" in page) == expected
    assert table.startswith("**Warning:** model.encoder_weights='none'") == expected
    if expected:
      assert written["warnings"] == list(run_settings.warnings)
    assert "| bottle |" in table


def test_the_warning_is_only_for_a_random_encoder_on_real_data():
  config = mvtec_ad.get_config("smoke")
  assert "randomly initialised" in settings.from_config(config).warnings[0]
  config.model.encoder_weights = "/weights/resnet18.msgpack"
  assert settings.from_config(config).warnings == ()
  config.model.encoder_weights = "none"
  config.dataset.name = "synthetic"
  assert settings.from_config(config).warnings == ()

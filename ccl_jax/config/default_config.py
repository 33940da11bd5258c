"""The config files' starting point (`base_config`) and the presets over it.

Every key, its default and the values it accepts are defined once, in `ccl_jax.config.settings`;
`base_config` is that schema as a locked-in ConfigDict, so a mistyped override
(`--config.loss.widow=3`) is an error instead of a silently ignored value.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from ccl_jax.config import settings
from ccl_jax.models.anomaly_maps import AUTHORS_ANOMALY_MAP_SCALE
from ccl_jax.models import AUTHORS_NOISE_PROBABILITY


def base_config() -> ml_collections.ConfigDict:
  """Every config key at its default (the paper's where it gives one)."""
  return settings.config_defaults()


def as_rd_baseline(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The RD joint baseline of a CCL config: both contrastive weights 0, nothing else."""
  config.loss.local_weight = 0.0
  config.loss.global_weight = 0.0
  return config


def _recipe(config: ml_collections.ConfigDict) -> None:
  """What the paper (Sec. 4.1) and the authors' configs/rd/rd_mvtec.py agree on."""
  config.model.kind = "reverse_distillation"
  config.model.encoder = "wide_resnet50_2"
  config.model.projector = "auto"
  config.model.neck_width_per_group = 64  # paper silent; authors' model/rd.py
  config.model.decoder_width_per_group = 0
  config.model.feature_noise_probability = AUTHORS_NOISE_PROBABILITY  # paper silent
  config.loss.local_weight = config.loss.global_weight = 1.0
  config.loss.window = None  # the feature map's size (paper Sec. 4.3; authors' DenseLoss)
  config.optimizer.projector_learning_rate = 1e-3
  config.optimizer.learning_rate = 5e-3
  config.optimizer.b1, config.optimizer.b2 = 0.5, 0.999
  config.optimizer.clip_norm = 5.0  # paper silent; authors' trainer
  config.image_size = 256
  config.batch_size = 16
  config.num_epochs = 100  # paper silent; authors' epoch_full
  config.early_stopping_patience = 0
  # The authors crop the augmented view from the full-resolution file (paper silent). Twice
  # the output size makes every crop (80-100% of the area) a ~2x antialiased downscale, as
  # from the full file; only the resampling filter's footprint differs.
  config.augmented_view_source_size = 2 * config.image_size
  config.dataset.mask_resize = "bilinear_threshold"  # paper silent; authors' dataset code


def as_authors(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The authors' run as their code (LGC-AD/AD-LGC) executes it, setting by setting.

  docs/faithfulness.md cites the file behind each value.
  """
  _recipe(config)
  config.loss.temperature = 0.05             # configs/rd/rd_mvtec.py
  config.loss.local_negatives = "one_random"  # loss/base_loss.py DenseLoss
  config.loss.same_class_positive = False
  config.loss.global_views = "original"      # model/rd.py: SCLLoss on the original view
  config.loss.global_form = "authors"        # loss/base_loss.py SCLLoss
  config.loss.neck_on_augmented_view = True  # model/rd.py RDLGC.train_forward
  config.sampler = "shuffle"                 # the plain DataLoader of the ADer toolbox
  config.validation_fraction = 0.0           # all training images ...
  config.evaluate_checkpoint = "last"        # ... and the last epoch
  config.model.anomaly_map_scale = AUTHORS_ANOMALY_MAP_SCALE  # util/metric.py
  return config


def as_paper(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's text where it is explicit, the authors' code where it is silent.

  Readings of ambiguous text: the local negatives "all other spatial features" (Sec. 3.2)
  are the same position in every other-class image of the batch; "early stopping based on
  validation loss" (Sec. 4.1), with no patience given, evaluates the checkpoint of lowest
  validation loss after the full schedule (the model early stopping keeps).
  """
  _recipe(config)
  config.loss.temperature = 0.1              # Sec. 4.1 and Table 7
  config.loss.local_negatives = "all"        # Eq. 1 / 4: the whole set A(v(i))
  config.loss.same_class_positive = True     # Sec. 3.2, Fig. 4: v'_1 and v_2 are positives
  config.loss.global_views = "both"          # Sec. 3.2: g'_a is a positive of g_a
  config.loss.global_form = "supcon"         # Eq. 1 and 5
  config.loss.neck_on_augmented_view = True  # silent; authors' code (runs anyway for 'both')
  config.sampler = "class_mixing"            # Sec. 3.2: every batch mixes classes
  config.validation_fraction = 0.05          # Sec. 4.1 early stopping; share not given
  config.evaluate_checkpoint = "best"
  config.model.anomaly_map_scale = 1.0       # Sec. 4.1: "followed the RD approach" (a sum)
  return config


def for_dataset(name: str, **dataset_keys) -> ml_collections.ConfigDict:
  """The default config reading dataset `name`, with other `dataset.*` keys set."""
  config = base_config()
  config.dataset.name = name
  for key, value in dataset_keys.items():
    config.dataset[key] = value
  return config


def variant(config: ml_collections.ConfigDict, arg: str | None, source: str,
            **extra: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]
            ) -> ml_collections.ConfigDict:
  """`config` (a dataset's default) as the variant `arg` of the config file `source`:
  '' or None (the default), 'authors', 'paper', 'rd' (the RD joint baseline of the default)
  or one of the file's own `extra` variants."""
  presets = {"authors": as_authors, "paper": as_paper, "rd": as_rd_baseline, **extra}
  if arg in (None, ""):
    return config
  if arg not in presets:
    raise ValueError(f"Unknown variant {arg!r} of {source}; expected one of "
                     f"{', '.join(presets)}.")
  return presets[arg](config)

"""The full set of config keys with the paper's defaults; files in configs/ start from it.

Every key a run reads is defined here, so a locked config turns a mistyped override
(`--config.loss.widow=3`) into an error instead of a silently ignored value.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from ccl_jax.anomaly_maps import AUTHORS_ANOMALY_MAP_SCALE
from ccl_jax.models import AUTHORS_NOISE_PROBABILITY


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.dataset = ml_collections.ConfigDict()
  # mvtec_ad | visa | btad | real_iad | manta | folder (your own images, any class names) |
  # synthetic (built-in demo data), or several
  # comma-separated ('mvtec_ad,visa'; 'all_in_all' = mvtec_ad,visa,btad,real_iad)
  config.dataset.name = "mvtec_ad"
  config.dataset.manual_dir = ""       # the downloaded folder(s), comma-separated for several
  config.dataset.data_dir = "~/ccl_jax_data"  # where prepared (TFDS array_record) data goes
  config.dataset.classes = "all"       # 'all', or a comma-separated list / tuple of names
  config.dataset.class_labels = "true"  # 'true' | 'kmeans' (pseudo-classes, paper Table 3)
  config.dataset.num_pseudo_classes = 30  # K for 'kmeans' (the paper's best of 15/30/60)
  # dataset 'folder', flat layout (<class>/normal/): share of the normal images held out as
  # test normals, picked by file name (ccl_jax/datasets/folder_layout.py)
  config.dataset.normal_test_share = 0.2
  # Ground-truth masks at preparation: 'nearest' | 'bilinear_threshold' (bilinear, then
  # > 0.5: the authors' target transform); each mode is prepared once, under its own name.
  config.dataset.mask_resize = "nearest"
  config.dataset.real_iad_resolution = "256"  # realiad_<this>/ is read: 256|512|1024|raw
  config.dataset.real_iad_views = "all"       # all | C1..C5 (one view only)
  config.dataset.manta_views = "split"        # split (one sample per view) | stacked

  config.model = ml_collections.ConfigDict()
  # reverse_distillation (CCL, or RD with both contrastive weights 0) | hiercore (memory
  # bank, no training; uses model.encoder, model.encoder_weights and the hiercore block)
  config.model.kind = "reverse_distillation"
  config.model.encoder = "wide_resnet50_2"  # resnet18 | resnet34 | resnet50 | wide_resnet50_2
  config.model.encoder_weights = "none"     # Flax msgpack file of the encoder, or 'none'
  config.model.projector = "auto"           # auto: on iff a contrastive weight is > 0
  config.model.neck_width_per_group = 64    # authors' CCL code; 0 = the encoder's (RD4AD)
  config.model.decoder_width_per_group = 0  # 0 = the encoder's (RD4AD and CCL)
  config.model.feature_noise_probability = AUTHORS_NOISE_PROBABILITY  # 0 disables
  config.model.dtype = "float32"            # compute dtype; losses stay float32
  # Factor on the anomaly map (sum over scales). The authors' evaluator divides the sum by
  # 3 scales x 3 weights = 9 (AUTHORS_ANOMALY_MAP_SCALE); rankings, hence AUROC/AUPRO, are
  # unchanged, absolute scores and thresholds are not.
  config.model.anomaly_map_scale = 1.0

  config.loss = ml_collections.ConfigDict()
  config.loss.local_weight = 1.0       # lambda_1; both weights 0 = the RD joint baseline
  config.loss.global_weight = 1.0      # lambda_2
  config.loss.temperature = 0.1        # paper; the authors' RD configs use 0.05
  config.loss.window = ml_collections.config_dict.placeholder(int)  # None = whole map
  config.loss.local_negatives = "all"  # 'all' (paper) | 'one_random' (authors' code)
  config.loss.same_class_positive = False  # the paper's optional second local positive
  config.loss.global_views = "both"    # 'both' (paper) | 'original' (authors' code)
  config.loss.global_form = "supcon"   # 'supcon' (paper Eq. 1) | 'authors' (their SCLLoss)
  # Run the neck on the augmented view even when its embedding is unused, as the authors'
  # code does: its BatchNorm running statistics then see both views.
  config.loss.neck_on_augmented_view = False

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.projector_learning_rate = 1e-3
  config.optimizer.learning_rate = 5e-3  # neck and decoder
  config.optimizer.b1 = 0.5
  config.optimizer.b2 = 0.999
  config.optimizer.clip_norm = 5.0

  config.hiercore = ml_collections.ConfigDict()  # see ccl_jax/hiercore/
  config.hiercore.coreset_fraction = 0.1  # share of each group's patches kept
  config.hiercore.feature_dim = 0       # patch feature channels; 0 = all (no pooling)
  config.hiercore.projection_dim = 128  # random projection for the k-center search; 0 = off
  config.hiercore.chunk_images = 64     # images per streaming coreset reduction
  # Thresholds from cross-fitted scores of the training images (the final bank holds every
  # training image, no hold-out); 0 or 1 = from the validation hold-out instead.
  config.hiercore.threshold_folds = 5
  # 'leave_one_out': each image scored by the final bank without its own patches (one bank);
  # 'random' | 'clusters': K = threshold_folds folds, banks of K-1 folds score the held-out
  # one ('clusters': k-means of the routing embeddings, for images that overlap one another)
  config.hiercore.fold_split = "leave_one_out"
  # PatchCore Eq. 7 image-score reweighting over the nearest patch's b neighbours; 0 = off
  config.hiercore.reweight_neighbours = 0

  config.decision = ml_collections.ConfigDict()  # thresholds: see ccl_jax/decisions.py
  config.decision.rule = "quantile"    # quantile | lognormal | mean_std | max (thresholds.py)
  config.decision.rule_params = {"alpha": 0.05}  # quantile, lognormal: alpha; mean_std: k
  config.decision.num_groups = 0       # groups without class labels; 0 = chosen automatically
  config.decision.max_groups = 20      # the automatic choice's upper bound

  config.image_size = 256
  config.batch_size = 16
  config.eval_batch_size = 0           # 0 = batch_size
  config.num_epochs = 100
  config.seed = 0
  # 'class_mixing': every batch holds >= 2 classes (paper Sec. 3.2) | 'shuffle': a plain
  # shuffle (the authors' DataLoader)
  config.sampler = "class_mixing"
  # > image_size: the augmented view is cut from the image prepared at this size (the
  # authors crop it from the full-resolution file); 0: from the image_size image.
  config.augmented_view_source_size = 0
  config.validation_fraction = 0.05    # held-out normal training images, per class
  # at least this many held out per class (thresholds of RD/CCL), one always kept; 0 = off
  config.validation_min_images = 0
  config.early_stopping_patience = 0   # epochs without validation improvement; 0 = off
  config.evaluate_checkpoint = "best"  # 'best' (lowest validation loss) | 'last'
  config.eval_every_epochs = 0         # test-set metrics during training; 0 = only at the end
  config.log_every_steps = 10
  config.checkpoint_every_steps = 500
  config.num_heatmaps_per_class = 3
  config.worker_count = 0              # grain worker processes for decoding
  # XLA:CPU's memory-minimising schedule (ccl_jax/xla_options.py): a third less memory for the
  # paper step at the same speed on a 2-core CPU; False keeps XLA's concurrency-first order.
  config.xla_cpu_low_memory_schedule = True
  return config


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

"""The full set of config keys with the paper's defaults; files in configs/ start from it.

Every key a run reads is defined here, so a locked config turns a mistyped override
(`--config.loss.widow=3`) into an error instead of a silently ignored value.
"""
from __future__ import annotations

import ml_collections

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

  config.loss = ml_collections.ConfigDict()
  config.loss.local_weight = 1.0       # lambda_1; both weights 0 = the RD joint baseline
  config.loss.global_weight = 1.0      # lambda_2
  config.loss.temperature = 0.1        # paper; the authors' RD configs use 0.05
  config.loss.window = ml_collections.config_dict.placeholder(int)  # None = whole map
  config.loss.local_negatives = "all"  # 'all' (paper) | 'one_random' (authors' code)
  config.loss.same_class_positive = False  # the paper's optional second local positive
  config.loss.global_views = "both"    # 'both' (paper) | 'original' (authors' code)

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
  # Thresholds from K-fold cross-fitted scores: banks of K-1 folds score the held-out fold,
  # the final bank holds every training image (no hold-out); 0 or 1 = validation hold-out.
  config.hiercore.threshold_folds = 5
  # How images are dealt to folds: 'random' | 'clusters' (k-means of the routing
  # embeddings per group, so a held-out fold looks unlike the bank, as new parts do)
  config.hiercore.fold_split = "clusters"
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

"""The config, read once: typed, frozen settings, validated before any work starts.

The programs (`ccl_jax.main`, `evaluate`, `scenarios`, ...) turn their ConfigDict into a
`RunSettings` with `from_config`; everything below them takes these settings (or plain
values from them) and never reads a ConfigDict. A run directory's config.json is
`RunSettings.to_dict()`, read back with `from_dict`, so a stored run and a new command are
compared key by key (`changed_keys`).

Every problem of a config is reported at once, naming the key, its value and the expected
form (`ConfigError`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import ml_collections

from ccl_jax import default_config
from ccl_jax.datasets.builders import MASK_RESIZE_MODES
from ccl_jax.datasets.layouts import MANTA_VIEW_MODES, REAL_IAD_RESOLUTIONS, REAL_IAD_VIEWS
from ccl_jax.models import ENCODERS

MODEL_KINDS = ("reverse_distillation", "hiercore")
THRESHOLD_RULES = ("quantile", "lognormal", "mean_std", "max")
# The paper's all-in-all setting (60 classes).
ALL_IN_ALL = ("mvtec_ad", "visa", "btad", "real_iad")
# The encoders' deepest feature map has stride 16 and the neck halves it once more, so the
# decoder's upsampling returns to the input size only when it is a multiple of 32.
IMAGE_SIZE_MULTIPLE = 32


class ConfigError(ValueError):
  """One or more config keys with a value outside their expected form."""


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Which data a run reads (config block `dataset`)."""
  name: str
  manual_dir: str
  data_dir: str
  classes: str | tuple[str, ...]  # 'all' or class names
  class_labels: Literal["true", "kmeans"]
  num_pseudo_classes: int
  normal_test_share: float  # dataset 'folder', flat layout only
  mask_resize: Literal["nearest", "bilinear_threshold"]
  real_iad_resolution: str
  real_iad_views: str
  manta_views: Literal["split", "stacked"]

  @property
  def names(self) -> tuple[str, ...]:
    """The datasets read: one, or a mixture ('all_in_all' expanded)."""
    names = tuple(_split(self.name))
    return ALL_IN_ALL if names == ("all_in_all",) else names

  @property
  def labels_at_training(self) -> bool:
    return self.class_labels == "true"

  def reading_options(self, name: str) -> dict[str, str]:
    """The options of `ccl_jax.datasets.load` for dataset `name` (one of `names`)."""
    options = {"mask_resize": self.mask_resize}
    if name == "folder":
      options["normal_test_share"] = self.normal_test_share
    elif name == "real_iad":
      options.update(resolution=self.real_iad_resolution, views=self.real_iad_views)
    elif name == "manta":
      options["views"] = self.manta_views
    return options


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The network (config block `model`)."""
  kind: Literal["reverse_distillation", "hiercore"]
  encoder: str
  encoder_weights: str
  projector: Literal["auto", "on", "off"]
  neck_width_per_group: int
  decoder_width_per_group: int
  feature_noise_probability: float
  dtype: str
  anomaly_map_scale: float


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """Everything the loss needs to know, as plain values (hashable: a jit static argument).

  local_weight, global_weight: lambda_1 and lambda_2 of the paper's Eq. 6 (both 0 = the RD
    baseline, which then skips the augmented view entirely).
  temperature: tau of both contrastive losses.
  window: local matching window (odd int) or None for the whole map.
  local_negatives: 'all' other-class images (paper) or 'one_random' (authors' code).
  same_class_positive: add the paper's second local positive.
  global_views: 'both' views in the global loss (paper) or 'original' only (authors' code).
  global_form: 'supcon' (paper Eq. 1) or 'authors' (their SCLLoss, `losses.authors_global_loss`).
  neck_on_augmented_view: run the neck (training mode) on the augmented view even when no
    loss reads its embedding, so that its BatchNorm statistics see both views (authors' code).
  """
  local_weight: float = 1.0
  global_weight: float = 1.0
  temperature: float = 0.1
  window: int | None = None
  local_negatives: Literal["all", "one_random"] = "all"
  same_class_positive: bool = False
  global_views: Literal["both", "original"] = "both"
  global_form: Literal["supcon", "authors"] = "supcon"
  neck_on_augmented_view: bool = False

  @property
  def uses_augmented_view(self) -> bool:
    return self.local_weight > 0 or self.global_weight > 0

  @property
  def embeds_augmented_view(self) -> bool:
    """Whether a training step runs the neck on the augmented view."""
    return self.uses_augmented_view and (
        self.neck_on_augmented_view
        or (self.global_weight > 0 and self.global_views == "both"))


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """Adam with the projector on its own learning rate (config block `optimizer`)."""
  projector_learning_rate: float
  learning_rate: float
  b1: float
  b2: float
  clip_norm: float


@dataclasses.dataclass(frozen=True)
class HierCoreSettings:
  """The memory bank (config block `hiercore`)."""
  coreset_fraction: float
  feature_dim: int
  projection_dim: int
  chunk_images: int
  threshold_folds: int  # 0 / 1: thresholds from the validation hold-out
  fold_split: Literal["leave_one_out", "random", "clusters"]
  reweight_neighbours: int  # 0: image score = maximum of the map (no reweighting)

  @property
  def cross_fitted(self) -> bool:
    return self.threshold_folds >= 2


@dataclasses.dataclass(frozen=True)
class DecisionSettings:
  """Groups and thresholds (config block `decision`)."""
  rule: str
  rule_params: tuple[tuple[str, float], ...]
  num_groups: int
  max_groups: int

  @property
  def rule_kwargs(self) -> dict[str, float]:
    return dict(self.rule_params)


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """A whole run: the blocks above and the run-level keys."""
  dataset: DataSettings
  model: ModelSettings
  loss: LossSettings
  optimizer: OptimizerSettings
  hiercore: HierCoreSettings
  decision: DecisionSettings
  image_size: int
  batch_size: int
  eval_batch_size: int
  num_epochs: int
  seed: int
  sampler: Literal["class_mixing", "shuffle"]
  augmented_view_source_size: int
  validation_fraction: float
  validation_min_images: int
  early_stopping_patience: int
  evaluate_checkpoint: Literal["best", "last"]
  eval_every_epochs: int
  log_every_steps: int
  checkpoint_every_steps: int
  num_heatmaps_per_class: int
  worker_count: int
  xla_cpu_low_memory_schedule: bool

  @property
  def global_eval_batch_size(self) -> int:
    return self.eval_batch_size or self.batch_size

  @property
  def use_projector(self) -> bool:
    """'auto': CCL has the projector, the RD baseline (both CL weights 0) is plain RD4AD."""
    return self.model.projector == "on" or (self.model.projector == "auto"
                                            and self.loss.uses_augmented_view)

  @property
  def warnings(self) -> tuple[str, ...]:
    """What makes a run's numbers meaningless without stopping it; printed at the start and
    written into metrics.json and results.md."""
    if self.model.encoder_weights in ("none", "") and set(self.dataset.names) - {"synthetic"}:
      return (f"model.encoder_weights='none': the {self.model.encoder} encoder is randomly "
              f"initialised, so the numbers on {self.dataset.name} say nothing about the "
              "method; give ImageNet weights (README, 'Encoder weights').",)
    return ()

  @property
  def model_name(self) -> str:
    """'hiercore', 'ccl' or 'rd' (the RD joint baseline: both contrastive weights 0)."""
    if self.model.kind == "hiercore":
      return "hiercore"
    return "ccl" if self.loss.uses_augmented_view else "rd"

  def to_dict(self) -> dict[str, Any]:
    """Nested plain values in the config's key structure (JSON-serialisable)."""
    def plain(value):
      if isinstance(value, tuple):
        return [plain(v) for v in value]
      return value
    result = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if dataclasses.is_dataclass(value):
        block = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if field.name == "decision":
          block["rule_params"] = dict(value.rule_params)
        result[field.name] = block
      else:
        result[field.name] = plain(value)
    return result

  def replace(self, **changes: Any) -> RunSettings:
    """A copy with dotted keys changed ('dataset.class_labels': 'kmeans'), re-validated."""
    values = self.to_dict()
    for key, value in changes.items():
      node = values
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      if leaf not in node:
        raise ConfigError(f"Unknown config key {key!r}.")
      node[leaf] = value
    return from_dict(values)


_BLOCKS = {"dataset": DataSettings, "model": ModelSettings, "loss": LossSettings,
           "optimizer": OptimizerSettings, "hiercore": HierCoreSettings,
           "decision": DecisionSettings}

# Keys that decide what a run trains or builds: a run directory holding a run that differs
# in any of them cannot be resumed by the new command (`changed_keys`). Not among them:
# where the data lies (manual_dir, data_dir: the prepared data is checked against its
# source), how long to train (num_epochs: a finished run can be extended), and everything
# refitted or only read after training (decision.*, evaluation and logging keys).
RUN_IDENTITY_KEYS = (
    "dataset.name", "dataset.classes", "dataset.class_labels",
    "dataset.num_pseudo_classes", "dataset.normal_test_share", "model.kind", "model.encoder",
    "model.encoder_weights", "model.projector", "model.neck_width_per_group",
    "dataset.real_iad_resolution", "dataset.real_iad_views", "dataset.manta_views",
    "model.decoder_width_per_group", "model.feature_noise_probability", "model.dtype",
    "loss.local_weight", "loss.global_weight", "loss.temperature", "loss.window",
    "loss.local_negatives", "loss.same_class_positive", "loss.global_views",
    "loss.global_form", "loss.neck_on_augmented_view", "optimizer.projector_learning_rate",
    "optimizer.learning_rate", "optimizer.b1", "optimizer.b2", "optimizer.clip_norm",
    "hiercore.coreset_fraction", "hiercore.feature_dim", "hiercore.projection_dim",
    "hiercore.threshold_folds", "hiercore.fold_split", "hiercore.reweight_neighbours",
    "image_size", "batch_size", "seed", "sampler", "augmented_view_source_size",
    "validation_fraction", "validation_min_images")


def from_config(config: ml_collections.ConfigDict) -> RunSettings:
  """The settings of a config; raises ConfigError listing every invalid key."""
  return from_dict(config.to_dict())


def from_dict(values: dict[str, Any], *, source: str = "config") -> RunSettings:
  """Settings from nested plain values; keys missing from `values` take their defaults
  (`ccl_jax.default_config`), unknown keys are an error."""
  merged = default_config.base_config().to_dict()
  problems: list[str] = []
  for key, value in values.items():
    if key not in merged:
      problems.append(f"unknown key {key!r}")
    elif isinstance(merged[key], dict) and key != "rule_params":
      if not isinstance(value, dict):
        problems.append(f"{key!r} must be a block of keys, got {value!r}")
        continue
      for sub, sub_value in value.items():
        if sub not in merged[key]:
          problems.append(f"unknown key '{key}.{sub}'")
        else:
          merged[key][sub] = sub_value
    else:
      merged[key] = value
  if problems:
    raise ConfigError(f"{source}: " + "; ".join(problems) + ".")
  blocks = {}
  for name, cls in _BLOCKS.items():
    block = dict(merged[name])
    if name == "decision":
      block["rule_params"] = tuple(sorted(dict(block["rule_params"] or {}).items()))
    if name == "dataset":
      block["classes"] = _classes(block["classes"])
    blocks[name] = cls(**block)
  top = {k: v for k, v in merged.items() if k not in _BLOCKS}
  settings = RunSettings(**blocks, **top)
  problems = validate(settings)
  if problems:
    raise ConfigError(f"{source} has {len(problems)} invalid key(s):\n  "
                      + "\n  ".join(problems))
  return settings


def changed_keys(stored: RunSettings, requested: RunSettings) -> list[str]:
  """`RUN_IDENTITY_KEYS` whose values differ, as 'key: stored -> requested' lines."""
  old, new = flat_values(stored), flat_values(requested)
  return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in RUN_IDENTITY_KEYS
          if old[key] != new[key]]


def flat_values(run_settings: RunSettings) -> dict[str, Any]:
  """Every setting under its dotted config key ('loss.temperature': 0.1)."""
  return _flat(run_settings.to_dict())


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict) and key != "rule_params":
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def validate(s: RunSettings) -> list[str]:
  """Every invalid key of `s` as 'key=value: expected ...' (empty when all are valid)."""
  problems: list[str] = []

  def check(key: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
      problems.append(f"{key}={value!r}: expected {expected}")

  def integer(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

  def number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))

  def choice(key: str, value: Any, options: tuple) -> None:
    check(key, value, value in options, "one of " + ", ".join(map(repr, options)))

  d, m, l, o, h, c = s.dataset, s.model, s.loss, s.optimizer, s.hiercore, s.decision
  check("dataset.name", d.name, isinstance(d.name, str) and bool(_split(d.name)),
        "a dataset name or several, comma-separated")
  choice("dataset.class_labels", d.class_labels, ("true", "kmeans"))
  check("dataset.num_pseudo_classes", d.num_pseudo_classes, integer(d.num_pseudo_classes, 2),
        "an integer >= 2")
  check("dataset.normal_test_share", d.normal_test_share,
        number(d.normal_test_share) and 0 <= d.normal_test_share < 1, "a share in [0, 1)")
  choice("dataset.mask_resize", d.mask_resize, MASK_RESIZE_MODES)
  choice("dataset.real_iad_resolution", d.real_iad_resolution, REAL_IAD_RESOLUTIONS)
  choice("dataset.real_iad_views", d.real_iad_views, REAL_IAD_VIEWS)
  choice("dataset.manta_views", d.manta_views, MANTA_VIEW_MODES)
  choice("model.kind", m.kind, MODEL_KINDS)
  choice("model.encoder", m.encoder, tuple(ENCODERS))
  choice("model.projector", m.projector, ("auto", "on", "off"))
  choice("model.dtype", m.dtype, ("float32", "bfloat16", "float16", "float64"))
  for key in ("neck_width_per_group", "decoder_width_per_group"):
    value = getattr(m, key)
    check(f"model.{key}", value, integer(value, 0), "an integer >= 0 (0 = the encoder's)")
  check("model.feature_noise_probability", m.feature_noise_probability,
        number(m.feature_noise_probability) and 0 <= m.feature_noise_probability <= 1,
        "a probability in [0, 1]")
  check("model.anomaly_map_scale", m.anomaly_map_scale,
        number(m.anomaly_map_scale) and m.anomaly_map_scale > 0,
        "a number > 0 (1 = the sum over scales; 1/9 = the authors' evaluator)")
  for key in ("local_weight", "global_weight"):
    value = getattr(l, key)
    check(f"loss.{key}", value, number(value) and value >= 0, "a number >= 0")
  check("loss.temperature", l.temperature, number(l.temperature) and l.temperature > 0,
        "a number > 0")
  check("loss.window", l.window, l.window is None or (integer(l.window, 1) and l.window % 2),
        "an odd integer >= 1, or None for the whole map")
  choice("loss.local_negatives", l.local_negatives, ("all", "one_random"))
  check("loss.same_class_positive", l.same_class_positive,
        isinstance(l.same_class_positive, bool), "True or False")
  choice("loss.global_views", l.global_views, ("both", "original"))
  choice("loss.global_form", l.global_form, ("supcon", "authors"))
  check("loss.neck_on_augmented_view", l.neck_on_augmented_view,
        isinstance(l.neck_on_augmented_view, bool), "True or False")
  for key in ("projector_learning_rate", "learning_rate", "clip_norm"):
    value = getattr(o, key)
    check(f"optimizer.{key}", value, number(value) and value > 0, "a number > 0")
  for key in ("b1", "b2"):
    value = getattr(o, key)
    check(f"optimizer.{key}", value, number(value) and 0 <= value < 1, "a number in [0, 1)")
  check("hiercore.coreset_fraction", h.coreset_fraction,
        number(h.coreset_fraction) and 0 < h.coreset_fraction <= 1, "a fraction in (0, 1]")
  check("hiercore.feature_dim", h.feature_dim,
        integer(h.feature_dim, 0) and h.feature_dim % 2 == 0,
        "0 (all channels) or an even integer >= 2")
  check("hiercore.projection_dim", h.projection_dim, integer(h.projection_dim, 0),
        "an integer >= 0 (0 = no projection)")
  check("hiercore.chunk_images", h.chunk_images, integer(h.chunk_images, 1), "an integer >= 1")
  check("hiercore.threshold_folds", h.threshold_folds, integer(h.threshold_folds, 0),
        "an integer >= 0 (0 or 1 = thresholds from the validation hold-out)")
  choice("hiercore.fold_split", h.fold_split, ("leave_one_out", "random", "clusters"))
  check("hiercore.reweight_neighbours", h.reweight_neighbours,
        integer(h.reweight_neighbours, 0), "an integer >= 0 (0 = no reweighting)")
  choice("decision.rule", c.rule, THRESHOLD_RULES)
  check("decision.num_groups", c.num_groups, integer(c.num_groups, 0),
        "an integer >= 0 (0 = chosen automatically)")
  check("decision.max_groups", c.max_groups, integer(c.max_groups, 2), "an integer >= 2")
  check("image_size", s.image_size,
        integer(s.image_size, IMAGE_SIZE_MULTIPLE) and s.image_size % IMAGE_SIZE_MULTIPLE == 0,
        f"a positive multiple of {IMAGE_SIZE_MULTIPLE} (the network halves the image five "
        "times)")
  check("batch_size", s.batch_size, integer(s.batch_size, 1), "an integer >= 1")
  check("eval_batch_size", s.eval_batch_size, integer(s.eval_batch_size, 0),
        "an integer >= 0 (0 = batch_size)")
  check("num_epochs", s.num_epochs, integer(s.num_epochs, 1), "an integer >= 1")
  check("seed", s.seed, integer(s.seed, 0), "an integer >= 0")
  choice("sampler", s.sampler, ("class_mixing", "shuffle"))
  check("augmented_view_source_size", s.augmented_view_source_size,
        s.augmented_view_source_size == 0 or (
            integer(s.augmented_view_source_size, 1)
            and s.augmented_view_source_size > s.image_size),
        "0 (the image_size image) or an integer > image_size")
  check("validation_fraction", s.validation_fraction,
        number(s.validation_fraction) and 0 <= s.validation_fraction < 1,
        "a fraction in [0, 1)")
  check("validation_min_images", s.validation_min_images,
        integer(s.validation_min_images, 0), "an integer >= 0 (0 = validation_fraction only)")
  choice("evaluate_checkpoint", s.evaluate_checkpoint, ("best", "last"))
  for key in ("early_stopping_patience", "eval_every_epochs", "checkpoint_every_steps",
              "num_heatmaps_per_class", "worker_count"):
    check(key, getattr(s, key), integer(getattr(s, key), 0), "an integer >= 0")
  check("log_every_steps", s.log_every_steps, integer(s.log_every_steps, 1), "an integer >= 1")
  return problems


def _split(value: Any) -> list[str]:
  return [v.strip() for v in str(value).split(",") if v.strip()]


def _classes(value: Any) -> str | tuple[str, ...]:
  if isinstance(value, str):
    return "all" if value == "all" else tuple(_split(value))
  return tuple(value)

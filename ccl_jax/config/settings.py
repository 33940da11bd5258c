"""The config schema, and the config read once into typed, frozen settings.

Each key is written once, as a field of the dataclasses below: its default, the values it
accepts, whether it changes the trained model, and a comment saying what it means. The rest
is derived from those fields: the ConfigDict the config files start from (`config_defaults`,
used by `ccl_jax.config.default_config.base_config`), the validation of every key, and the keys
that identify a run (`RUN_IDENTITY_KEYS`).

The programs (`ccl_jax.main`, `evaluate`, `scenarios`, ...) turn their ConfigDict into a
`RunSettings` with `from_config`; everything below them takes these settings (or plain
values from them) and never reads a ConfigDict. A run directory's config.json is
`RunSettings.to_dict()`, read back with `from_dict`, so a stored run and a new command are
compared key by key (`changed_keys`).

Every problem of a config is reported at once, naming the key, its value and the expected
form (`ConfigError`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from typing import Any, Callable

import ml_collections

from ccl_jax.decisions import thresholds
from ccl_jax.datasets.builders import MASK_RESIZE_MODES
from ccl_jax.datasets.folder_layout import DEFAULT_NORMAL_TEST_SHARE
from ccl_jax.datasets.layouts import MANTA_VIEW_MODES, REAL_IAD_RESOLUTIONS, REAL_IAD_VIEWS
from ccl_jax.models import AUTHORS_NOISE_PROBABILITY, ENCODERS

# The paper's all-in-all setting (60 classes).
ALL_IN_ALL = ("mvtec_ad", "visa", "btad", "real_iad")
# The encoders' deepest feature map has stride 16 and the neck halves it once more, so the
# decoder's upsampling returns to the input size only when it is a multiple of 32.
IMAGE_SIZE_MULTIPLE = 32


class ConfigError(ValueError):
  """One or more config keys with a value outside their expected form."""


@dataclasses.dataclass(frozen=True)
class Accepts:
  """The values a key accepts: `test(value, run_settings)` and, for errors, their form.

  `run_settings` (the whole RunSettings) is read only by keys bounded by another key.
  """
  test: Callable[[Any, RunSettings], bool]
  expected: str


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key. `default` is the config's value (what config files and config.json
  hold); `read` turns a config value into the setting's value, `write` turns it back."""
  default: Any
  accepts: Accepts | None  # None: any value (paths, names looked up later)
  changes_model: bool  # a run directory trained with another value cannot be resumed
  read: Callable[[Any], Any] | None = None
  write: Callable[[Any], Any] | None = None


def key(default: Any, accepts: Accepts | None, *, changes_model: bool,
        read: Callable[[Any], Any] | None = None,
        write: Callable[[Any], Any] | None = None) -> Any:
  """A settings field for one config key (see `Key`)."""
  return dataclasses.field(
      default=read(default) if read else default,
      metadata={"key": Key(default, accepts, changes_model, read, write)})


def _is_integer(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def one_of(*options: Any) -> Accepts:
  return Accepts(lambda value, _: value in options,
                 "one of " + ", ".join(map(repr, options)))


def integer(minimum: int, note: str = "") -> Accepts:
  return Accepts(lambda value, _: _is_integer(value) and value >= minimum,
                 f"an integer >= {minimum}" + (f" ({note})" if note else ""))


def number(*, above: float | None = None, at_least: float | None = None,
           below: float | None = None, at_most: float | None = None,
           noun: str = "a number", note: str = "") -> Accepts:
  """A finite number within the given bounds, e.g. number(at_least=0, below=1)."""
  def test(value: Any, _) -> bool:
    return _is_number(value) and all((
        above is None or value > above, at_least is None or value >= at_least,
        below is None or value < below, at_most is None or value <= at_most))
  low = ("(", above) if above is not None else ("[", at_least)
  high = (")", below) if below is not None else ("]", at_most)
  if low[1] is not None and high[1] is not None:
    within = f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
  elif low[1] is not None:
    within = (">" if low[0] == "(" else ">=") + f" {low[1]}"
  else:
    within = ("<" if high[0] == ")" else "<=") + f" {high[1]}"
  return Accepts(test, f"{noun} {within}" + (f" ({note})" if note else ""))


BOOLEAN = Accepts(lambda value, _: isinstance(value, bool), "True or False")


def _split(value: Any) -> list[str]:
  return [v.strip() for v in str(value).split(",") if v.strip()]


def _classes(value: Any) -> str | tuple[str, ...]:
  if isinstance(value, str):
    return "all" if value == "all" else tuple(_split(value))
  return tuple(value)


def _sorted_items(value: Any) -> tuple[tuple[str, float], ...]:
  return tuple(sorted(dict(value or {}).items()))


def _plain(value: Any) -> Any:
  """JSON's form of a setting: tuples as lists."""
  if isinstance(value, tuple):
    return [_plain(v) for v in value]
  return value


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Which data a run reads (config block `dataset`)."""
  # mvtec_ad | visa | btad | real_iad | manta | folder (your own images, any class names) |
  # synthetic (built-in demo data), or several comma-separated ('mvtec_ad,visa';
  # 'all_in_all' = mvtec_ad,visa,btad,real_iad)
  name: str = key("mvtec_ad", Accepts(lambda v, _: isinstance(v, str) and bool(_split(v)),
                                      "a dataset name or several, comma-separated"),
                  changes_model=True)
  # The downloaded folder(s), comma-separated for several. Not part of a run's identity, nor
  # is data_dir: the prepared data is checked against its source.
  manual_dir: str = key("", None, changes_model=False)
  data_dir: str = key("~/ccl_jax_data", None, changes_model=False)  # prepared TFDS data
  # 'all', or a comma-separated list / tuple of names
  classes: str | tuple[str, ...] = key("all", None, changes_model=True, read=_classes)
  # 'true': the dataset's classes | 'kmeans': pseudo-classes (paper Table 3)
  class_labels: str = key("true", one_of("true", "kmeans"), changes_model=True)
  # K for 'kmeans' (the paper's best of 15/30/60)
  num_pseudo_classes: int = key(30, integer(2), changes_model=True)
  # dataset 'folder', flat layout (<class>/normal/): share of the normal images held out as
  # test normals, picked by file name (ccl_jax/datasets/folder_layout.py)
  normal_test_share: float = key(DEFAULT_NORMAL_TEST_SHARE,
                                 number(at_least=0, below=1, noun="a share"), changes_model=True)
  # Ground-truth masks at preparation: 'nearest' | 'bilinear_threshold' (bilinear, then
  # > 0.5: the authors' target transform); each mode is prepared once, under its own name.
  # Masks are only read when evaluating.
  mask_resize: str = key("nearest", one_of(*MASK_RESIZE_MODES), changes_model=False)
  # realiad_<this>/ is read: 256 | 512 | 1024 | raw
  real_iad_resolution: str = key("256", one_of(*REAL_IAD_RESOLUTIONS), changes_model=True)
  # all | C1..C5 (one view only)
  real_iad_views: str = key("all", one_of(*REAL_IAD_VIEWS), changes_model=True)
  # split (one sample per view) | stacked
  manta_views: str = key("split", one_of(*MANTA_VIEW_MODES), changes_model=True)

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
  # reverse_distillation (CCL, or RD with both contrastive weights 0) | hiercore (memory
  # bank, no training; uses encoder, encoder_weights and the hiercore block)
  kind: str = key("reverse_distillation", one_of("reverse_distillation", "hiercore"),
                  changes_model=True)
  encoder: str = key("wide_resnet50_2", one_of(*ENCODERS), changes_model=True)
  # Flax msgpack file of the encoder, 'packaged' or 'none' (ccl_jax/weights/encoder_weights.py)
  encoder_weights: str = key("none", None, changes_model=True)
  # auto: on iff a contrastive weight is > 0
  projector: str = key("auto", one_of("auto", "on", "off"), changes_model=True)
  # authors' CCL code; 0 = the encoder's (RD4AD)
  neck_width_per_group: int = key(64, integer(0, "0 = the encoder's"), changes_model=True)
  # 0 = the encoder's (RD4AD and CCL)
  decoder_width_per_group: int = key(0, integer(0, "0 = the encoder's"), changes_model=True)
  # 0 disables
  feature_noise_probability: float = key(
      AUTHORS_NOISE_PROBABILITY, number(at_least=0, at_most=1, noun="a probability"),
      changes_model=True)
  # compute dtype; losses stay float32
  dtype: str = key("float32", one_of("float32", "bfloat16", "float16", "float64"),
                   changes_model=True)
  # Factor on the anomaly map (sum over scales). The authors' evaluator divides the sum by
  # 3 scales x 3 weights = 9 (AUTHORS_ANOMALY_MAP_SCALE); rankings, hence AUROC/AUPRO, are
  # unchanged, absolute scores and thresholds are not (refitted when evaluating).
  anomaly_map_scale: float = key(
      1.0, number(above=0, note="1 = the sum over scales; 1/9 = the authors' evaluator"),
      changes_model=False)


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """Everything the loss needs to know, as plain values (hashable: a jit static argument)."""
  # lambda_1 and lambda_2 of the paper's Eq. 6; both 0 = the RD joint baseline, which then
  # skips the augmented view entirely
  local_weight: float = key(1.0, number(at_least=0), changes_model=True)
  global_weight: float = key(1.0, number(at_least=0), changes_model=True)
  # tau of both contrastive losses: 0.1 in the paper; the authors' RD configs use 0.05
  temperature: float = key(0.1, number(above=0), changes_model=True)
  # local matching window (odd), or None for the whole map
  window: int | None = key(None, Accepts(
      lambda v, _: v is None or (_is_integer(v) and v >= 1 and v % 2 == 1),
      "an odd integer >= 1, or None for the whole map"), changes_model=True)
  # 'all' other-class images (paper) | 'one_random' (authors' code)
  local_negatives: str = key("all", one_of("all", "one_random"), changes_model=True)
  # the paper's optional second local positive
  same_class_positive: bool = key(False, BOOLEAN, changes_model=True)
  # 'both' views in the global loss (paper) | 'original' only (authors' code)
  global_views: str = key("both", one_of("both", "original"), changes_model=True)
  # 'supcon' (paper Eq. 1) | 'authors' (their SCLLoss, `losses.authors_global_loss`)
  global_form: str = key("supcon", one_of("supcon", "authors"), changes_model=True)
  # Run the neck (training mode) on the augmented view even when no loss reads its
  # embedding, as the authors' code does: its BatchNorm running statistics then see both
  # views.
  neck_on_augmented_view: bool = key(False, BOOLEAN, changes_model=True)

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
  projector_learning_rate: float = key(1e-3, number(above=0), changes_model=True)
  learning_rate: float = key(5e-3, number(above=0), changes_model=True)  # neck and decoder
  b1: float = key(0.5, number(at_least=0, below=1), changes_model=True)
  b2: float = key(0.999, number(at_least=0, below=1), changes_model=True)
  clip_norm: float = key(5.0, number(above=0), changes_model=True)


@dataclasses.dataclass(frozen=True)
class HierCoreSettings:
  """The memory bank (config block `hiercore`, see ccl_jax/hiercore/)."""
  # share of each group's patches kept
  coreset_fraction: float = key(0.1, number(above=0, at_most=1, noun="a fraction"),
                                changes_model=True)
  # patch feature channels; 0 = all (no pooling)
  feature_dim: int = key(0, Accepts(lambda v, _: _is_integer(v) and v >= 0 and v % 2 == 0,
                                    "0 (all channels) or an even integer >= 2"),
                         changes_model=True)
  # random projection for the k-center search; 0 = off
  projection_dim: int = key(128, integer(0, "0 = no projection"), changes_model=True)
  # images per merge-and-reduce step of the streaming coreset (bounds memory)
  chunk_images: int = key(64, integer(1), changes_model=False)
  # Thresholds from cross-fitted scores of the training images (the final bank holds every
  # training image, no hold-out); 0 or 1 = from the validation hold-out instead.
  threshold_folds: int = key(
      5, integer(0, "0 or 1 = thresholds from the validation hold-out"), changes_model=True)
  # 'leave_one_out': each image scored by the final bank without its own patches (one bank);
  # 'random' | 'clusters': K = threshold_folds folds, banks of K-1 folds score the held-out
  # one ('clusters': k-means of the routing embeddings, for images that overlap one another)
  fold_split: str = key("leave_one_out", one_of("leave_one_out", "random", "clusters"),
                        changes_model=True)
  # PatchCore Eq. 7 image-score reweighting over the nearest patch's b neighbours; 0 = off
  reweight_neighbours: int = key(0, integer(0, "0 = no reweighting"), changes_model=True)

  @property
  def cross_fitted(self) -> bool:
    return self.threshold_folds >= 2


@dataclasses.dataclass(frozen=True)
class DecisionSettings:
  """Groups and thresholds (config block `decision`, see ccl_jax/evaluation/decide.py); refitted
  whenever a run is evaluated, so none of them identifies a run."""
  # quantile | lognormal | mean_std | max (ccl_jax/decisions/thresholds.py)
  rule: str = key(thresholds.DEFAULT_RULE, one_of(*thresholds.RULES), changes_model=False)
  # quantile, lognormal: alpha; mean_std: k
  rule_params: tuple[tuple[str, float], ...] = key(
      {"alpha": 0.05}, None, changes_model=False, read=_sorted_items, write=dict)
  # groups without class labels; 0 = chosen automatically
  num_groups: int = key(0, integer(0, "0 = chosen automatically"), changes_model=False)
  # the automatic choice's upper bound
  max_groups: int = key(20, integer(2), changes_model=False)

  @property
  def rule_kwargs(self) -> dict[str, float]:
    return dict(self.rule_params)


def _image_size_ok(value: Any, _) -> bool:
  return _is_integer(value) and value >= IMAGE_SIZE_MULTIPLE and (
      value % IMAGE_SIZE_MULTIPLE == 0)


def _view_source_size_ok(value: Any, run_settings: RunSettings) -> bool:
  return value == 0 or (_is_integer(value) and value >= 1
                        and value > run_settings.image_size)


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """A whole run: the blocks above and the run-level keys."""
  dataset: DataSettings
  model: ModelSettings
  loss: LossSettings
  optimizer: OptimizerSettings
  hiercore: HierCoreSettings
  decision: DecisionSettings
  image_size: int = key(256, Accepts(_image_size_ok, (
      f"a positive multiple of {IMAGE_SIZE_MULTIPLE} (the network halves the image five "
      "times)")), changes_model=True)
  batch_size: int = key(16, integer(1), changes_model=True)
  eval_batch_size: int = key(0, integer(0, "0 = batch_size"), changes_model=False)
  # Not part of a run's identity: a finished run can be extended.
  num_epochs: int = key(100, integer(1), changes_model=False)
  seed: int = key(0, integer(0), changes_model=True)
  # 'class_mixing': every batch holds >= 2 classes (paper Sec. 3.2) | 'shuffle': a plain
  # shuffle (the authors' DataLoader)
  sampler: str = key("class_mixing", one_of("class_mixing", "shuffle"), changes_model=True)
  # > image_size: the augmented view is cut from the image prepared at this size (the
  # authors crop it from the full-resolution file); 0: from the image_size image.
  augmented_view_source_size: int = key(0, Accepts(
      _view_source_size_ok, "0 (the image_size image) or an integer > image_size"),
      changes_model=True)
  # held-out normal training images, per class
  validation_fraction: float = key(0.05, number(at_least=0, below=1, noun="a fraction"),
                                   changes_model=True)
  # at least this many held out per class (thresholds of RD/CCL), one always kept; 0 = off
  validation_min_images: int = key(0, integer(0, "0 = validation_fraction only"),
                                   changes_model=True)
  # epochs without validation improvement; 0 = off
  early_stopping_patience: int = key(0, integer(0), changes_model=False)
  # 'best' (lowest validation loss) | 'last'
  evaluate_checkpoint: str = key("best", one_of("best", "last"), changes_model=False)
  # test-set metrics during training; 0 = only at the end
  eval_every_epochs: int = key(0, integer(0), changes_model=False)
  log_every_steps: int = key(10, integer(1), changes_model=False)
  checkpoint_every_steps: int = key(500, integer(0), changes_model=False)
  num_heatmaps_per_class: int = key(3, integer(0), changes_model=False)
  worker_count: int = key(0, integer(0), changes_model=False)  # grain decoding processes
  # XLA:CPU's memory-minimising schedule (ccl_jax/runtime/xla_options.py): a third less memory for
  # the paper step at the same speed on a 2-core CPU; False keeps XLA's concurrency-first
  # order.
  xla_cpu_low_memory_schedule: bool = key(True, BOOLEAN, changes_model=False)

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
    values: dict[str, Any] = {}
    for dotted, value in flat_values(self).items():
      *parents, leaf = dotted.split(".")
      node = values
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = value
    return values

  def replace(self, **changes: Any) -> RunSettings:
    """A copy with dotted keys changed ('dataset.class_labels': 'kmeans'), re-validated."""
    values = self.to_dict()
    for dotted, value in changes.items():
      if dotted not in KEYS:
        raise ConfigError(f"Unknown config key {dotted!r}.")
      *parents, leaf = dotted.split(".")
      node = values
      for parent in parents:
        node = node[parent]
      node[leaf] = value
    return from_dict(values)


# Config block name -> its settings class.
_BLOCKS: dict[str, type] = {
    field.name: typing.get_type_hints(RunSettings)[field.name]
    for field in dataclasses.fields(RunSettings) if "key" not in field.metadata}


def _keys() -> dict[str, tuple[Key, Any]]:
  """Every config key, dotted ('loss.window'), with its definition and type hint."""
  keys = {}
  for prefix, cls in [(f"{name}.", cls) for name, cls in _BLOCKS.items()] + [("", RunSettings)]:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
      if "key" in field.metadata:
        keys[prefix + field.name] = (field.metadata["key"], hints[field.name])
  return keys


KEYS: dict[str, tuple[Key, Any]] = _keys()
# Keys that decide what a run trains or builds: a run directory holding a run that differs
# in any of them cannot be resumed by the new command (`changed_keys`).
RUN_IDENTITY_KEYS: tuple[str, ...] = tuple(
    dotted for dotted, (definition, _) in KEYS.items() if definition.changes_model)


def config_defaults() -> ml_collections.ConfigDict:
  """A ConfigDict holding every key at its default; files in configs/ start from it.

  A key whose default is None holds a typed placeholder, so `--config.loss.window=3` is
  parsed as that type.
  """
  config = ml_collections.ConfigDict()
  for name in _BLOCKS:
    config[name] = ml_collections.ConfigDict()
  for dotted, (definition, hint) in KEYS.items():
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if definition.default is None:
      (kind,) = [t for t in typing.get_args(hint) if t is not type(None)]
      node[leaf] = ml_collections.config_dict.placeholder(kind)
    else:
      node[leaf] = copy.deepcopy(definition.default)
  return config


def from_config(config: ml_collections.ConfigDict) -> RunSettings:
  """The settings of a config; raises ConfigError listing every invalid key."""
  return from_dict(config.to_dict())


def from_dict(values: dict[str, Any], *, source: str = "config") -> RunSettings:
  """Settings from nested plain values; keys missing from `values` take their defaults,
  unknown keys are an error."""
  given: dict[str, Any] = {}
  problems: list[str] = []
  for name, value in values.items():
    if name in _BLOCKS:
      if not isinstance(value, dict):
        problems.append(f"{name!r} must be a block of keys, got {value!r}")
        continue
      given.update({f"{name}.{sub}": sub_value for sub, sub_value in value.items()})
    else:
      given[name] = value
  problems += [f"unknown key {dotted!r}" for dotted in given if dotted not in KEYS]
  if problems:
    raise ConfigError(f"{source}: " + "; ".join(problems) + ".")
  fields: dict[str, dict[str, Any]] = {name: {} for name in ("",) + tuple(_BLOCKS)}
  for dotted, (definition, _) in KEYS.items():
    value = given[dotted] if dotted in given else copy.deepcopy(definition.default)
    block, _, leaf = dotted.rpartition(".")
    fields[block][leaf] = definition.read(value) if definition.read else value
  settings = RunSettings(**{name: cls(**fields[name]) for name, cls in _BLOCKS.items()},
                         **fields[""])
  problems = _problems(settings)
  if problems:
    raise ConfigError(f"{source} has {len(problems)} invalid key(s):\n  "
                      + "\n  ".join(problems))
  return settings


def changed_keys(stored: RunSettings, requested: RunSettings) -> list[str]:
  """`RUN_IDENTITY_KEYS` whose values differ, as 'key: stored -> requested' lines."""
  old, new = flat_values(stored), flat_values(requested)
  return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in RUN_IDENTITY_KEYS
          if old[key] != new[key]]


def _value(run_settings: RunSettings, dotted: str) -> Any:
  value = run_settings
  for part in dotted.split("."):
    value = getattr(value, part)
  return value


def flat_values(run_settings: RunSettings) -> dict[str, Any]:
  """Every setting as its config value, under its dotted key ('loss.temperature': 0.1)."""
  return {dotted: (definition.write or _plain)(_value(run_settings, dotted))
          for dotted, (definition, _) in KEYS.items()}


def _problems(run_settings: RunSettings) -> list[str]:
  """Every invalid key as 'key=value: expected ...' (empty when all are valid)."""
  problems = []
  for dotted, (definition, _) in KEYS.items():
    value = _value(run_settings, dotted)
    if definition.accepts and not definition.accepts.test(value, run_settings):
      problems.append(f"{dotted}={value!r}: expected {definition.accepts.expected}")
  return problems

"""TFDS builders: MVTec AD, synthetic, VisA, BTAD, Real-IAD and MANTA.

All share :class:`AnomalyDetectionBuilder`; a dataset only supplies its class
names, texts and a ``scan_class`` reader of its raw layout (see
:mod:`.mvtec_layout` for MVTec AD / synthetic / BTAD, :mod:`.layouts` for
VisA, Real-IAD and MANTA), plus reading ``OPTIONS`` where it has any:

  =========  ==========================================  ==================
  builder    reads (manual_dir as distributed)           options
  =========  ==========================================  ==================
  mvtec_ad   <cls>/{train,test,ground_truth}             -
  visa       split_csv/1cls.csv + <cls>/Data/...         -
  btad       NN/{train/ok,test/{ok,ko},ground_truth/ko}  -
  real_iad   realiad_jsons/<cls>.json +                  resolution (256),
             realiad_<resolution>/<cls>/...              views (all|C1..C5)
  manta      [<domain>/]<cls>/{train,test-pixel}         - (open class set;
             (5 views side by side; one sample each)       views split)
  folder     <cls>/{train,test,ground_truth} or          normal_test_share
             <cls>/{normal,abnormal,mask}                  (0.2; open class set)
  =========  ==========================================  ==================

Every builder also takes ``mask_resize`` ('nearest' default |
'bilinear_threshold': bilinear, then > 0.5 of the foreground value, as the
CCL authors' target transform does). Non-default options are part of the
config name (e.g. ``pcb_256_resolution512_viewsC1``,
``bottle_256_mask_resizebilinear_threshold``), so each combination is
prepared once.

One :class:`AnomalyBuilderConfig` per (class, image size), named
``<class>_<size>`` (``<class>_orig`` keeps the original resolution), so every
class is prepared on its own: preparing is resumable class by class, and a
failure in one class never touches another. Predefined configs exist for
sizes 256 and original (synthetic: also 128);
``Builder.config_for(class_name, size)`` returns the predefined config or
makes a new one for any other size::

    b = MvtecAd(config=MvtecAd.config_for("bottle", 256), data_dir=...)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir="/data/mvtec_anomaly_detection"))
    b.as_data_source()["test"][0]

Features (stored as ``array_record``; splits ``train`` and ``test``; examples
in a fixed order: sorted file names, test good first, then defect types
sorted; key = ``file_name``):

  image:       Image uint8 (S, S, 3), lossless PNG, RGB (grey inputs expanded,
               16-bit inputs scaled to 8 bits: see :mod:`.images`)
  mask:        Image uint8 (S, S, 1), PNG, values 0 / 255 (all 0 for good)
  class_id:    ClassLabel over the builder's ``CLASS_NAMES``
  class_name:  Text
  label:       ClassLabel ['good', 'anomalous']
  defect_type: Text ('good' for normal images; VisA: 'anomaly')
  file_name:   Text, image path relative to manual_dir (MANTA: plus
               '#view<k>', k = 1..5, the view's position in the strip)

Images are resized once, at preparation time: bilinear with antialiasing
(PIL), masks nearest-neighbour (or bilinear, see ``mask_resize``) then
re-binarised. The whole class is
validated before TFDS writes anything (see :mod:`.common`).

Preparing is parallel within a class: images are decoded, resized and
PNG-encoded by ``num_workers`` threads (default min(8, CPU count); PIL
releases the GIL for that work) with a bounded look-ahead, and written in the
documented order, byte-identical to a sequential run (``num_workers=1``).
``progress=True`` shows a progress bar per split; the number of good and
anomalous examples written per split is kept in ``info.metadata['counts']``
(the loader's report reads it).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import os
import pathlib
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath
from PIL import Image

from ccl_jax.datasets import (
    common, folder_layout, images, layouts, mvtec_layout, synthetic)
from ccl_jax.datasets.common import (
    DatasetError, Sample, check_manual_dir, fingerprint, ordered_map)

__all__ = [
    "AnomalyBuilderConfig",
    "AnomalyDetectionBuilder",
    "BUILDERS",
    "MVTEC_AD_CLASSES",
    "MVTEC_AD_URL",
    "Btad",
    "Folder",
    "Manta",
    "MvtecAd",
    "RealIad",
    "Synthetic",
    "Visa",
    "config_name",
    "default_num_workers",
]

MVTEC_AD_CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut",
                    "leather", "metal_nut", "pill", "screw", "tile",
                    "toothbrush", "transistor", "wood", "zipper")
MVTEC_AD_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
LABEL_NAMES = ("good", "anomalous")
PNG_COMPRESS_LEVEL = 3
MASK_RESIZE_MODES = ("nearest", "bilinear_threshold")
#: options of how every builder encodes (not reads) a sample; first = default.
ENCODING_OPTIONS = {"mask_resize": MASK_RESIZE_MODES}


@dataclasses.dataclass(eq=False)
class AnomalyBuilderConfig(tfds.core.BuilderConfig):
  """One class of an anomaly-detection dataset at one image size.

  ``options``: the builder's reading options (see
  ``AnomalyDetectionBuilder.OPTIONS``) as sorted ``(name, value)`` pairs;
  only values other than the defaults are listed (and appear in the
  config name).
  """
  class_name: str = ""
  image_size: int | None = None  # None: keep the original resolution
  options: tuple[tuple[str, str], ...] = ()

  @property
  def option_values(self) -> dict[str, str]:
    return dict(self.options)

  def __reduce_ex__(self, protocol):
    # TFDS data sources pickle their builder, which is rebuilt from its
    # config on unpickling; TFDS accepts a predefined config only as the
    # very object in BUILDER_CONFIGS, so predefined ones unpickle to it.
    owner = getattr(self, "_predefined_in", None)
    if owner is None:
      return super().__reduce_ex__(protocol)
    return _predefined_config, (owner, self.name)


def config_name(class_name: str, image_size: int | None,
                options: tuple[tuple[str, str], ...] = ()) -> str:
  """``<class>_<size>`` (``_orig``), then ``_<option><value>`` for each
  non-default option, e.g. ``audiojack_256_resolution512_viewsC1``."""
  name = (f"{class_name}_{image_size}" if image_size
          else f"{class_name}_orig")
  return name + "".join(f"_{k}{v}" for k, v in options)


def _check_image_size(image_size):
  if image_size is None:
    return None
  if (isinstance(image_size, bool) or
      not isinstance(image_size, (int, np.integer)) or image_size < 1):
    raise ValueError(
        f"image_size must be a positive int or None, got {image_size!r}")
  return int(image_size)


def _make_configs(class_names, sizes, predefined_in=None, options=()):
  opts = "".join(f", {k}={v}" for k, v in options)
  configs = [AnomalyBuilderConfig(
      name=config_name(c, s, options), class_name=c, image_size=s,
      options=tuple(options),
      description=(f"class {c!r}, "
                   + (f"resized to {s}x{s}" if s else "original size")
                   + opts))
      for c in class_names for s in sizes]
  for cfg in configs:
    cfg._predefined_in = predefined_in  # pylint: disable=protected-access
  return configs


def _predefined_config(builder_name: str, config_name_: str):
  for cfg in BUILDERS[builder_name].BUILDER_CONFIGS:
    if cfg.name == config_name_:
      return cfg
  raise KeyError(f"{builder_name} has no predefined config {config_name_}")


def _png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
  return buf.getvalue()


def default_num_workers() -> int:
  """Threads used to prepare a class by default: min(8, CPU count)."""
  return max(1, min(8, os.cpu_count() or 1))


def check_num_workers(num_workers) -> int:
  if num_workers is None:
    return default_num_workers()
  if (isinstance(num_workers, bool) or
      not isinstance(num_workers, (int, np.integer)) or num_workers < 1):
    raise ValueError("num_workers must be a positive int or None, got "
                     f"{num_workers!r}")
  return int(num_workers)


def _map(fn, items, workers: int):
  """``map`` in input order: sequential for 1 worker, else a thread pool
  with a bounded look-ahead (``ordered_map``)."""
  if workers == 1:
    return map(fn, items)
  return ordered_map(fn, items, workers)


@functools.lru_cache(maxsize=8)
def _empty_mask_png(width: int, height: int) -> bytes:
  return _png(Image.new("L", (width, height), 0))


def _view_box(view, width: int, height: int) -> tuple[int, int, int, int]:
  """Crop box of view ``(k, n)``: the k-th of n equal vertical strips."""
  k, n = view
  return (k * width // n, 0, (k + 1) * width // n, height)


def _is_8bit_png(data: bytes) -> bool:
  # Pillow reports 16-bit RGB PNGs as mode 'RGB' too; only the IHDR bit depth tells.
  return data[12:16] == b"IHDR" and data[24] == 8


def encode_sample(sample: Sample, image_size: int | None,
                  mask_resize: str = MASK_RESIZE_MODES[0]
                  ) -> tuple[bytes, bytes]:
  """(image PNG, mask PNG) bytes of one sample (its view, if it has one),
  resized if requested; the mask as ``mask_resize`` says, then
  foreground where the resized value is above half of 255.

  The image becomes 8-bit RGB whatever its bit depth and mode (see
  :mod:`.images`; an unconvertible one raises ``images.UnsupportedImageError``
  naming the file); any non-zero mask value is foreground.
  """
  with Image.open(sample.image_path) as im:
    im.load()
    data = None
    if (image_size is None and im.format == "PNG" and im.mode == "RGB"
        and sample.view is None):
      data = sample.image_path.read_bytes()
    if data is not None and _is_8bit_png(data):
      image_png = data  # already right
      size = im.size
    else:
      rgb = images.to_rgb(im, sample.image_path)
      if sample.view is not None:
        rgb = rgb.crop(_view_box(sample.view, *rgb.size))
      rgb = images.resized(rgb, image_size)
      image_png = _png(rgb)
      size = rgb.size
  if sample.mask_path is None:
    return image_png, _empty_mask_png(*size)
  with Image.open(sample.mask_path) as m:
    if sample.view is not None:
      m = m.crop(_view_box(sample.view, *m.size))
    arr = np.asarray(m)
  binary = arr != 0
  if binary.ndim == 3:
    binary = binary.any(-1)
  mask = Image.fromarray(binary.astype(np.uint8) * 255)
  if mask.size != size:
    mask = mask.resize(size, Image.Resampling.NEAREST
                       if mask_resize == "nearest"
                       else Image.Resampling.BILINEAR)
    mask = Image.fromarray((np.asarray(mask) > 127).astype(np.uint8) * 255)
  return image_png, _png(mask)


def _encode_with_view_label(sample: Sample, image_size: int | None,
                            mask_resize: str = MASK_RESIZE_MODES[0]):
  """``encode_sample`` plus, for one view of an anomalous multi-view image,
  whether the defect shows in that view (its strip of the full-resolution
  mask is non-zero; such a view with an empty strip is stored as good).
  None where the question does not arise."""
  image_png, mask_png = encode_sample(sample, image_size, mask_resize)
  shows = None
  if sample.view is not None and sample.mask_path is not None:
    with Image.open(sample.mask_path) as m:
      strip = m.crop(_view_box(sample.view, *m.size))
      shows = bool(np.asarray(strip).any())
  return image_png, mask_png, shows


class AnomalyDetectionBuilder(tfds.core.GeneratorBasedBuilder,
                              skip_registration=True):
  """Shared implementation; subclasses set CLASS_NAMES and texts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
  TITLE: ClassVar[str] = ""
  HOMEPAGE: ClassVar[str | None] = None
  #: reading options: name -> allowed values, the first being the default.
  OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {}
  #: expected layout, quoted in validation errors.
  LAYOUT: ClassVar[str] = mvtec_layout.LAYOUT_DESCRIPTION
  #: True: the classes are whatever the raw folder holds (CLASS_NAMES is
  #: empty; see ``list_classes``) and the stored ``class_id`` is 0.
  OPEN_CLASS_SET: ClassVar[bool] = False

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    # TFDS's own lookup for builders defined inside a package needs the
    # `importlib_resources` backport, which is not a dependency here.
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None

  def __init__(self, *, prevalidated: bool = False,
               num_workers: int | None = None, progress: bool = False,
               **kwargs):
    """``prevalidated``: the caller already ran ``scan_classes`` with
    verification on this class, so images are not decoded twice.

    ``num_workers``: threads decoding, resizing and PNG-encoding images
    while preparing (None: ``default_num_workers()``; 1: sequential).
    The examples are written in the same order and are byte-identical
    whatever the number. ``progress``: show a progress bar per split
    while preparing (tqdm, on stderr).
    """
    self._prevalidated = prevalidated
    self._num_workers = check_num_workers(num_workers)
    self._progress = bool(progress)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @classmethod
  def check_options(cls, options: dict) -> tuple[tuple[str, str], ...]:
    """Validated non-default options (reading ``OPTIONS`` and
    ``ENCODING_OPTIONS``) as sorted ``(name, value)`` pairs."""
    problems, out = [], []
    for key in sorted(options):
      cls._check_option(key, options[key], problems, out)
    if problems:
      raise DatasetError(f"{cls.TITLE}: invalid option(s)", problems)
    return tuple(out)

  @classmethod
  def _check_option(cls, key: str, value, problems: list, out: list) -> None:
    """Appends ``(key, why)`` to problems, or a non-default value to out."""
    allowed = {**cls.OPTIONS, **ENCODING_OPTIONS}.get(key)
    if allowed is None:
      known = ", ".join([*cls.OPTIONS, *ENCODING_OPTIONS])
      problems.append((key, f"unknown option of {cls.TITLE} "
                       f"(known options: {known})"))
      return
    value = str(value)
    if value not in allowed:
      problems.append((key, f"value {value!r} not one of "
                       f"{', '.join(map(repr, allowed))}"))
    elif value != allowed[0]:
      out.append((key, value))

  @classmethod
  def reading_options(cls, options: dict) -> dict[str, str]:
    """Every reading option (``OPTIONS``) of ``options``, defaults filled in;
    the encoding options left out (``scan_class`` does not take them)."""
    full = {k: v[0] for k, v in cls.OPTIONS.items()}
    full.update({k: str(v) for k, v in dict(options or {}).items()
                 if k in cls.OPTIONS})
    return full

  @classmethod
  def config_for(cls, class_name: str, image_size: int | None,
                 **options) -> AnomalyBuilderConfig:
    """The (predefined or new) config for one class at one size, with
    the reading ``options`` of ``OPTIONS`` (defaults if not given)."""
    if cls.OPEN_CLASS_SET:
      cls.check_class_names([class_name])
    elif class_name not in cls.CLASS_NAMES:
      raise DatasetError(
          f"{cls.TITLE}: unknown class {class_name!r}; known classes: "
          f"{', '.join(cls.CLASS_NAMES)}",
          [(class_name, "unknown class")])
    image_size = _check_image_size(image_size)
    opts = cls.check_options(options)
    name = config_name(class_name, image_size, opts)
    for cfg in cls.BUILDER_CONFIGS:
      if cfg.name == name:
        return cfg
    return _make_configs([class_name], [image_size], options=opts)[0]

  @classmethod
  def check_class_names(cls, class_names) -> None:
    """Raises one DatasetError naming every class name the builder refuses:
    in an open class set, the names ``common.class_name_problem`` refuses
    (a fixed set is checked on selection)."""
    if not cls.OPEN_CLASS_SET:
      return
    problems = [(name, common.class_name_problem(name)) for name in class_names
                if common.class_name_problem(name)]
    if problems:
      raise DatasetError(
          f"{cls.TITLE}: {len(problems)} class name(s) refused; rename the "
          "folders or select other classes with dataset.classes", problems)

  @classmethod
  def list_classes(cls, manual_dir=None) -> tuple[str, ...] | None:
    """Known class names: ``CLASS_NAMES``; for an open class set, those
    found in ``manual_dir`` (None if it is not given)."""
    del manual_dir
    return tuple(cls.CLASS_NAMES)

  def _class_label_names(self) -> tuple[str, ...]:
    if self.OPEN_CLASS_SET:
      return (self.builder_config.class_name,)
    return tuple(self.CLASS_NAMES)

  # ---- reading the raw files: subclasses override ``scan_class``.

  @classmethod
  def scan_class(cls, manual_dir: pathlib.Path, class_name: str,
                 problems: list, **options) -> list[Sample]:
    """Samples of one class (documented order); appends problems.

    Default: MVTec AD layout. ``options``: as in ``OPTIONS``, defaults
    filled in.
    """
    del options
    return mvtec_layout.scan_class(manual_dir, class_name, problems)

  @classmethod
  def scan_classes(cls, manual_dir, class_names, *, verify: bool = True,
                   options: dict | None = None) -> dict[str, list[Sample]]:
    """Scans (and verifies) several classes: one DatasetError for all."""
    full = cls.reading_options(options)
    return common.scan_classes(
        manual_dir, list(class_names), title=cls.TITLE,
        instructions=cls.MANUAL_DOWNLOAD_INSTRUCTIONS, verify=verify,
        scan=functools.partial(cls.scan_class, **full), layout=cls.LAYOUT)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    hw = (size, size) if size else (None, None)
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{self.TITLE}, class "
                     f"{self.builder_config.class_name!r}. "
                     "Masks are 0/255."),
        features=tfds.features.FeaturesDict({
            "image": self._stackable(tfds.features.Image(
                shape=hw + (3,), dtype=np.uint8, encoding_format="png")),
            "mask": self._stackable(tfds.features.Image(
                shape=hw + (1,), dtype=np.uint8, encoding_format="png")),
            "class_id": tfds.features.ClassLabel(
                names=self._class_label_names()),
            "class_name": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=LABEL_NAMES),
            "defect_type": tfds.features.Text(),
            "file_name": tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,  # keep the documented, sorted order
        metadata=tfds.core.MetadataDict(),
    )

  def stacked_views(self) -> int | None:
    """n: every record holds the n views of one multi-view image stacked
    on a leading axis (image [n, S, S, 3], mask [n, S, S, 1]); None:
    one image per record (the default)."""
    return None

  def _stackable(self, feature):
    n = self.stacked_views()
    return feature if n is None else tfds.features.Sequence(feature,
                                                            length=n)

  def _manual_dir(self, dl_manager):
    # dl_manager.manual_dir raises a bare AssertionError; give ours.
    raw = getattr(dl_manager, "_manual_dir", None)
    return check_manual_dir(raw, title=self.TITLE,
                            instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    manual_dir = self._manual_dir(dl_manager)
    # Validate the whole class before TFDS writes a single example.
    samples = self.scan_classes(
        manual_dir, [cfg.class_name], verify=not self._prevalidated,
        options=cfg.option_values)[cfg.class_name]
    self.info.metadata["source_fingerprint"] = fingerprint(samples)
    self.info.metadata["source_dir"] = str(manual_dir)
    by_split = {split: [s for s in samples if s.split == split]
                for split in ("train", "test")}
    # TFDS cannot write an empty split; a class of normal images only may
    # have no test split (the loader reads its absence as empty).
    return {split: self._generate_examples(part, split)
            for split, part in by_split.items() if part}

  def _generate_examples(self, samples, split: str = ""):
    cfg = self.builder_config
    class_id = self._class_label_names().index(cfg.class_name)
    encode = functools.partial(
        _encode_with_view_label, image_size=cfg.image_size,
        mask_resize=cfg.option_values.get("mask_resize",
                                          MASK_RESIZE_MODES[0]))
    workers = self._num_workers
    n = self.stacked_views()
    # Decoding, resizing and PNG encoding run in a thread pool (PIL
    # releases the GIL for most of it) with a bounded look-ahead, so
    # memory stays bounded; results come back in input order, so the
    # examples are written exactly as by the sequential path.
    if n is None:
      encoded = _map(encode, samples, workers)
    else:  # encode every view of a sample; one record holds them all
      views = _map(encode, (
          dataclasses.replace(s, view=(k, n)) for s in samples
          for k in range(n)), workers)
      encoded = (tuple(zip(*(next(views) for _ in range(n))))
                 for _ in samples)
    counts = {"good": 0, "anomalous": 0}
    bar = tqdm.tqdm(
        total=len(samples), unit="img", mininterval=1.0, leave=True,
        disable=not self._progress or not samples, dynamic_ncols=True,
        desc=f"{self.name}/{cfg.name} {split}".rstrip())
    with bar:
      for sample, (image_png, mask_png, shows) in zip(samples,
                                                      encoded):
        label, defect_type = sample.label, sample.defect_type
        if shows is False:
          label, defect_type = 0, "good"
        elif n is not None:
          image_png, mask_png = list(image_png), list(mask_png)
        counts[LABEL_NAMES[label]] += 1
        bar.update(1)
        yield sample.file_name, {
            "image": image_png,
            "mask": mask_png,
            "class_id": class_id,
            "class_name": cfg.class_name,
            "label": label,
            "defect_type": defect_type,
            "file_name": sample.file_name,
        }
    if split:  # what was written; read back by the loader's report
      self.info.metadata.setdefault("counts", {})[split] = counts


class MvtecAd(AnomalyDetectionBuilder):
  """MVTec AD (Bergmann et al., CVPR 2019), 15 classes, manual download."""

  CLASS_NAMES = MVTEC_AD_CLASSES
  TITLE = "MVTec AD"
  HOMEPAGE = MVTEC_AD_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download MVTec AD from {MVTEC_AD_URL} (mvtec_anomaly_detection"
      ".tar.xz), extract it and pass the extracted folder as manual_dir: it "
      "must contain one folder per class (" + ", ".join(MVTEC_AD_CLASSES)
      + ") with train/good/*.png, test/{good,<defect>}/*.png and "
      "ground_truth/<defect>/<stem>_mask.png.")
  BUILDER_CONFIGS = _make_configs(MVTEC_AD_CLASSES, (256, None), "mvtec_ad")


class Synthetic(AnomalyDetectionBuilder):
  """The procedural dataset of :mod:`ccl_jax.datasets.synthetic`."""

  CLASS_NAMES = synthetic.CLASS_NAMES
  TITLE = "Synthetic AD (ccl_jax)"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Generate the raw files with ccl_jax.datasets.synthetic.generate(path)"
      " and pass that path as manual_dir (ccl_jax.datasets.load('synthetic',"
      " ...) does this by itself under <data_dir>/synthetic_raw).")
  BUILDER_CONFIGS = _make_configs(synthetic.CLASS_NAMES, (128, 256, None),
                                  "synthetic")


VISA_URL = "https://github.com/amazon-science/spot-diff"
VISA_ARCHIVE = ("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/"
                "VisA_20220922.tar")
BTAD_URL = "https://avires.dimi.uniud.it/papers/btad/btad.zip"
REAL_IAD_URL = "https://realiad4ad.github.io/Real-IAD/"


class Visa(AnomalyDetectionBuilder):
  """VisA (Zou et al., ECCV 2022), 12 classes, split ``1cls.csv``."""

  CLASS_NAMES = layouts.VISA_CLASSES
  TITLE = "VisA"
  HOMEPAGE = VISA_URL
  LAYOUT = (
      "Expected layout (VisA as distributed): <manual_dir>/split_csv/"
      "1cls.csv (columns object,split,label,image,mask; paths relative to "
      "manual_dir), <manual_dir>/<class>/Data/Images/{Normal,Anomaly}/*.JPG"
      " and <manual_dir>/<class>/Data/Masks/Anomaly/*.png")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download VisA ({VISA_ARCHIVE}, see {VISA_URL}), extract it and pass"
      " the extracted folder (the one holding split_csv/ and the class "
      "folders " + ", ".join(layouts.VISA_CLASSES) + ") as manual_dir. "
      "The split used is split_csv/1cls.csv, as shipped.")
  BUILDER_CONFIGS = _make_configs(layouts.VISA_CLASSES, (256, None), "visa")

  @classmethod
  def scan_class(cls, manual_dir, class_name, problems, **options):
    return layouts.scan_visa(manual_dir, class_name, problems)


class Btad(AnomalyDetectionBuilder):
  """BTAD (Mishra et al., 2021), products 01, 02, 03."""

  CLASS_NAMES = layouts.BTAD_CLASSES
  TITLE = "BTAD"
  HOMEPAGE = BTAD_URL
  LAYOUT = (
      "Expected layout (BTAD as distributed): <manual_dir>/<NN>/train/ok/*,"
      " <manual_dir>/<NN>/test/{ok,ko}/* and <manual_dir>/<NN>/"
      "ground_truth/ko/<stem>.<png|bmp> (NN = 01, 02, 03)")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download BTAD ({BTAD_URL}), extract it and pass the folder holding "
      "01/, 02/ and 03/ (BTech_Dataset_transformed/ in the zip) as "
      "manual_dir.")
  BUILDER_CONFIGS = _make_configs(layouts.BTAD_CLASSES, (256, None), "btad")

  @classmethod
  def scan_class(cls, manual_dir, class_name, problems, **options):
    return layouts.scan_btad(manual_dir, class_name, problems)


class RealIad(AnomalyDetectionBuilder):
  """Real-IAD (Wang et al., CVPR 2024), 30 classes, five views each.

  Options: ``resolution`` ('256' default, '512', '1024', 'raw': which
  ``realiad_<resolution>`` folder is read) and ``views`` ('all' default:
  every view is a sample; 'C1'..'C5': that view only, e.g. 'C1' for the
  single-view setting). ``file_name`` (path relative to manual_dir) names
  the object folder (``OK/S0001``, ``NG/<defect>/S0020``) and the view
  (``_C1_``): see ``layouts.realiad_view``.
  """

  CLASS_NAMES = layouts.REAL_IAD_CLASSES
  TITLE = "Real-IAD"
  HOMEPAGE = REAL_IAD_URL
  OPTIONS = {"resolution": layouts.REAL_IAD_RESOLUTIONS,
             "views": layouts.REAL_IAD_VIEWS}
  LAYOUT = (
      "Expected layout (Real-IAD as distributed): <manual_dir>/realiad_jsons"
      "/<class>.json (keys meta{prefix, normal_class}, train, test) and "
      "<manual_dir>/realiad_<resolution>/<class>/{OK,NG/<defect>}/S..../"
      "*_C<k>_*.jpg with masks *.png next to the NG images")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Request Real-IAD at {REAL_IAD_URL}, download realiad_jsons and at "
      "least one image resolution (realiad_256, realiad_512, realiad_1024 "
      "or realiad_raw; unzip each class archive inside it) into one folder "
      "and pass that folder as manual_dir.")
  BUILDER_CONFIGS = _make_configs(layouts.REAL_IAD_CLASSES, (256, None),
                                  "real_iad")

  @classmethod
  def scan_class(cls, manual_dir, class_name, problems, **options):
    return layouts.scan_real_iad(manual_dir, class_name, problems,
                                 **options)


class Manta(AnomalyDetectionBuilder):
  """MANTA (multi-view tiny objects; 38 classes over 5 domains).

  Open class set: the classes are the folders of ``manual_dir`` holding a
  ``train/`` folder (directly or inside a domain folder). Each image holds
  five views side by side. Option ``views``: 'split' (default) makes each
  view one sample (see ``layouts.scan_manta``); 'stacked' keeps one
  record per image with the views stacked on a leading axis (image
  [5, S, S, 3], mask [5, S, S]; label and defect_type of the whole image)
  -- for multi-view methods; the single-image training code needs 'split'.
  """

  CLASS_NAMES = ()
  OPEN_CLASS_SET = True
  TITLE = "MANTA"
  OPTIONS = {"views": layouts.MANTA_VIEW_MODES}
  LAYOUT = (
      "Expected layout (MANTA as distributed): <manual_dir>/[<domain>/]"
      "<class>/train/good/*, <class>/test-pixel/{good,<defect>}/* and "
      "<class>/test-pixel/mask/[<defect>/]* (masks in the sorted order of "
      "the anomalous images); every image holds 5 views side by side")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download MANTA (\"MANTA: A Large-Scale Multi-View and Visual-Text "
      "Anomaly Detection Dataset for Tiny Objects\", CVPR 2025; see its "
      "project page), extract the domain archives (electronics, mechanics,"
      " grain, groceries, medicine) into one folder and pass it as "
      "manual_dir.")
  BUILDER_CONFIGS = []

  @classmethod
  def list_classes(cls, manual_dir=None):
    if manual_dir is None or not pathlib.Path(manual_dir).is_dir():
      return None
    return layouts.list_manta_classes(manual_dir)

  @classmethod
  def scan_class(cls, manual_dir, class_name, problems, **options):
    return layouts.scan_manta(manual_dir, class_name, problems, **options)

  def stacked_views(self):
    if self.builder_config.option_values.get("views") == "stacked":
      return layouts.MANTA_NUM_VIEWS
    return None


class Folder(AnomalyDetectionBuilder):
  """Your own images: any class names, one folder per class.

  Each sub-folder of manual_dir is a class (or those of
  ``dataset.classes``), in MVTec AD's layout or in a flat one::

      <class>/train/good/*   <class>/test/{good,<type>}/*
      <class>/ground_truth/<type>/<stem>_mask.*          (masks optional)
  or
      <class>/normal/*       <class>/abnormal/[<type>/]*  (optional)
      <class>/mask/[<type>/]<stem>[_mask].*               (optional)

  Flat layout: option ``normal_test_share`` (default '0.2') is the share of
  the normal images held out as test normals, chosen by the SHA-256 of each
  file name (deterministic, independent of the machine); the rest train.
  Masks pair with images by stem; within a class every defective image
  has a mask or none has (then pixel metrics are skipped for it). A class
  without defective images, or without test images, is valid: it trains
  and evaluation reports what can be computed. Class names may hold only
  ASCII letters, digits, '_', '-' and '.' (first a letter or digit): they
  become TFDS config and folder names, are comma-separated in
  ``dataset.classes`` and '/'-qualified in mixtures. See
  :mod:`.folder_layout` for the exact rules.
  """

  CLASS_NAMES = ()
  OPEN_CLASS_SET = True
  TITLE = "Image folder"
  OPTIONS = {"normal_test_share": (str(folder_layout.DEFAULT_NORMAL_TEST_SHARE),)}
  LAYOUT = folder_layout.LAYOUT_DESCRIPTION
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the folder holding one sub-folder per class as manual_dir "
      "(dataset.manual_dir); each class folder holds train/good/ (MVTec AD "
      "layout) or normal/ (flat layout).")
  BUILDER_CONFIGS = []

  @classmethod
  def _check_option(cls, key: str, value, problems: list, out: list) -> None:
    # The share is a number, not one of a few listed values; it is written
    # canonically ('0.3', never '0.30') so that equal shares share a config.
    if key != "normal_test_share":
      super()._check_option(key, value, problems, out)
      return
    try:
      value = f"{folder_layout.parse_share(value):g}"
    except (TypeError, ValueError):
      problems.append((key, f"value {value!r} is not a share in [0, 1)"))
      return
    if value != cls.OPTIONS[key][0]:
      out.append((key, value))

  @classmethod
  def list_classes(cls, manual_dir=None):
    if manual_dir is None or not pathlib.Path(manual_dir).is_dir():
      return None
    return folder_layout.list_classes(manual_dir)

  @classmethod
  def scan_class(cls, manual_dir, class_name, problems, **options):
    return folder_layout.scan_folder(manual_dir, class_name, problems,
                                     **options)


#: dataset name (``dataset.name``, ``load(name)``; also the TFDS name) -> builder class.
BUILDERS: dict[str, type[AnomalyDetectionBuilder]] = {
    builder.name: builder
    for builder in (MvtecAd, Synthetic, Visa, Btad, RealIad, Manta, Folder)}

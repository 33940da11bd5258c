"""TFDS builders for datasets in MVTec AD layout (MVTec AD and synthetic).

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

  image:       Image uint8 (S, S, 3), lossless PNG, RGB (grey inputs expanded)
  mask:        Image uint8 (S, S, 1), PNG, values 0 / 255 (all 0 for good)
  class_id:    ClassLabel over the builder's ``CLASS_NAMES``
  class_name:  Text
  label:       ClassLabel ['good', 'anomalous']
  defect_type: Text ('good' for normal images)
  file_name:   Text, image path relative to manual_dir

Images are resized once, at preparation time: bilinear with antialiasing
(PIL), masks nearest-neighbour then re-binarised. The whole class is
validated before TFDS writes anything (see :mod:`.mvtec_layout`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from ccl_jax.datasets import synthetic
from ccl_jax.datasets.mvtec_layout import (
    DatasetError, Sample, check_manual_dir, fingerprint, ordered_map,
    scan_classes)

__all__ = [
    "AnomalyBuilderConfig",
    "AnomalyDetectionBuilder",
    "MVTEC_AD_CLASSES",
    "MVTEC_AD_URL",
    "MvtecAd",
    "SyntheticAd",
    "config_name",
]

MVTEC_AD_CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut",
                    "leather", "metal_nut", "pill", "screw", "tile",
                    "toothbrush", "transistor", "wood", "zipper")
MVTEC_AD_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
LABEL_NAMES = ("good", "anomalous")
PNG_COMPRESS_LEVEL = 3


@dataclasses.dataclass(eq=False)
class AnomalyBuilderConfig(tfds.core.BuilderConfig):
    """One class of an anomaly-detection dataset at one image size."""
    class_name: str = ""
    image_size: int | None = None  # None: keep the original resolution

    def __reduce_ex__(self, protocol):
        # TFDS data sources pickle their builder, which is rebuilt from its
        # config on unpickling; TFDS accepts a predefined config only as the
        # very object in BUILDER_CONFIGS, so predefined ones unpickle to it.
        owner = getattr(self, "_predefined_in", None)
        if owner is None:
            return super().__reduce_ex__(protocol)
        return _predefined_config, (owner, self.name)


def config_name(class_name: str, image_size: int | None) -> str:
    return f"{class_name}_{image_size}" if image_size else f"{class_name}_orig"


def _check_image_size(image_size):
    if image_size is None:
        return None
    if (isinstance(image_size, bool) or
            not isinstance(image_size, (int, np.integer)) or image_size < 1):
        raise ValueError(
            f"image_size must be a positive int or None, got {image_size!r}")
    return int(image_size)


def _make_configs(class_names, sizes, predefined_in=None):
    configs = [AnomalyBuilderConfig(
        name=config_name(c, s), class_name=c, image_size=s,
        description=(f"class {c!r}, "
                     + (f"resized to {s}x{s}" if s else "original size")))
        for c in class_names for s in sizes]
    for cfg in configs:
        cfg._predefined_in = predefined_in  # pylint: disable=protected-access
    return configs


def _predefined_config(builder_name: str, config_name_: str):
    for cfg in _BUILDER_CLASSES[builder_name].BUILDER_CONFIGS:
        if cfg.name == config_name_:
            return cfg
    raise KeyError(f"{builder_name} has no predefined config {config_name_}")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def _empty_mask_png(width: int, height: int) -> bytes:
    return _png(Image.new("L", (width, height), 0))


def encode_sample(sample: Sample, image_size: int | None
                  ) -> tuple[bytes, bytes]:
    """(image PNG, mask PNG) bytes of one sample, resized if requested."""
    with Image.open(sample.image_path) as im:
        im.load()
        if (image_size is None and im.format == "PNG" and im.mode == "RGB"):
            image_png = sample.image_path.read_bytes()  # already right
            size = im.size
        else:
            rgb = im.convert("RGB")
            if image_size is not None and rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size),
                                 Image.Resampling.BILINEAR)
            image_png = _png(rgb)
            size = rgb.size
    if sample.mask_path is None:
        return image_png, _empty_mask_png(*size)
    with Image.open(sample.mask_path) as m:
        arr = np.asarray(m)
    binary = arr != 0
    if binary.ndim == 3:
        binary = binary.any(-1)
    mask = Image.fromarray(binary.astype(np.uint8) * 255)
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
        mask = Image.fromarray((np.asarray(mask) > 127).astype(np.uint8) * 255)
    return image_png, _png(mask)


class AnomalyDetectionBuilder(tfds.core.GeneratorBasedBuilder,
                              skip_registration=True):
    """Shared implementation; subclasses set CLASS_NAMES and texts."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
    TITLE: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str | None] = None

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        # TFDS's own lookup for builders defined inside a package needs the
        # `importlib_resources` backport, which is not a dependency here.
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None

    def __init__(self, *, prevalidated: bool = False, **kwargs):
        """``prevalidated``: the caller already ran ``scan_classes`` with
        verification on this class, so images are not decoded twice."""
        self._prevalidated = prevalidated
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @classmethod
    def config_for(cls, class_name: str,
                   image_size: int | None) -> AnomalyBuilderConfig:
        """The (predefined or new) config for one class at one size."""
        if class_name not in cls.CLASS_NAMES:
            raise DatasetError(
                f"{cls.TITLE}: unknown class {class_name!r}; known classes: "
                f"{', '.join(cls.CLASS_NAMES)}",
                [(class_name, "unknown class")])
        image_size = _check_image_size(image_size)
        name = config_name(class_name, image_size)
        for cfg in cls.BUILDER_CONFIGS:
            if cfg.name == name:
                return cfg
        return _make_configs([class_name], [image_size])[0]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        hw = (size, size) if size else (None, None)
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"{self.TITLE}, class "
                         f"{self.builder_config.class_name!r}. "
                         "Masks are 0/255."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=hw + (3,), dtype=np.uint8,
                                             encoding_format="png"),
                "mask": tfds.features.Image(shape=hw + (1,), dtype=np.uint8,
                                            encoding_format="png"),
                "class_id": tfds.features.ClassLabel(names=self.CLASS_NAMES),
                "class_name": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                "defect_type": tfds.features.Text(),
                "file_name": tfds.features.Text(),
            }),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,  # keep the documented, sorted order
            metadata=tfds.core.MetadataDict(),
        )

    def _manual_dir(self, dl_manager):
        # dl_manager.manual_dir raises a bare AssertionError; give ours.
        raw = getattr(dl_manager, "_manual_dir", None)
        return check_manual_dir(raw, title=self.TITLE,
                                instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS)

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        manual_dir = self._manual_dir(dl_manager)
        # Validate the whole class before TFDS writes a single example.
        samples = scan_classes(
            manual_dir, [cfg.class_name], title=self.TITLE,
            instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS,
            verify=not self._prevalidated)[cfg.class_name]
        self.info.metadata["source_fingerprint"] = fingerprint(samples)
        self.info.metadata["source_dir"] = str(manual_dir)
        return {
            split: self._generate_examples(
                [s for s in samples if s.split == split])
            for split in ("train", "test")
        }

    def _generate_examples(self, samples):
        cfg = self.builder_config
        class_id = self.CLASS_NAMES.index(cfg.class_name)
        encoded = ordered_map(
            functools.partial(encode_sample, image_size=cfg.image_size),
            samples)
        for sample, (image_png, mask_png) in zip(samples, encoded):
            yield sample.file_name, {
                "image": image_png,
                "mask": mask_png,
                "class_id": class_id,
                "class_name": cfg.class_name,
                "label": sample.label,
                "defect_type": sample.defect_type,
                "file_name": sample.file_name,
            }


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


class SyntheticAd(AnomalyDetectionBuilder):
    """The procedural dataset of :mod:`ccl_jax.datasets.synthetic`."""

    CLASS_NAMES = synthetic.CLASS_NAMES
    TITLE = "Synthetic AD (ccl_jax)"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Generate the raw files with ccl_jax.datasets.synthetic.generate(path)"
        " and pass that path as manual_dir (ccl_jax.datasets.load('synthetic',"
        " ...) does this by itself under <data_dir>/synthetic_raw).")
    BUILDER_CONFIGS = _make_configs(synthetic.CLASS_NAMES, (128, 256, None),
                                    "synthetic_ad")


_BUILDER_CLASSES = {"mvtec_ad": MvtecAd, "synthetic_ad": SyntheticAd}

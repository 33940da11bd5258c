r"""Real photographs with drawn-in defects (data_prep/photo_parts.py), as dataset 'folder'.

  python -m data_prep.photo_parts --output ~/photo_parts
  python -m ccl_jax.main --config configs/photo_parts.py --workdir /tmp/photo_parts_ccl

Five classes cut from photographs bundled with scikit-image (brick, grass, gravel, lunar
surface, stained tissue), 48 normal training images each; 20 good and 20 defective test
images each from blocks of the photograph no training image touches (coloured scratches,
smears, foreign stains, with exact masks). Unlike the synthetic demo, normal images vary as
real surfaces do, so it shows how well the decisions (class-wise thresholds) hold on new
parts. The EfficientNet-Lite0 ImageNet encoder of the demo (pip package, no download).

Expected (means over the 5 classes, %; 2-core AMD EPYC CPU, 2026-11-25: 4 min 19 s wall,
data already written):
  configs/photo_parts.py           I-AUROC 90.8, P-AUROC 93.9, AUPRO 87.0; decisions:
                                   class-wise F1 79.8, FAR 11.0, threshold efficiency 91.0
  configs/photo_parts.py:hiercore  I-AUROC 85.5, P-AUROC 87.1, AUPRO 77.9; decisions:
                                   class-wise F1 80.3, FAR 4.0, threshold efficiency 91.1
(docs/thresholds.md: the same over three seeds of the data, and the other threshold sources).

Variants (`configs/photo_parts.py:<variant>`):
  hiercore    HierCore on the same data and encoder (a memory bank, no training), 1 %
              coreset (34 s).
  lookalike   the 'lookalike' set (python -m data_prep.photo_parts --set lookalike
              --output ~/photo_parts_lookalike): two photographs at two scales each, so
              classes come in pairs that look alike. The four label scenarios on it:
              python -m ccl_jax.scenarios --config configs/photo_parts.py:lookalike,hiercore \
                  --workdir /tmp/lookalike_scenarios
"""
from configs import demo


def get_config(arg: str | None = None):
  config = demo.get_config()
  config.dataset.name = "folder"
  config.dataset.manual_dir = "~/photo_parts"
  config.image_size = 128
  # Thresholds from at least 10 held-out images per class rather than 10 % of 48 (5): the
  # largest of a handful of scores flags about 1 / (n + 1) of new good parts.
  config.validation_min_images = 10
  variant, _, rest = (arg or "").partition(",")
  if variant == "lookalike":
    config.dataset.manual_dir = "~/photo_parts_lookalike"
    # Its brick and gravel are other images than the parts set's classes of the same name:
    # prepared data of its own, so neither set is refused for the other's files.
    config.dataset.data_dir = "~/ccl_jax_data/photo_parts_lookalike"
    variant, rest = rest, ""
  if rest:
    raise ValueError(f"Unknown variant {arg!r} of configs/photo_parts.py")
  if variant == "":
    return config
  if variant == "hiercore":
    config.model.kind = "hiercore"
    # A 1 % coreset ranks these photographs better than 10 % and sets better thresholds
    # (docs/hiercore.md, three seeds of the data); on the synthetic demo 10 % is better.
    config.hiercore.coreset_fraction = 0.01
    return config
  raise ValueError(f"Unknown variant {arg!r} of configs/photo_parts.py; expected hiercore, "
                   "lookalike or lookalike,hiercore.")

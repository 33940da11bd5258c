r"""Real-IAD, all 30 classes and all 5 views in one model (the paper's domain-in-all setting).

  python -m ccl_jax.main --config configs/real_iad.py:authors --workdir ~/runs/realiad_authors \
      --config.dataset.manual_dir=/path/to/Real-IAD \
      --config.model.encoder_weights=/path/to/wide_resnet50_2_racm.msgpack

manual_dir holds realiad_jsons/ and realiad_1024/ (the official download; this config reads
dataset.real_iad_resolution=1024, and 256, 512 or raw folders work the same). Every view C1..C5
is a sample (dataset.real_iad_views=all; C1..C5 keeps one view). The variants are those of
configs/mvtec_ad.py, with its readings of ambiguous text (docs/faithfulness.md has every
setting with its source). The authors
train on their own 512-pixel copy (data/gen_benchmark/resize_realiad.py, bicubic); the
presets prepare 256 (and, for the augmented view, 512) pixels from realiad_1024 with PIL's
antialiased bilinear filter instead.

Expected (paper Table 1, ImageNet encoder): I-AUROC 87.6, P-AUROC 98.5, PRO 91.4 (RD joint
baseline, ADer: 82.7 / 97.2 / 90.0). Not reproduced with this code: no ImageNet weights can
be downloaded on the machines it was built on.

Variants (`configs/real_iad.py:<variant>`): authors (LGC-AD/AD-LGC configs/rd/rd_realiad.py
as their code runs it), paper, rd (the RD joint baseline).
"""
from ccl_jax.config.default_config import for_dataset, variant


def get_config(arg: str | None = None):
  return variant(for_dataset("real_iad", real_iad_resolution="1024"), arg, "configs/real_iad.py")

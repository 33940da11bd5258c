r"""The paper's all-in-all setting: MVTec AD, VisA, BTAD and Real-IAD (60 classes), one model.

  python -m ccl_jax.main --config configs/all_in_all.py:authors --workdir ~/runs/all_authors \
      --config.dataset.manual_dir=/data/mvtec,/data/VisA,/data/BTAD,/data/Real-IAD \
      --config.model.encoder_weights=/path/to/wide_resnet50_2_racm.msgpack

One manual_dir per dataset, comma-separated, in the order mvtec_ad, visa, btad, real_iad;
classes become '<dataset>/<class>'. Real-IAD is read from realiad_1024 (the official
download), every view a sample. The variants are those of configs/mvtec_ad.py, with its
readings of ambiguous text (docs/faithfulness.md has every setting with its source).

Expected (paper Table 1, ImageNet encoder): I-AUROC 90.6, P-AUROC 97.9, PRO 90.6. Not
reproduced with this code: no ImageNet weights can be downloaded on the machines it was
built on.

Variants (`configs/all_in_all.py:<variant>`): authors (LGC-AD/AD-LGC configs/rd/rd_joint.py as
their code runs it), paper, rd (the RD joint baseline).
"""
from ccl_jax.config.default_config import for_dataset, variant


def get_config(arg: str | None = None):
  return variant(for_dataset("all_in_all", real_iad_resolution="1024"), arg,
                 "configs/all_in_all.py")

r"""BTAD, its 3 classes in one model (the paper's domain-in-all setting).

  python -m ccl_jax.main --config configs/btad.py:authors --workdir ~/runs/btad_authors \
      --config.dataset.manual_dir=/path/to/BTech_Dataset_transformed \
      --config.model.encoder_weights=/path/to/wide_resnet50_2_racm.msgpack

manual_dir holds 01, 02, 03/{train/ok,test/ok,test/ko,ground_truth/ko}. The variants are those
of configs/mvtec_ad.py, with its readings of ambiguous text (docs/faithfulness.md has every
setting with its source).

Expected (paper Table 1, ImageNet encoder): I-AUROC 95.7, P-AUROC 98.0, PRO 80.2. Not
reproduced with this code: no ImageNet weights can be downloaded on the machines it was
built on.

Variants (`configs/btad.py:<variant>`): authors (LGC-AD/AD-LGC configs/rd/rd_btad.py as their
code runs it), paper, rd (the RD joint baseline).
"""
from ccl_jax.config.default_config import for_dataset, variant


def get_config(arg: str | None = None):
  return variant(for_dataset("btad"), arg, "configs/btad.py")

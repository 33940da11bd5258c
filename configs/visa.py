r"""VisA, all 12 classes in one model (the paper's domain-in-all setting).

  python -m ccl_jax.main --config configs/visa.py:authors --workdir ~/runs/visa_authors \
      --config.dataset.manual_dir=/path/to/VisA \
      --config.model.encoder_weights=/path/to/wide_resnet50_2_racm.msgpack

manual_dir holds split_csv/1cls.csv and <class>/Data/{Images,Masks}. The variants are those of
configs/mvtec_ad.py, with its readings of ambiguous text (docs/faithfulness.md has every
setting with its source).

Expected (paper Table 1, ImageNet encoder): I-AUROC 95.9, P-AUROC 98.5, PRO 92.6 (RD joint
baseline, ADer: 90.6 / 98.0 / 91.9). Not reproduced with this code: no ImageNet weights can
be downloaded on the machines it was built on. The authors' VisA loader keeps only 1% of each
training class (a bug, not copied), so :authors trains on all VisA training images where
their run did not.

Variants (`configs/visa.py:<variant>`): authors (LGC-AD/AD-LGC configs/rd/rd_visa.py as their
code runs it), paper, rd (the RD joint baseline).
"""
from ccl_jax.config.default_config import for_dataset, variant


def get_config(arg: str | None = None):
  return variant(for_dataset("visa"), arg, "configs/visa.py")

r"""MANTA, all 38 classes in one model (the paper's domain-in-all setting).

  python -m ccl_jax.main --config configs/manta.py:authors --workdir ~/runs/manta_authors \
      --config.dataset.manual_dir=/path/to/MANTA \
      --config.model.encoder_weights=/path/to/wide_resnet50_2_racm.msgpack

manual_dir holds the five extracted domain folders. Each MANTA file shows 5 views side by
side; dataset.manta_views=split (this config) makes each view one sample, labelled defective
only where its strip of the mask is (the authors' loader labels all 5 views of a defective
image defective); 'stacked' keeps the 5 views in one record (multi-view methods only). The
variants are those of configs/mvtec_ad.py, with its readings of ambiguous text
(docs/faithfulness.md has every setting with its source).

Expected (paper Table 1, ImageNet encoder): I-AUROC 84.3, P-AUROC 93.7, PRO 81.9. Not
reproduced with this code: no ImageNet weights can be downloaded on the machines it was
built on.

Variants (`configs/manta.py:<variant>`): authors (the authors' RD + CCL code as it runs; their
repository has no MANTA config, so the settings are those of configs/rd/rd_mvtec.py), paper,
rd (the RD joint baseline).
"""
from ccl_jax.config.default_config import for_dataset, variant


def get_config(arg: str | None = None):
  return variant(for_dataset("manta", manta_views="split"), arg, "configs/manta.py")

"""HierCore: a hierarchical PatchCore-style memory bank for multi-class anomaly detection.

Designed from the abstract of "Multi-class Image Anomaly Detection for Practical
Applications: Requirements and Robust Solutions" (2025): groups of training images (classes,
or embedding clusters without labels; `ccl_jax.decisions.grouping`) form the upper level, a greedy
k-center coreset of each group's patch features the lower level. Test images are routed to a
group and scored by nearest-neighbour patch distance to that group's coreset only.

  features.py     patch_features / make_patch_fn: PatchCore's locally aware patch features
  coreset.py      greedy_coreset (exact or JL-projected) and StreamingCoreset (merge-and-reduce)
  memory_bank.py  MemoryBank, build_memory_bank, score, score_images, nearest_distances,
                  Excluded (leave-one-out scoring)
  fit.py          fitting a HierCore run: groups, memory bank, thresholds, evaluation
"""
from __future__ import annotations

from ccl_jax.hiercore.coreset import (DEFAULT_PROJECTION_DIM, StreamingCoreset,
                                      covering_radius, greedy_coreset, projection_matrix)
from ccl_jax.hiercore.features import PATCH_SCALES, make_patch_fn, patch_features
from ccl_jax.hiercore.memory_bank import (Excluded, MemoryBank, build_memory_bank,
                                          coreset_sizes, nearest_distances, score, score_images)

__all__ = [
    "DEFAULT_PROJECTION_DIM", "Excluded", "MemoryBank", "PATCH_SCALES", "StreamingCoreset",
    "build_memory_bank", "coreset_sizes", "covering_radius", "greedy_coreset",
    "make_patch_fn", "nearest_distances", "patch_features", "projection_matrix", "score",
    "score_images",
]

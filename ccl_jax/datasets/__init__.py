"""Datasets: raw-layout readers, TFDS builders and the loader API.

Datasets (``load(name, ...)``): 'mvtec_ad', 'synthetic', 'visa', 'btad',
'real_iad' (options ``resolution``, ``views``), 'manta' (option ``views``:
'split' or 'stacked'), 'folder' (your own images; option
``normal_test_share``).

Main entry points: :func:`load` and, for several datasets in one class-id
space, :func:`load_mixture` (see :mod:`ccl_jax.datasets.loader`).
"""

from ccl_jax.datasets import common, folder_layout, images, layouts, synthetic
from ccl_jax.datasets.builders import (
    BUILDERS, AnomalyBuilderConfig, AnomalyDetectionBuilder, Btad, Folder, Manta,
    MVTEC_AD_CLASSES, MvtecAd, RealIad, Synthetic, Visa)
from ccl_jax.datasets.layouts import realiad_view
from ccl_jax.datasets.loader import AnomalyDataset, RecordSource, load, load_mixture
from ccl_jax.datasets.common import DatasetError, Sample, scan_classes
from ccl_jax.datasets.totals import KNOWN_TOTALS, check_totals

__all__ = [
    "AnomalyBuilderConfig", "AnomalyDataset", "AnomalyDetectionBuilder",
    "BUILDERS", "Btad", "DatasetError", "Folder", "KNOWN_TOTALS", "MVTEC_AD_CLASSES",
    "Manta",
    "MvtecAd", "RealIad", "RecordSource", "Sample", "Synthetic", "Visa",
    "folder_layout", "images", "layouts", "load", "load_mixture", "realiad_view", "scan_classes",
    "check_totals", "common", "synthetic",
]

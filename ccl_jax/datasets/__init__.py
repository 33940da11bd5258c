"""Datasets: MVTec-layout readers, TFDS builders and the loader API.

Main entry point: :func:`load` (see :mod:`ccl_jax.datasets.loader`).
"""

from ccl_jax.datasets import synthetic
from ccl_jax.datasets.builders import (
    AnomalyBuilderConfig, AnomalyDetectionBuilder, MVTEC_AD_CLASSES, MvtecAd,
    SyntheticAd)
from ccl_jax.datasets.loader import AnomalyDataset, RecordSource, load
from ccl_jax.datasets.mvtec_layout import DatasetError, Sample, scan_classes

__all__ = [
    "AnomalyBuilderConfig", "AnomalyDataset", "AnomalyDetectionBuilder",
    "DatasetError", "MVTEC_AD_CLASSES", "MvtecAd", "RecordSource", "Sample",
    "SyntheticAd", "load", "scan_classes", "synthetic",
]

"""Datasets: raw sources -> the canonical `Dataset` (items, categories, time-ordered user sequences)."""

from reclm_jax.data.config import DATASETS, DataConfig
from reclm_jax.data.load import load_dataset
from reclm_jax.data.schema import DataError, Dataset

__all__ = ["DATASETS", "DataConfig", "DataError", "Dataset", "load_dataset"]

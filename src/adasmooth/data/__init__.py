"""Data sets as float tensors in [0, 1], shape (N, C, H, W), with int64 labels."""

from ..core.errors import DataError
from .base import DATASET_STATS, DATASETS, Dataset, default_data_dir, load_dataset

__all__ = ["Dataset", "DataError", "DATASETS", "DATASET_STATS", "load_dataset", "default_data_dir"]

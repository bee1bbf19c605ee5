"""Data sets as float tensors in [0, 1], shape (N, C, H, W), with int64 labels.

Adding a data set: one new file that decorates its loader with ``@register_dataset(...)`` (or
``@register_image_files(...)`` for files decoded on demand), declaring the files it reads (``files=``),
and one import line below.
"""

from ..core.errors import DataError
from . import base
from .base import (
    DATASET_STATS,
    DATASETS,
    SPLITS,
    Dataset,
    dataset_info,
    default_data_dir,
    declared_files,
    describe_files,
    files_help,
    load_dataset,
    register_dataset,
    register_image_files,
)
from .augment import AUGMENTATIONS
from .images import ImageOptions

# Importing a data set's file registers it.
from . import digits  # noqa: E402,F401
from . import idx  # noqa: E402,F401
from . import cifar  # noqa: E402,F401
from . import folder  # noqa: E402,F401
from .folder import ImageFolderDataset  # noqa: E402

__all__ = list(base.__all__) + ["AUGMENTATIONS", "ImageOptions", "ImageFolderDataset"]

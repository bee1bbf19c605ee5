"""scikit-learn's bundled 8x8 digits (offline): a fixed stratified 80/20 train/test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import register_dataset


@register_dataset("digits", num_classes=10, input_shape=(1, 8, 8), mean=(0.3054,), std=(0.3816,), files={},
                  files_where="none: bundled with scikit-learn")
def load_digits(split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)

"""Datasets for collabdm_jax: one call, numpy arrays plus metadata.

``load_dataset(name, data_dir=None, **kw)`` returns a :class:`Dataset` for any
name in ``list_datasets()``: images (NHWC float32, normalised per channel) or
tables (``collabdm_jax.data.tabular``).
"""

from collabdm_jax.data.images import (
    IMAGE_SPECS,
    DatasetUnavailableError,
    class_balanced_indices,
    list_datasets,
    load_dataset,
    load_image_dataset,
    normalize_images,
    read_idx,
)
from collabdm_jax.data.types import Dataset

__all__ = [
    "IMAGE_SPECS",
    "Dataset",
    "DatasetUnavailableError",
    "class_balanced_indices",
    "list_datasets",
    "load_dataset",
    "load_image_dataset",
    "normalize_images",
    "read_idx",
]

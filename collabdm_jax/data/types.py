"""The one record every loader returns: arrays plus what a run needs to know about them."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled dataset held as numpy arrays, already normalised.

  Attributes:
    name: registry name, e.g. ``"fashion_mnist"`` or ``"5g_ids"``.
    train_x, test_x: images as NHWC float32 normalised with ``mean``/``std``
      (per channel), or tabular features as [N, F] float32 standardised with
      training statistics.
    train_y, test_y: int32 labels in ``[0, num_classes)``.
    num_classes: number of classes.
    class_names: one name per class id.
    input_shape: shape of one example, (H, W, C) for images, (F,) for tables.
    mean, std: the normalisation that was applied (per channel for images,
      per feature for tables), so images can be mapped back to pixels.
    source: where the arrays came from (a path, "embedded" or "tfds:<name>").
    kind: ``"image"`` or ``"tabular"``.
    feature_names: column names for tabular data, ``None`` for images.
  """

  name: str
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  class_names: Tuple[str, ...]
  input_shape: Tuple[int, ...]
  mean: np.ndarray
  std: np.ndarray
  source: str
  kind: str = "image"
  feature_names: Optional[Tuple[str, ...]] = None

  def denormalize(self, x: np.ndarray) -> np.ndarray:
    """Undoes the normalisation (images back to [0, 1] pixel scale)."""
    return np.asarray(x) * self.std + self.mean

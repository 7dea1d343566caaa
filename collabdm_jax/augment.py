"""Differentiable Siamese augmentation (DSA), partition-and-expansion, tables.

DSA (Zhao & Bilen) augments a real batch and a synthetic batch with the *same*
random transform, so matching their embeddings compares like with like while
gradients still reach the synthetic pixels. In CollabDM the two batches live
on different machines (a client's real images, the server's synthetic ones),
so the transform must be a pure function of a shared key and must not depend
on the batch size: with ``siamese=True`` every random number is drawn once per
call as a scalar and broadcast over the batch.

The per-operation maths follows DM's ``DiffAugment`` as its pinned PyTorch
(1.2, where ``affine_grid``/``grid_sample`` behave as ``align_corners=True``)
runs it. Images are NHWC float32 throughout.

Partition-and-expansion (PAE, from IDM) splits each synthetic image into its
four quadrants and upsamples each back to full size, so one stored image acts
as four training images; ``mosaic_init`` builds the 2x2 mosaics PAE sets start
from.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# A mirrored digit is a different or invalid digit, so DM drops flip there.
DIGIT_STRATEGY = "color_crop_cutout_scale_rotate"
NO_AUGMENTATION = "none"

_DIGIT_DATASETS = frozenset({"mnist", "svhn", "usps", "emnist"})
_TABULAR_DATASETS = frozenset({"5g_ids", "nsl_kdd"})
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclasses.dataclass(frozen=True)
class DSAParams:
  """Strengths of the DSA operations (DM's ``ParamDiffAug`` defaults).

  Attributes:
    scale: scale factors are drawn from U(1/scale, scale); must be >= 1.
    rotate: rotation angle drawn from U(-rotate, rotate) degrees; >= 0.
    crop: maximal translation as a fraction of the side,
      ``int(side * crop + 0.5)`` pixels; in [0, 1).
    cutout: side of the zeroed square as a fraction of the image side,
      ``int(side * cutout + 0.5)`` pixels; in [0, 1].
    brightness: additive shift drawn from U(-brightness/2, brightness/2); >= 0.
    saturation: chroma factor drawn from U(0, saturation); >= 0.
    contrast: contrast factor drawn from U(contrast, contrast + 1); >= 0.
    flip: probability of a horizontal flip; in [0, 1].

  Frozen (hashable) so it can be a static argument of ``jax.jit``.
  """

  scale: float = 1.2
  rotate: float = 15.0
  crop: float = 0.125
  cutout: float = 0.5
  brightness: float = 1.0
  saturation: float = 2.0
  contrast: float = 0.5
  flip: float = 0.5

  def __post_init__(self):
    checks = (
        ("scale", self.scale >= 1.0, ">= 1"),
        ("rotate", self.rotate >= 0.0, ">= 0"),
        ("crop", 0.0 <= self.crop < 1.0, "in [0, 1)"),
        ("cutout", 0.0 <= self.cutout <= 1.0, "in [0, 1]"),
        ("brightness", self.brightness >= 0.0, ">= 0"),
        ("saturation", self.saturation >= 0.0, ">= 0"),
        ("contrast", self.contrast >= 0.0, ">= 0"),
        ("flip", 0.0 <= self.flip <= 1.0, "in [0, 1]"),
    )
    for name, ok, limit in checks:
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        raise ValueError(f"DSAParams.{name} must be a finite number {limit}, "
                         f"got {value!r}")


def dsa_strategy_for(dataset_name: str) -> str:
  """DSA strategy DM uses for a dataset.

  Args:
    dataset_name: registry name, e.g. ``"fashion_mnist"``, ``"mnist"``,
      ``"cifar10"``, ``"5g_ids"`` (case and ``-``/``_`` are ignored).

  Returns:
    ``"none"`` for the tabular datasets (5g_ids, nsl_kdd), the strategy without
    ``flip`` for digit datasets (mnist, svhn, usps, emnist and its splits such
    as ``emnist_digits``), ``DEFAULT_STRATEGY`` otherwise (Fashion-MNIST keeps
    flip, as in DM).
  """
  if not isinstance(dataset_name, str) or not dataset_name.strip():
    raise ValueError(f"dataset_name must be a non-empty string, "
                     f"got {dataset_name!r}")
  name = dataset_name.strip().lower().replace("-", "_")
  if name in _TABULAR_DATASETS:
    return NO_AUGMENTATION
  if name in _DIGIT_DATASETS or name.startswith("emnist_"):
    return DIGIT_STRATEGY
  return DEFAULT_STRATEGY


def parse_strategy(strategy: str) -> Tuple[str, ...]:
  """Splits a DSA strategy string into its families.

  Args:
    strategy: families joined by ``_`` (e.g. ``"color_crop"``); ``""``,
      ``"none"`` or ``"None"`` mean no augmentation.

  Returns:
    The family names in order (empty tuple for no augmentation).
  """
  if not isinstance(strategy, str):
    raise ValueError(f"strategy must be a string, got {strategy!r}")
  if strategy in ("", "none", "None"):
    return ()
  families = tuple(strategy.split("_"))
  for family in families:
    if family not in FAMILIES:
      raise ValueError(f"strategy {strategy!r} contains unknown family "
                       f"{family!r}; allowed: {', '.join(FAMILIES)}")
  return families


# ---------------------------------------------------------------------------
# Deterministic building blocks (explicit parameters, no randomness).
# ---------------------------------------------------------------------------


def _per_image(value):
  """Broadcasts a scalar or per-image [N] parameter against [N, H, W, C]."""
  return value if jnp.ndim(value) == 0 else value[:, None, None, None]


def _apply_brightness(x, u, ratio):
  """x + (u - 0.5) * ratio, u scalar or [N]."""
  return x + (_per_image(u) - 0.5) * ratio


def _apply_saturation(x, u, ratio):
  """Scales each pixel's deviation from its channel mean by u * ratio."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * (_per_image(u) * ratio) + mean


def _apply_contrast(x, u, ratio):
  """Scales each image's deviation from its own mean by u + ratio."""
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (_per_image(u) + ratio) + mean


def _apply_flip(x, do_flip):
  """Mirrors the width axis where ``do_flip`` (scalar or [N] bool) holds."""
  return jnp.where(_per_image(do_flip), x[:, :, ::-1, :], x)


def _translate_image(img, dy, dx):
  """out[i, j] = img[i + dy, j + dx], zero where that falls outside.

  Args:
    img: [H, W, C].
    dy, dx: integer shifts (may be traced).
  """
  h, w = img.shape[0], img.shape[1]
  rows = jnp.arange(h) + dy
  cols = jnp.arange(w) + dx
  row_ok = (rows >= 0) & (rows < h)
  col_ok = (cols >= 0) & (cols < w)
  out = jnp.take(img, jnp.clip(rows, 0, h - 1), axis=0)
  out = jnp.take(out, jnp.clip(cols, 0, w - 1), axis=1)
  keep = (row_ok[:, None] & col_ok[None, :]).astype(img.dtype)
  return out * keep[:, :, None]


def _cutout_mask(h, w, center_y, center_x, size_h, size_w, dtype=jnp.float32):
  """[H, W] mask, 0 on the square of the given size around the centre.

  Like DM, the square spans rows ``center_y - size_h // 2`` to
  ``center_y - size_h // 2 + size_h - 1`` (same for columns) clipped to the
  image, so a centre near a border removes a smaller area.
  """
  top = center_y - size_h // 2
  left = center_x - size_w // 2
  rows = jnp.arange(h)
  cols = jnp.arange(w)
  in_rows = (rows >= top) & (rows < top + size_h)
  in_cols = (cols >= left) & (cols < left + size_w)
  return 1.0 - (in_rows[:, None] & in_cols[None, :]).astype(dtype)


def _affine_sample(img, theta):
  """Warps one image with an affine map, PyTorch ``align_corners=True`` style.

  Equivalent to ``grid_sample(img, affine_grid(theta))`` with bilinear
  interpolation and zero padding: output pixel (i, j) has normalised
  coordinates (x, y) = (-1 + 2j/(W-1), -1 + 2i/(H-1)) and reads the input at
  ``theta @ (x, y, 1)``. For a matrix without translation on a square image
  this is the same pixel mapping as ``align_corners=False`` (both map the
  image centre to itself and scale pixel offsets by the same factor), so the
  convention only matters for non-square images.

  Args:
    img: [H, W, C].
    theta: [2, 3] affine matrix acting on normalised (x=width, y=height).

  Returns:
    [H, W, C], differentiable in ``img``.
  """
  h, w = img.shape[0], img.shape[1]
  gy, gx = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w),
                        indexing="ij")
  src_x = theta[0, 0] * gx + theta[0, 1] * gy + theta[0, 2]
  src_y = theta[1, 0] * gx + theta[1, 1] * gy + theta[1, 2]
  ix = (src_x + 1.0) * 0.5 * (w - 1)
  iy = (src_y + 1.0) * 0.5 * (h - 1)
  x0 = jnp.floor(ix)
  y0 = jnp.floor(iy)
  wx1 = ix - x0
  wy1 = iy - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  out = jnp.zeros_like(img)
  for yy, wy in ((y0, 1.0 - wy1), (y0 + 1, wy1)):
    for xx, wx in ((x0, 1.0 - wx1), (x0 + 1, wx1)):
      # Taps outside the image read zero (grid_sample's padding_mode='zeros').
      valid = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
      tap = img[jnp.clip(yy, 0, h - 1), jnp.clip(xx, 0, w - 1)]
      weight = jnp.where(valid, wy * wx, 0.0).astype(img.dtype)
      out = out + tap * weight[:, :, None]
  return out


def _map_images(fn, x, per_image_args, siamese):
  """Applies ``fn(img, *args)`` to every image, args shared or per image."""
  axes = None if siamese else 0
  return jax.vmap(fn, in_axes=(0,) + (axes,) * len(per_image_args))(
      x, *per_image_args)


# ---------------------------------------------------------------------------
# Random families. Each takes (key, x, params, siamese); draws have shape ()
# when siamese (shared by the batch, independent of its size) else [N].
# ---------------------------------------------------------------------------


def _draw_shape(x, siamese):
  return () if siamese else (x.shape[0],)


def _color(key, x, params, siamese):
  shape = _draw_shape(x, siamese)
  ub = jax.random.uniform(jax.random.fold_in(key, 0), shape)
  us = jax.random.uniform(jax.random.fold_in(key, 1), shape)
  uc = jax.random.uniform(jax.random.fold_in(key, 2), shape)
  x = _apply_brightness(x, ub, params.brightness)
  x = _apply_saturation(x, us, params.saturation)
  return _apply_contrast(x, uc, params.contrast)


def _crop(key, x, params, siamese):
  shape = _draw_shape(x, siamese)
  shift_h = int(x.shape[1] * params.crop + 0.5)
  shift_w = int(x.shape[2] * params.crop + 0.5)
  dy = jax.random.randint(jax.random.fold_in(key, 0), shape, -shift_h,
                          shift_h + 1)
  dx = jax.random.randint(jax.random.fold_in(key, 1), shape, -shift_w,
                          shift_w + 1)
  return _map_images(_translate_image, x, (dy, dx), siamese)


def _cutout(key, x, params, siamese):
  shape = _draw_shape(x, siamese)
  h, w = x.shape[1], x.shape[2]
  size_h = int(h * params.cutout + 0.5)
  size_w = int(w * params.cutout + 0.5)
  # DM's centre range: [0, side] for even squares, [0, side - 1] for odd ones.
  cy = jax.random.randint(jax.random.fold_in(key, 0), shape, 0,
                          h + (1 - size_h % 2))
  cx = jax.random.randint(jax.random.fold_in(key, 1), shape, 0,
                          w + (1 - size_w % 2))
  make_mask = functools.partial(_cutout_mask, h, w, size_h=size_h,
                                size_w=size_w, dtype=x.dtype)
  if siamese:
    mask = make_mask(cy, cx)[None]
  else:
    mask = jax.vmap(make_mask)(cy, cx)
  return x * mask[..., None]


def _flip(key, x, params, siamese):
  u = jax.random.uniform(key, _draw_shape(x, siamese))
  return _apply_flip(x, u < params.flip)


def _scale(key, x, params, siamese):
  shape = _draw_shape(x, siamese)
  r = params.scale
  sx = jax.random.uniform(jax.random.fold_in(key, 0), shape, minval=1.0 / r,
                          maxval=r)
  sy = jax.random.uniform(jax.random.fold_in(key, 1), shape, minval=1.0 / r,
                          maxval=r)
  zero = jnp.zeros_like(sx)
  theta = jnp.stack([jnp.stack([sx, zero, zero], -1),
                     jnp.stack([zero, sy, zero], -1)], -2)
  return _map_images(_affine_sample, x, (theta,), siamese)


def _rotation_matrix(angle):
  """[..., 2, 3] matrix [[cos, -sin, 0], [sin, cos, 0]] (DM's convention)."""
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  zero = jnp.zeros_like(angle)
  return jnp.stack([jnp.stack([cos, -sin, zero], -1),
                    jnp.stack([sin, cos, zero], -1)], -2)


def _rotate(key, x, params, siamese):
  u = jax.random.uniform(key, _draw_shape(x, siamese))
  angle = (u - 0.5) * 2.0 * params.rotate / 180.0 * jnp.pi
  return _map_images(_affine_sample, x, (_rotation_matrix(angle),), siamese)


_FAMILY_FNS: Dict[str, Callable] = {
    "color": _color,
    "crop": _crop,
    "cutout": _cutout,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
}


def _split_dsa_key(key):
  """(key choosing the family, key of the transform itself)."""
  return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def _family_index(choice_key, num_families: int):
  """Index of the family a one-family call applies (uniform)."""
  return jax.random.randint(choice_key, (), 0, num_families)


@functools.partial(jax.jit,
                   static_argnames=("strategy", "params", "siamese",
                                    "one_family"))
def dsa(key, images, strategy: str = DEFAULT_STRATEGY,
        params: DSAParams = DSAParams(), *, siamese: bool = True,
        one_family: bool = True):
  """Differentiable Siamese augmentation of a batch of images.

  Args:
    key: PRNG key. With ``siamese=True`` the same key gives the same transform
      on any batch, whatever its size.
    images: [N, H, W, C] float images (normalised).
    strategy: families joined by ``_`` from color, crop, cutout, flip, scale,
      rotate (static); ``""``/``"none"`` returns ``images`` unchanged.
    params: operation strengths (static).
    siamese: draw each random parameter once and share it across the batch
      (True) or draw per image (False, for training evaluation networks).
    one_family: DM's mode "S": draw one family uniformly with ``key`` and apply
      only it (``color`` = brightness, saturation, contrast); the family is
      shared by the whole batch even with ``siamese=False``, as in DM. False
      is mode "M": apply every family in strategy order.

  Returns:
    [N, H, W, C] augmented images, differentiable w.r.t. ``images``.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floating point, got {images.dtype}")
  if not isinstance(params, DSAParams):
    raise ValueError(f"params must be a DSAParams, got {type(params).__name__}")
  families = parse_strategy(strategy)
  if not families:
    return images
  choice_key, op_key = _split_dsa_key(key)

  def run(family, family_key, x):
    # Random draws are float32; keep the caller's dtype (and give every
    # lax.switch branch the same output type).
    return _FAMILY_FNS[family](family_key, x, params, siamese).astype(x.dtype)

  if not one_family:
    for i, family in enumerate(families):
      images = run(family, jax.random.fold_in(op_key, i), images)
    return images
  branches = [functools.partial(run, f) for f in families]
  if len(branches) == 1:
    return branches[0](op_key, images)
  index = _family_index(choice_key, len(branches))
  return jax.lax.switch(index, branches, op_key, images)


# ---------------------------------------------------------------------------
# Partition and expansion (IDM), mosaics.
# ---------------------------------------------------------------------------


def _check_images(images, name="images", min_side=2):
  if getattr(images, "ndim", None) != 4:
    raise ValueError(f"{name} must be [N, H, W, C], got shape "
                     f"{getattr(images, 'shape', None)}")
  if images.shape[1] < min_side or images.shape[2] < min_side:
    raise ValueError(f"{name} must be at least {min_side}x{min_side} pixels, "
                     f"got {images.shape[1]}x{images.shape[2]}")


def _quadrant_bounds(h, w):
  """(rows, cols) slices of TL, TR, BL, BR; the first half is floor(side/2)."""
  hh, hw = h // 2, w // 2
  top, bottom = slice(0, hh), slice(hh, h)
  left, right = slice(0, hw), slice(hw, w)
  return ((top, left), (top, right), (bottom, left), (bottom, right))


@jax.jit
def pae_expand(images, labels: Optional[jax.Array] = None):
  """Partition-and-expansion: each image becomes its 4 upsampled quadrants.

  Quadrants are taken top-left, top-right, bottom-left, bottom-right (rows
  and columns split at floor(side/2)) and each is resized bilinearly back to
  H x W (``jax.image.resize`` 'linear', which for x2 equals PyTorch's
  ``F.interpolate(mode='bilinear', align_corners=False)``). Output is
  image-major: rows 4n..4n+3 come from image n. IDM concatenates quadrant-major
  instead; the multiset of images per class is the same.

  Args:
    images: [N, H, W, C], H, W >= 2.
    labels: optional [N] int labels.

  Returns:
    [4N, H, W, C] images, or (images, [4N] labels each repeated 4 times).
  """
  _check_images(images)
  n, h, w, c = images.shape
  quads = [
      jax.image.resize(images[:, rs, cs, :], (n, h, w, c), method="linear")
      for rs, cs in _quadrant_bounds(h, w)
  ]
  expanded = jnp.stack(quads, axis=1).reshape(4 * n, h, w, c)
  if labels is None:
    return expanded
  labels = jnp.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"labels must have shape ({n},) to match images, got "
                     f"{labels.shape}")
  return expanded, jnp.repeat(labels, 4)


@jax.jit
def mosaic_init(images):
  """Tiles every 4 consecutive images, halved, into one 2x2 mosaic.

  Image 4m+q goes to quadrant q (TL, TR, BL, BR) of mosaic m, so
  ``pae_expand(mosaic_init(x))[4m+q]`` is ``x[4m+q]`` downsampled and upsampled
  again. Downsampling is bilinear without antialiasing, as PyTorch's
  ``F.interpolate(scale_factor=0.5, mode='bilinear')`` that IDM uses (a 2x2
  mean for even sides).

  Args:
    images: [4M, H, W, C], H, W >= 2.

  Returns:
    [M, H, W, C] mosaics.
  """
  _check_images(images)
  n, h, w, c = images.shape
  if n % 4:
    raise ValueError(f"images must hold a multiple of 4 images, got {n}")
  m = n // 4
  groups = images.reshape(m, 4, h, w, c)
  tiles = []
  for q, (rs, cs) in enumerate(_quadrant_bounds(h, w)):
    size = (m, rs.stop - rs.start, cs.stop - cs.start, c)
    tiles.append(jax.image.resize(groups[:, q], size, method="linear",
                                  antialias=False))
  top = jnp.concatenate(tiles[0:2], axis=2)
  bottom = jnp.concatenate(tiles[2:4], axis=2)
  return jnp.concatenate([top, bottom], axis=1)


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit,
                   static_argnames=("mask_prob", "scale_jitter", "siamese"))
def tabular_augment(key, x, *, mask_prob: float = 0.1,
                    scale_jitter: float = 0.1, siamese: bool = True):
  """Random feature masking and multiplicative jitter for standardised tables.

  Each feature is multiplied by a factor from U(1 - scale_jitter,
  1 + scale_jitter) and, with probability ``mask_prob``, set to 0 (the
  training mean after standardisation).

  Args:
    key: PRNG key.
    x: [N, F] float features.
    mask_prob: probability of masking a feature, in [0, 1].
    scale_jitter: half-width of the multiplicative factor range, in [0, 1).
    siamese: one mask and one factor vector [F] shared by every row, so equal
      keys give the same transform on batches of any size; False draws per
      row [N, F].

  Returns:
    [N, F] augmented features, differentiable w.r.t. ``x``.
  """
  if getattr(x, "ndim", None) != 2:
    raise ValueError(f"x must be [N, F], got shape {getattr(x, 'shape', None)}")
  if not 0.0 <= mask_prob <= 1.0:
    raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
  if not 0.0 <= scale_jitter < 1.0:
    raise ValueError(f"scale_jitter must be in [0, 1), got {scale_jitter}")
  shape = (x.shape[1],) if siamese else x.shape
  u_mask = jax.random.uniform(jax.random.fold_in(key, 0), shape)
  factor = jax.random.uniform(jax.random.fold_in(key, 1), shape,
                              minval=1.0 - scale_jitter,
                              maxval=1.0 + scale_jitter)
  keep = (u_mask >= mask_prob).astype(x.dtype)
  return x * (factor * keep).astype(x.dtype)


TABULAR_STRATEGY = "tabular"


def siamese_augment(key, x, strategy: str):
  """The Siamese augmentation a strategy names, for images or tables.

  ``strategy`` is a DSA strategy (images), ``"tabular"`` (feature masking and
  jitter shared by the batch, ``tabular_augment``) or ``""``/``"none"``. The
  same key gives the same transform on batches of any size.
  """
  if strategy == TABULAR_STRATEGY:
    return tabular_augment(key, x, siamese=True)
  if strategy in ("", "none", "None"):
    return x
  return dsa(key, x, strategy, siamese=True)


__all__ = (
    "TABULAR_STRATEGY",
    "siamese_augment",
    "DEFAULT_STRATEGY",
    "DIGIT_STRATEGY",
    "NO_AUGMENTATION",
    "FAMILIES",
    "DSAParams",
    "dsa_strategy_for",
    "parse_strategy",
    "dsa",
    "pae_expand",
    "mosaic_init",
    "tabular_augment",
)

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
  # A window of the zero-padded image rather than two gathers and a mask:
  # the same values, and its gradient is a slice instead of scatters, which
  # XLA:CPU compiles faster. Shifts of a whole side or more give only zeros,
  # so they are clipped to the padding.
  dy = jnp.clip(dy, -h, h)
  dx = jnp.clip(dx, -w, w)
  padded = jnp.pad(img, ((h, h), (w, w), (0, 0)))
  return jax.lax.dynamic_slice(padded, (h + dy, w + dx, jnp.zeros_like(dy)),
                               img.shape)


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
# Random families. Each is a pair: ``draw(key, shape, params, hw)`` returns the
# family's random numbers (shape ``()`` when Siamese, shared by the batch and
# independent of its size, else ``[N]``), and ``apply(x, draws, params)`` is
# the deterministic transform they parameterise.
# ---------------------------------------------------------------------------


def _draw_color(key, shape, params, hw):
  del params, hw
  return tuple(jax.random.uniform(jax.random.fold_in(key, i), shape)
               for i in range(3))


def _color(x, draws, params):
  ub, us, uc = draws
  x = _apply_brightness(x, ub, params.brightness)
  x = _apply_saturation(x, us, params.saturation)
  return _apply_contrast(x, uc, params.contrast)


def _draw_crop(key, shape, params, hw):
  shift_h = int(hw[0] * params.crop + 0.5)
  shift_w = int(hw[1] * params.crop + 0.5)
  dy = jax.random.randint(jax.random.fold_in(key, 0), shape, -shift_h,
                          shift_h + 1)
  dx = jax.random.randint(jax.random.fold_in(key, 1), shape, -shift_w,
                          shift_w + 1)
  return dy, dx


def _crop(x, draws, params):
  del params
  return _map_images(_translate_image, x, draws, jnp.ndim(draws[0]) == 0)


def _cutout_size(hw, params):
  return int(hw[0] * params.cutout + 0.5), int(hw[1] * params.cutout + 0.5)


def _draw_cutout(key, shape, params, hw):
  size_h, size_w = _cutout_size(hw, params)
  # DM's centre range: [0, side] for even squares, [0, side - 1] for odd ones.
  cy = jax.random.randint(jax.random.fold_in(key, 0), shape, 0,
                          hw[0] + (1 - size_h % 2))
  cx = jax.random.randint(jax.random.fold_in(key, 1), shape, 0,
                          hw[1] + (1 - size_w % 2))
  return cy, cx


def _cutout(x, draws, params):
  cy, cx = draws
  h, w = x.shape[1], x.shape[2]
  size_h, size_w = _cutout_size((h, w), params)
  make_mask = functools.partial(_cutout_mask, h, w, size_h=size_h,
                                size_w=size_w, dtype=x.dtype)
  if jnp.ndim(cy) == 0:
    mask = make_mask(cy, cx)[None]
  else:
    mask = jax.vmap(make_mask)(cy, cx)
  return x * mask[..., None]


def _draw_flip(key, shape, params, hw):
  del params, hw
  return jax.random.uniform(key, shape)


def _flip(x, u, params):
  return _apply_flip(x, u < params.flip)


def _draw_scale(key, shape, params, hw):
  del hw
  r = params.scale
  return tuple(jax.random.uniform(jax.random.fold_in(key, i), shape,
                                  minval=1.0 / r, maxval=r) for i in range(2))


def _scale(x, draws, params):
  del params
  sx, sy = draws
  zero = jnp.zeros_like(sx)
  theta = jnp.stack([jnp.stack([sx, zero, zero], -1),
                     jnp.stack([zero, sy, zero], -1)], -2)
  return _map_images(_affine_sample, x, (theta,), jnp.ndim(sx) == 0)


def _rotation_matrix(angle):
  """[..., 2, 3] matrix [[cos, -sin, 0], [sin, cos, 0]] (DM's convention)."""
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  zero = jnp.zeros_like(angle)
  return jnp.stack([jnp.stack([cos, -sin, zero], -1),
                    jnp.stack([sin, cos, zero], -1)], -2)


def _draw_rotate(key, shape, params, hw):
  del params, hw
  return jax.random.uniform(key, shape)


def _rotate(x, u, params):
  angle = (u - 0.5) * 2.0 * params.rotate / 180.0 * jnp.pi
  return _map_images(_affine_sample, x, (_rotation_matrix(angle),),
                     jnp.ndim(u) == 0)


# family -> (draw, apply)
_FAMILY_FNS: Dict[str, Tuple[Callable, Callable]] = {
    "color": (_draw_color, _color),
    "crop": (_draw_crop, _crop),
    "cutout": (_draw_cutout, _cutout),
    "flip": (_draw_flip, _flip),
    "scale": (_draw_scale, _scale),
    "rotate": (_draw_rotate, _rotate),
}


def _split_dsa_key(key):
  """(key choosing the family, key of the transform itself)."""
  return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def _family_index(choice_key, num_families: int):
  """Index of the family a one-family call applies (uniform)."""
  return jax.random.randint(choice_key, (), 0, num_families)


def dsa_draws(key, strategy: str, image_hw: Tuple[int, int],
              params: DSAParams = DSAParams(), *, batch: Optional[int] = None,
              one_family: bool = True) -> Dict[str, object]:
  """Every random number of a ``dsa`` call, drawn from ``key``.

  ``dsa(key, x, ...) == apply_dsa(dsa_draws(key, ..., x.shape[1:3]), x, ...)``
  exactly. Drawing apart from applying lets a program that differentiates
  through the augmentation take the numbers as an input, so it compiles no
  random-number code (``dm.iteration_inputs_fn``).

  Args:
    key: PRNG key.
    strategy, params, one_family: as for ``dsa``.
    image_hw: (height, width) of the images the draws will transform (crop
      and cutout ranges depend on it).
    batch: None for Siamese draws (scalars, any batch size); N for per-image
      draws ``[N]`` (``dsa(..., siamese=False)`` on N images).

  Returns:
    A dict (a pytree of arrays): one entry per family of the strategy, and
    ``"family"``, the index of the family applied, for a one-family call
    with several families. Every family is drawn, whichever is applied, so
    the numbers of a family do not depend on the others.
  """
  families = parse_strategy(strategy)
  shape = () if batch is None else (batch,)
  choice_key, op_key = _split_dsa_key(key)
  draws = {}
  for i, family in enumerate(families):
    family_key = op_key if one_family else jax.random.fold_in(op_key, i)
    draws[family] = _FAMILY_FNS[family][0](family_key, shape, params,
                                           tuple(image_hw))
  if one_family and len(families) > 1:
    draws["family"] = _family_index(choice_key, len(families))
  return draws


def apply_dsa(draws, images, strategy: str = DEFAULT_STRATEGY,
              params: DSAParams = DSAParams(), *, one_family: bool = True):
  """The deterministic half of ``dsa``: transforms ``images`` by ``draws``.

  Args:
    draws: ``dsa_draws`` of the same strategy, params and ``one_family``
      (Siamese draws apply to a batch of any size).
    images: [N, H, W, C] float images.

  Returns:
    [N, H, W, C], differentiable w.r.t. ``images``.
  """
  families = parse_strategy(strategy)

  def run(family, x):
    # Random draws are float32; keep the caller's dtype (and give every
    # lax.switch branch the same output type).
    return _FAMILY_FNS[family][1](x, draws[family], params).astype(x.dtype)

  if not families:
    return images
  if not one_family:
    for family in families:
      images = run(family, images)
    return images
  if len(families) == 1:
    return run(families[0], images)
  branches = [functools.partial(run, f) for f in families]
  return jax.lax.switch(draws["family"], branches, images)


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
  if not parse_strategy(strategy):
    return images
  draws = dsa_draws(key, strategy, images.shape[1:3], params,
                    batch=None if siamese else images.shape[0],
                    one_family=one_family)
  return apply_dsa(draws, images, strategy, params, one_family=one_family)


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


# The tabular transform's strengths (``tabular_augment``'s defaults).
TABULAR_MASK_PROB = 0.1
TABULAR_SCALE_JITTER = 0.1


@functools.partial(jax.jit,
                   static_argnames=("mask_prob", "scale_jitter", "siamese"))
def tabular_augment(key, x, *, mask_prob: float = TABULAR_MASK_PROB,
                    scale_jitter: float = TABULAR_SCALE_JITTER,
                    siamese: bool = True):
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
  return _apply_tabular(x, _tabular_draws(key, shape, scale_jitter),
                        mask_prob)


def _tabular_draws(key, shape, scale_jitter: float = TABULAR_SCALE_JITTER):
  """(u_mask, factor) of ``tabular_augment``, each of ``shape``."""
  u_mask = jax.random.uniform(jax.random.fold_in(key, 0), shape)
  factor = jax.random.uniform(jax.random.fold_in(key, 1), shape,
                              minval=1.0 - scale_jitter,
                              maxval=1.0 + scale_jitter)
  return u_mask, factor


def _apply_tabular(x, draws, mask_prob: float = TABULAR_MASK_PROB):
  u_mask, factor = draws
  keep = (u_mask >= mask_prob).astype(x.dtype)
  return x * (factor * keep).astype(x.dtype)


TABULAR_STRATEGY = "tabular"


def siamese_draws(key, strategy: str, sample_shape: Tuple[int, ...]):
  """The random numbers of ``siamese_augment(key, x, strategy)``.

  ``sample_shape`` is one sample's shape, ``x.shape[1:]``. They do not
  depend on the batch; ``apply_siamese`` applies them to any batch.
  """
  if strategy == TABULAR_STRATEGY:
    return _tabular_draws(key, tuple(sample_shape))
  return dsa_draws(key, strategy, tuple(sample_shape)[:2])


def apply_siamese(draws, x, strategy: str):
  """``siamese_augment`` with its random numbers given (``siamese_draws``)."""
  if strategy == TABULAR_STRATEGY:
    return _apply_tabular(x, draws)
  return apply_dsa(draws, x, strategy)


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
    "siamese_draws",
    "apply_siamese",
    "dsa_draws",
    "apply_dsa",
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

"""Robust aggregation of client statistics into server targets.

The server's target for (iteration t, class c) combines the K clients'
statistics ``x_k`` (``[D]`` means, or means of squares) with weights
``w_k >= 0`` (0 where client k sent nothing for the cell). The plain
weighted mean (``losses.aggregate_class_moments``) lets one client move the
target arbitrarily far. The aggregators here bound a minority's influence:

* ``coordinate_median``: per coordinate, the weighted median. While the
  malicious clients hold less than half the weight, every coordinate lies
  between the smallest and largest honest value of that coordinate.
* ``trimmed_mean``: per coordinate, the weighted mean after removing a
  fraction ``beta`` of the weight from each tail. With malicious weight at
  most ``beta`` of the total, every coordinate lies in the honest range.
* ``geometric_median``: ``argmin_z sum_k w_k ||x_k - z||`` by Weiszfeld's
  iteration. If honest clients, holding a fraction ``1 - a > 1/2`` of the
  weight, lie within ``r`` of a point ``m``, then the geometric median lies
  within ``(1 - a) / sqrt(1 - 2 a) * r`` of ``m`` (Minsker 2015, Lemma 2.1).
* ``clipped_mean``: the weighted mean of the clients' statistics clipped to
  radius ``tau`` around the coordinate-wise median, with ``tau`` the
  ``multiplier`` times the weighted median distance to it. With honest
  weight above 1/2 the result lies within ``tau <= multiplier * R`` of the
  median, ``R`` the largest honest distance to the median.

All are pure and jittable; ``aggregate_cells`` applies one per (t, c).
Weights: ``cell_weights`` (uniform or count weights, counts capped so that a
client claiming a huge class gains no more weight than a typical one).
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from collabdm_jax import losses

AGGREGATORS = ("mean", "median", "trimmed_mean", "geometric_median",
               "clipped_mean")
# Weiszfeld iterations: the iteration converges linearly away from the data
# points; 64 steps leave it far below float32 noise in these dimensions.
_WEISZFELD_STEPS = 64


@dataclasses.dataclass(frozen=True)
class AggregatorConfig:
  """How the server combines client statistics per (t, c).

  Attributes:
    name: one of ``AGGREGATORS``. "mean" is the plain weighted mean
      (``losses.aggregate_class_moments``: the exact pooled mean under count
      weighting), not robust; its count weights are never capped (a cap
      would not bound a client's influence on a mean anyway).
    trim_fraction: beta of ``trimmed_mean``, in [0, 0.5).
    clip_multiplier: ``clipped_mean``'s radius as a multiple of the median
      distance to the coordinate-wise median, > 0.
    weight_cap: robust aggregators cap each count weight at ``weight_cap``
      times the median weight of the clients present in the cell (> 0).
  """
  name: str = "mean"
  trim_fraction: float = 0.2
  clip_multiplier: float = 2.0
  weight_cap: float = 1.0

  def __post_init__(self):
    if self.name not in AGGREGATORS:
      raise ValueError(f"aggregator must be one of {AGGREGATORS}, got "
                       f"{self.name!r}")
    if not 0.0 <= self.trim_fraction < 0.5:
      raise ValueError(f"trim_fraction must be in [0, 0.5), got "
                       f"{self.trim_fraction}")
    if not self.clip_multiplier > 0:
      raise ValueError(f"clip_multiplier must be > 0, got {self.clip_multiplier}")
    if not self.weight_cap > 0:
      raise ValueError(f"weight_cap must be > 0, got {self.weight_cap}")


def _weighted_quantile_index(sorted_w, q, strict):
  """Per column, the first row whose cumulative weight reaches ``q`` * total.

  ``sorted_w`` is ``[K, ...]``; ``strict`` asks for cumulative > q*total.
  """
  cum = jnp.cumsum(sorted_w, axis=0)
  target = q * cum[-1]
  hit = cum > target if strict else cum >= target
  return jnp.argmax(hit, axis=0)


def weighted_median_1d(x, w):
  """Weighted median along axis 0 of ``x [K, ...]`` with weights ``w [K]``.

  The mean of the lower and upper weighted medians: the smallest value
  whose cumulative weight (ascending) reaches half the total, and the
  smallest whose cumulative weight exceeds it (with equal weights, the usual
  median). Zero-weight rows never count. Returns zeros when all weights are 0.
  """
  w = jnp.broadcast_to(w.reshape(w.shape + (1,) * (x.ndim - 1)), x.shape)
  order = jnp.argsort(x, axis=0)
  xs = jnp.take_along_axis(x, order, axis=0)
  ws = jnp.take_along_axis(w, order, axis=0)
  lo = jnp.take_along_axis(xs, _weighted_quantile_index(ws, 0.5, False)[None], 0)[0]
  hi = jnp.take_along_axis(xs, _weighted_quantile_index(ws, 0.5, True)[None], 0)[0]
  med = 0.5 * (lo + hi)
  return jnp.where(jnp.sum(w, axis=0) > 0, med, 0.0)


def coordinate_median(x, w):
  """Coordinate-wise weighted median of ``x [K, D]`` (weights ``w [K]``)."""
  return weighted_median_1d(x, w)


def weighted_mean(x, w):
  """``sum_k w_k x_k / sum_k w_k`` of ``x [K, D]``; zeros if all ``w`` are 0."""
  total = jnp.sum(w)
  return jnp.einsum("k,kd->d", w, x) / jnp.where(total > 0, total, 1.0)


def trimmed_mean(x, w, beta):
  """Coordinate-wise weighted mean without the lowest and highest beta of weight.

  Per coordinate, with the K values sorted ascending and cumulative weights
  ``C_0 = 0 < C_1 <= ... <= C_K = W``, value i keeps the part of its weight
  inside ``[beta W, (1 - beta) W]``:
  ``kept_i = max(0, min(C_i, (1 - beta) W) - max(C_{i-1}, beta W))``,
  and the result is ``sum_i kept_i x_(i) / ((1 - 2 beta) W)``. ``beta = 0``
  is the weighted mean; as beta approaches 1/2 it approaches the median.
  """
  wb = jnp.broadcast_to(w[:, None], x.shape)
  order = jnp.argsort(x, axis=0)
  xs = jnp.take_along_axis(x, order, axis=0)
  ws = jnp.take_along_axis(wb, order, axis=0)
  cum = jnp.cumsum(ws, axis=0)
  total = cum[-1]
  prev = cum - ws
  kept = jnp.maximum(0.0, jnp.minimum(cum, (1 - beta) * total)
                     - jnp.maximum(prev, beta * total))
  kept_total = jnp.sum(kept, axis=0)
  return jnp.sum(kept * xs, axis=0) / jnp.where(kept_total > 0, kept_total, 1.0)


def geometric_median(x, w, steps=_WEISZFELD_STEPS, eps=1e-8):
  """Weighted geometric median of ``x [K, D]`` by Weiszfeld's iteration.

  Minimises ``f(z) = sum_k w_k ||x_k - z||``. Starting from the
  coordinate-wise median, each step is
  ``z <- sum_k (w_k / d_k) x_k / sum_k (w_k / d_k)`` with
  ``d_k = max(||x_k - z||, eps * s)`` (``s`` the data's scale), which never
  increases ``f``; the floor keeps a step defined when z lands on a point.
  """
  z0 = coordinate_median(x, w)
  scale = jnp.max(jnp.abs(x)) + 1e-30

  def step(_, z):
    d = jnp.maximum(jnp.linalg.norm(x - z, axis=-1), eps * scale)
    a = w / d
    total = jnp.sum(a)
    return jnp.where(total > 0, jnp.einsum("k,kd->d", a, x) / total, z)

  return jax.lax.fori_loop(0, steps, step, z0)


def clipped_mean(x, w, multiplier):
  """Weighted mean of ``x [K, D]`` clipped to a ball around the median.

  With ``m`` the coordinate-wise median, ``r_k = ||x_k - m||`` and ``tau``
  ``multiplier`` times the weighted median of the ``r_k``:
  ``m + sum_k w_k min(1, tau / r_k) (x_k - m) / sum_k w_k``.
  """
  m = coordinate_median(x, w)
  r = jnp.linalg.norm(x - m, axis=-1)
  tau = multiplier * weighted_median_1d(r, w)
  scale = jnp.where(r > tau, tau / jnp.where(r > 0, r, 1.0), 1.0)
  return m + weighted_mean(scale[:, None] * (x - m), w)


def capped(w, cap):
  """Weights ``w [K]`` capped at ``cap`` times their median over ``w > 0``."""
  med = weighted_median_1d(w, (w > 0).astype(w.dtype))
  return jnp.minimum(w, cap * med)


def cell_weights(counts, class_counts, weighting):
  """Per-client weights ``[K, ..., C]`` of every (t, c) cell.

  ``"count"``: client k's class size where it sent statistics (counts > 0),
  ``"uniform"``: 1 there; 0 elsewhere. ``counts`` is ``[K, ..., C]``,
  ``class_counts`` ``[K, C]``.
  """
  if weighting not in ("count", "uniform"):
    raise ValueError(f"weighting must be 'count' or 'uniform', got {weighting!r}")
  counts = jnp.asarray(counts)
  present = counts > 0
  if weighting == "uniform":
    return present.astype(jnp.float32)
  cc = jnp.asarray(class_counts)
  cc = cc.reshape(cc.shape[:1] + (1,) * (counts.ndim - cc.ndim) + cc.shape[1:])
  return jnp.where(present, cc, 0).astype(jnp.float32)


def aggregate_cell(x, w, cfg: AggregatorConfig):
  """One cell: ``x [K, D]``, ``w [K]`` -> ``[D]`` with ``cfg``'s aggregator."""
  if cfg.name == "mean":
    return weighted_mean(x, w)
  w = capped(w, cfg.weight_cap)
  if cfg.name == "median":
    return coordinate_median(x, w)
  if cfg.name == "trimmed_mean":
    return trimmed_mean(x, w, cfg.trim_fraction)
  if cfg.name == "geometric_median":
    return geometric_median(x, w)
  return clipped_mean(x, w, cfg.clip_multiplier)


def aggregate_cells(x, w, cfg: AggregatorConfig):
  """``x [K, ..., D]``, ``w [K, ...]`` -> ``[..., D]``, one aggregate per cell."""
  x = jnp.asarray(x, jnp.float32)
  w = jnp.asarray(w, jnp.float32)
  k, cells, d = x.shape[0], x.shape[1:-1], x.shape[-1]
  xf = jnp.moveaxis(x.reshape(k, -1, d), 1, 0)      # [cells, K, D]
  wf = jnp.moveaxis(w.reshape(k, -1), 1, 0)         # [cells, K]
  out = jax.vmap(lambda a, b: aggregate_cell(a, b, cfg))(xf, wf)
  return out.reshape(cells + (d,))


_aggregate_cells_jit = jax.jit(aggregate_cells, static_argnames="cfg")


def robust_class_moments(means, counts, class_counts, second_moments=None,
                         weighting="count", cfg: Optional[AggregatorConfig] = None
                         ) -> losses.ClassMoments:
  """Per-class targets from per-client statistics with ``cfg``'s aggregator.

  Args:
    means: ``[K, ..., C, D]``; counts ``[K, ..., C]``; class_counts
      ``[K, C]``; second_moments optional ``[K, ..., C, D]`` (as in
      ``losses.aggregate_class_moments``).
    weighting: "count" or "uniform" (``cell_weights``).
    cfg: the aggregator; None or name "mean" gives exactly
      ``losses.aggregate_class_moments``.

  Returns:
    ``ClassMoments``: the aggregated mean; the std from the aggregated mean
    of squares, ``sqrt(max(sq - mean**2, 0))`` (zero without second
    moments); valid where any client sent the cell.
  """
  if cfg is None or cfg.name == "mean":
    return losses.aggregate_class_moments(means, counts, class_counts,
                                          second_moments, weighting)
  w = cell_weights(counts, class_counts, weighting)
  present = (w > 0)[..., None]
  mean = _aggregate_cells_jit(jnp.where(present, means, 0.0), w, cfg)
  valid = jnp.any(w > 0, axis=0)
  if second_moments is None:
    std = jnp.zeros_like(mean)
  else:
    sq = _aggregate_cells_jit(jnp.where(present, second_moments, 0.0), w, cfg)
    std = jnp.sqrt(jnp.maximum(sq - jnp.square(mean), 0.0))
  return losses.ClassMoments(mean, std, valid)

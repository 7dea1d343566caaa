"""Distribution-matching losses and the aggregation of client statistics.

This module is the public, stable API for other JAX projects: every function
is pure, jittable, differentiable where it makes sense and works on plain
arrays. Embeddings are ``[N, D]``; an optional ``weights`` vector ``[N]``
(0/1 masks of padded batches, or real weights) says which rows count.

Distribution matching (DM, Zhao & Bilen 2023) compares two sets through the
mean of their embeddings under a random network: the squared distance of the
means is the maximum mean discrepancy with a linear kernel. CollabDM makes
this federated: the real-side mean is assembled at the server from client
statistics (``aggregate_class_moments``), so raw data never leaves a client.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# Keeps sqrt differentiable where a synthetic set has zero spread (one image).
_STD_EPS = 1e-8


def _weighted_mean(x, weights):
  if weights is None:
    return jnp.mean(x, axis=0)
  w = weights.astype(x.dtype)
  return jnp.einsum("n,n...->...", w, x) / jnp.maximum(jnp.sum(w), 1.0)


def embedding_mean(embeddings, weights=None):
  """Mean embedding ``[D]`` of ``embeddings [N, D]`` over rows with weight."""
  return _weighted_mean(embeddings, weights)


def _bessel(var, n, ddof):
  # var * n / (n - ddof): the population variance turned into the estimate
  # with ``ddof`` degrees of freedom removed (n - ddof clamped at 1).
  if not ddof:
    return var
  return var * n / jnp.maximum(n - ddof, 1.0)


def embedding_std(embeddings, weights=None, ddof=0):
  """Per-feature standard deviation ``[D]`` (eps-stabilised).

  ``sqrt(sum_n w_n (x_n - m)**2 / (N - ddof) + eps)`` with ``N = sum_n w_n``
  (the row count without weights): ``ddof=0`` is the population std,
  ``ddof=1`` the unbiased-variance estimate that ``torch.std`` returns by
  default (what the CollabDM/IDM authors' std term uses).
  """
  mean = _weighted_mean(embeddings, weights)
  var = _weighted_mean(jnp.square(embeddings - mean), weights)
  n = (embeddings.shape[0] if weights is None
       else jnp.sum(weights.astype(embeddings.dtype)))
  return jnp.sqrt(_bessel(var, n, ddof) + _STD_EPS)


def std_from_moments(mean, mean_sq, n, ddof=0):
  """Std from a mean, a mean of squares and the count ``n`` they came from.

  ``sqrt(max(mean_sq - mean**2, 0) * n / (n - ddof))``: the same estimate as
  ``embedding_std(x, ddof=ddof)`` (without its eps) from running sums.
  """
  var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
  return jnp.sqrt(_bessel(var, n, ddof))


def mean_embedding_loss(target_mean, embeddings, weights=None):
  """DM's loss: ``sum((target_mean - mean(embeddings))**2)``.

  Args:
    target_mean: ``[D]`` mean embedding of the real data (no gradient needed).
    embeddings: ``[N, D]`` embeddings of the synthetic images.
    weights: optional ``[N]`` row weights (e.g. a padding mask).

  Returns:
    Scalar squared linear-kernel MMD between the two sets.
  """
  return jnp.sum(jnp.square(target_mean - _weighted_mean(embeddings, weights)))


def std_matching_loss(target_std, embeddings, weights=None, ddof=0):
  """IDM's spread term: ``sum((target_std - std(embeddings))**2)``.

  Used with partition-and-expansion (CollabDM-pae) so the synthetic set
  matches the per-feature spread of the real data, not only its mean.
  ``ddof`` as in ``embedding_std`` (1 for the authors' ``torch.std``).
  """
  return jnp.sum(jnp.square(
      target_std - embedding_std(embeddings, weights, ddof)))


class ClassMoments(NamedTuple):
  """Aggregated real-data targets of one or more (iteration, class) cells.

  mean, std: ``[..., C, D]``; valid: ``[..., C]`` bool, False where no
  client contributed (the server skips those classes instead of matching a
  meaningless zero target).
  """
  mean: jax.Array
  std: jax.Array
  valid: jax.Array


class MomentSums(NamedTuple):
  """Weighted sums behind ``ClassMoments``; sums of parts add up.

  mean_sum, sq_sum: ``[..., C, D]`` weighted sums of client means and mean
  squares (sq_sum is None without second moments); weight: ``[..., C]``
  total weight. Sums over disjoint groups of clients (e.g. the clients of
  each process in a multi-host run) add to the sums over all of them.
  """
  mean_sum: jax.Array
  sq_sum: Optional[jax.Array]
  weight: jax.Array


def class_moment_sums(means, counts, class_counts, second_moments=None,
                      weighting="count") -> MomentSums:
  """Weighted sums of per-client statistics (see ``aggregate_class_moments``).

  Returns ``MomentSums``; ``moments_from_sums`` turns them into targets.
  """
  if weighting not in ("count", "uniform"):
    raise ValueError(
        f"weighting must be 'count' or 'uniform', got {weighting!r}")
  return _class_moment_sums(means, counts, class_counts, second_moments,
                            weighting)


# One program for the whole reduction: run op by op, its first call compiled
# every operation as a program of its own (the server aggregates once per run,
# so that compilation was all of its cost).
@functools.partial(jax.jit, static_argnames="weighting")
def _class_moment_sums(means, counts, class_counts, second_moments,
                       weighting):
  counts = jnp.asarray(counts)
  class_counts = jnp.asarray(class_counts)
  extra = counts.ndim - class_counts.ndim  # iteration axes between K and C
  present = counts > 0
  if weighting == "count":
    n = class_counts.reshape(class_counts.shape[:1] + (1,) * extra +
                             class_counts.shape[1:])
    w = jnp.where(present, n, 0).astype(jnp.float32)
  else:
    w = present.astype(jnp.float32)

  def weighted_sum(x):
    x = jnp.where(present[..., None], x, 0.0)  # masked cells may hold junk
    return jnp.einsum("k...c,k...cd->...cd", w, x.astype(jnp.float32))

  sq = None if second_moments is None else weighted_sum(second_moments)
  return MomentSums(weighted_sum(means), sq, jnp.sum(w, axis=0))


@jax.jit
def moments_from_sums(sums: MomentSums) -> ClassMoments:
  """Per-class targets from (possibly summed-up) ``MomentSums``."""
  valid = sums.weight > 0
  denom = jnp.where(valid, sums.weight, 1.0)[..., None]
  mean = sums.mean_sum / denom
  if sums.sq_sum is None:
    std = jnp.zeros_like(mean)
  else:
    var = sums.sq_sum / denom - jnp.square(mean)
    std = jnp.sqrt(jnp.maximum(var, 0.0))
  return ClassMoments(mean, std, valid)


def aggregate_class_moments(means, counts, class_counts, second_moments=None,
                            weighting="count"):
  """Combines per-client statistics into per-class targets.

  Args:
    means: ``[K, ..., C, D]`` each client's mean embedding per class (any
      values where ``counts`` is 0; they are ignored, so no NaN can leak).
    counts: ``[K, ..., C]`` number of samples behind each mean.
    class_counts: ``[K, C]`` each client's local class sizes.
    second_moments: optional ``[K, ..., C, D]`` per-client mean of squared
      embeddings; needed for ``std``, which is zero when omitted.
    weighting: ``"count"`` weights client k's mean by its class size
      n_{k,c}: with full-class statistics this is exactly the mean over the
      pooled data, and with minibatch statistics an unbiased estimate of it.
      ``"uniform"`` is the authors' choice: the plain mean of the means of
      the clients that hold the class (small clients count as much as big).

  Returns:
    ``ClassMoments`` with mean/std ``[..., C, D]`` and valid ``[..., C]``.
  """
  return moments_from_sums(class_moment_sums(
      means, counts, class_counts, second_moments, weighting))


def matching_loss(target_mean, embeddings, weights=None, target_std=None,
                  std_weight=0.0, std_ddof=0):
  """Mean loss plus ``std_weight`` times the std loss (when a target is given).

  ``std_ddof`` is the synthetic side's ``ddof`` (``embedding_std``).
  """
  loss = mean_embedding_loss(target_mean, embeddings, weights)
  if target_std is not None and std_weight:
    loss = loss + std_weight * std_matching_loss(target_std, embeddings,
                                                 weights, ddof=std_ddof)
  return loss

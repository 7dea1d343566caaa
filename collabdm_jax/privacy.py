"""Differential privacy of the client uploads (client-side, per example).

The mechanism. For every server iteration t and class c, a client releases
one noised sum of clipped embeddings

  S~_{t,c} = sum_{i in B_{t,c}} clip_C(psi_t(A_{t,c}(x_i))) + N(0, sigma_c^2 C^2 I_D),

with ``clip_C(v) = v * min(1, C / ||v||_2)``, ``A_{t,c}`` the Siamese
augmentation of (t, c), and ``B_{t,c}`` a Poisson sample of the client's
examples of class c: each is taken independently with probability
``q_c = min(1, b / n_c)`` (b = ``stats.batch_real``, the whole class when
None; n_c the client's class size). Adding or removing one example moves one
class's sum per iteration by a vector of norm at most C, so each release is
the Poisson-subsampled Gaussian mechanism with rate q_c and noise multiplier
sigma_c. Classes are disjoint: an example of class c takes part in exactly
the T releases of its class, and its privacy loss is the T-fold composition
of that mechanism, accounted with dp-accounting's privacy-loss-distribution
(PLD) accountant. ``sigma_c`` is the smallest noise multiplier whose T-fold
composition meets the target (epsilon, delta) (``calibrate_noise``), so every
example of every class gets the target guarantee and large classes (small
q_c) get less noise.

What the message carries. ``means[t, c] = S~_{t,c} / m_c`` and
``counts[t, c] = m_c`` with ``m_c = q_c n_c = min(b, n_c)``, the expected
batch size: an unbiased estimate of the class mean of clipped embeddings
whose denominator does not depend on which examples were drawn (the drawn
batch size itself is never released). Class sizes are public by design:
the message carries them (``class_counts``) for the server's consistency
checks and count weighting, and q_c, m_c and sigma_c are functions of them.
The guarantee is therefore the DP-SGD one, where the dataset size is public:
(epsilon, delta)-DP for adding or removing one example, with the sampling
rates held at the released class sizes. Hiding class sizes too would need a
noised count release and a share of the budget; this module does not do it.

Randomness. Which examples are drawn and the noise come from a client-secret
seed (``keys.dp_client_key``), never from the shared root key: the server
holds the root key and could otherwise replay both and subtract the noise.

Not private, hence off in DP mode: locally distilled images (derived from the
raw images with no noise), second moments (a second release this module
does not noise) and a server initialised from real training images.
"""

import dataclasses
import functools
import math
import secrets
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from collabdm_jax import client as client_lib
from collabdm_jax import dm
from collabdm_jax import keys as keys_lib
from collabdm_jax import models

try:  # an optional extra: `pip install 'collabdm_jax[privacy]'`
  import dp_accounting
  from dp_accounting.pld import pld_privacy_accountant
except ImportError:  # only DP mode needs it; the error says how to get it
  dp_accounting = None

# PLD discretisation of the privacy loss. The accountant's estimate is
# pessimistic (an upper bound on epsilon). Against dp-accounting's default
# 1e-4, 1e-3 moved calibrated multipliers by under 5e-5 (relative) for
# q in {0.05, 0.1, 0.5, 1} and T = 40, and calibrated 5-8x faster.
PLD_DISCRETIZATION = 1e-3
# Tolerance of the search for sigma: the returned multiplier is at most this
# far above the smallest one that meets the target.
SIGMA_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
  """``config.privacy`` of a run with differential privacy on.

  Attributes:
    epsilon: target epsilon per example (over all T releases of its class).
    delta: target delta.
    clip_norm: C, the L2 norm every example's embedding is clipped to.
    seed: the clients' secret seed of sampling and noise; None draws a fresh
      one from the operating system (``secrets``). Fixing it makes runs
      reproducible, and lets anyone who knows it remove the noise.
  """
  epsilon: float
  delta: float
  clip_norm: float
  seed: Optional[int] = None

  def __post_init__(self):
    if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
      raise ValueError(f"privacy.epsilon must be > 0 and finite (None or inf "
                       f"turns privacy off), got {self.epsilon}")
    if not 0 < self.delta < 1:
      raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
    if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
      raise ValueError(f"privacy.clip_norm must be > 0, got {self.clip_norm}")


def settings(config) -> Optional[PrivacySettings]:
  """The run's ``PrivacySettings``, or None when privacy is off.

  Off when ``privacy.epsilon`` is None or infinite. On, the rest of the
  config must allow it: no second moments (std targets), and the server
  may not start from real training images.
  """
  p = config.privacy
  if p.epsilon is None or math.isinf(p.epsilon):
    return None
  out = PrivacySettings(float(p.epsilon), float(p.delta), float(p.clip_norm),
                        None if p.seed is None else int(p.seed))
  if config.stats.second_moments:
    raise ValueError("privacy: stats.second_moments would be a second, "
                     "un-noised release; set it False (no std targets)")
  if config.server.init == "real":
    raise ValueError("privacy: server.init='real' starts the server from the "
                     "clients' raw training images; use 'noise' (or 'local', "
                     "which is 'noise' under privacy)")
  return out


def _require_accounting():
  if dp_accounting is None:
    raise ImportError("differential privacy needs dp-accounting: "
                      "pip install 'collabdm_jax[privacy]'")


# --------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------


def sample_rates(class_counts, batch_real: Optional[int]) -> np.ndarray:
  """Poisson rates ``q_c = min(1, b / n_c)`` ``[C]`` (0 for absent classes).

  ``batch_real`` None embeds the whole class: q_c = 1.
  """
  n = np.asarray(class_counts, np.float64)
  if batch_real is None:
    return (n > 0).astype(np.float64)
  return np.where(n > 0, np.minimum(1.0, batch_real / np.maximum(n, 1)), 0.0)


def expected_batch(class_counts, batch_real: Optional[int]) -> np.ndarray:
  """``m_c = q_c n_c = min(b, n_c)`` ``[C]`` int: the released denominators."""
  n = np.asarray(class_counts, np.int64)
  return n if batch_real is None else np.minimum(n, batch_real)


def _event(sample_rate, noise_multiplier, steps):
  """T-fold composition of the Poisson-subsampled Gaussian mechanism."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
      steps)


def _accountant():
  return pld_privacy_accountant.PLDAccountant(
      value_discretization_interval=PLD_DISCRETIZATION)


def epsilon_spent(sample_rate: float, noise_multiplier: float, steps: int,
                  delta: float) -> float:
  """epsilon at ``delta`` of ``steps`` releases of one example's class.

  Each release is the Gaussian mechanism with ``noise_multiplier`` on a
  Poisson sample of rate ``sample_rate`` (add/remove-one neighbours),
  composed with dp-accounting's PLD accountant.
  """
  _require_accounting()
  return float(_accountant().compose(
      _event(float(sample_rate), float(noise_multiplier), int(steps))
  ).get_epsilon(float(delta)))


@functools.lru_cache(maxsize=4096)
def calibrate_noise(sample_rate: float, steps: int, epsilon: float,
                    delta: float) -> float:
  """Smallest noise multiplier sigma with ``epsilon_spent(q, sigma, T) <= epsilon``.

  A root search over sigma with the accountant (dp-accounting's
  ``calibrate_dp_mechanism``, Brent's method, within ``SIGMA_TOLERANCE``);
  its answer is guaranteed to meet the target. Cached: the server recomputes
  every client's multipliers from the class sizes in their messages.
  """
  _require_accounting()
  if not 0 < sample_rate <= 1:
    raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
  try:
    sigma = dp_accounting.calibrate_dp_mechanism(
        _accountant, lambda s: _event(sample_rate, s, steps), epsilon, delta,
        tol=SIGMA_TOLERANCE)
  except (ValueError, dp_accounting.mechanism_calibration
          .NoBracketIntervalFoundError) as e:
    raise ValueError(
        f"cannot calibrate the noise for epsilon={epsilon}, delta={delta}, "
        f"q={sample_rate}, T={steps}: {e}") from e
  return float(sigma)


def noise_multipliers(class_counts, batch_real, steps, s: PrivacySettings
                      ) -> np.ndarray:
  """sigma_c per class ``[C]`` (0 where the client has no example)."""
  q = sample_rates(class_counts, batch_real)
  return np.asarray([calibrate_noise(float(qc), int(steps), s.epsilon, s.delta)
                     if qc > 0 else 0.0 for qc in q])


def accounting_report(class_counts: Dict[int, Sequence[int]],
                      batch_real: Optional[int], steps: int,
                      s: PrivacySettings) -> Dict:
  """What results.json records of the guarantee, per client and class.

  ``epsilon`` is the largest epsilon any example of any of these clients
  spends (recomputed by the accountant at the calibrated multipliers, so at
  most the target).
  """
  clients, spent = {}, []
  for k, n in sorted(class_counts.items()):
    q = sample_rates(n, batch_real)
    sigma = noise_multipliers(n, batch_real, steps, s)
    # None where the client holds no example of the class (no release).
    eps = [epsilon_spent(qc, sc, steps, s.delta) if qc > 0 else None
           for qc, sc in zip(q, sigma)]
    spent += [e for e in eps if e is not None]
    clients[str(k)] = {
        "sample_rates": q.tolist(),
        "noise_multipliers": [float(x) if e is not None else None
                              for x, e in zip(sigma, eps)],
        "epsilons": eps}
  return {
      "epsilon": max(spent, default=0.0),
      "target_epsilon": s.epsilon,
      "delta": s.delta,
      "clip_norm": s.clip_norm,
      "releases_per_example": int(steps),
      "accountant": (f"dp-accounting {_version()} PLD, Poisson-subsampled "
                     "Gaussian, add/remove one example, class sizes public"),
      "secret_seed_fixed": s.seed is not None,
      "local_images": False,
      "server_init": "noise",
      "clients": clients,
  }


def _version():
  try:
    from importlib import metadata
    return metadata.version("dp-accounting")
  except Exception:  # metadata of an odd install: the report still stands
    return "?"


# --------------------------------------------------------------------------
# The mechanism (pure, jittable pieces)
# --------------------------------------------------------------------------


def clip_rows(v, clip_norm):
  """``v_i * min(1, C / ||v_i||)`` for every row: every row's norm <= C."""
  norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
  return v * jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))


def poisson_mask(key, t, labels, rates):
  """Which examples iteration ``t`` draws: ``u_i < q_{y_i}``, ``[n]`` bool.

  ``u_i`` is uniform from ``key`` folded with t and the example's index, so
  every example is drawn independently with its class's rate.
  """
  k_t = jax.random.fold_in(key, t)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(k_t, i)))(
      jnp.arange(labels.shape[0]))
  return u < rates[labels]


def gaussian_noise(key, t, num_classes, dim, scale):
  """``N(0, scale_c^2 I_D)`` per class ``[C, D]`` for iteration ``t``."""
  k_t = jax.random.fold_in(key, t)
  z = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(k_t, c),
                                           (dim,)))(jnp.arange(num_classes))
  return z * scale[:, None]


def secret_seed(s: PrivacySettings) -> int:
  """The configured seed, or a fresh 63-bit secret from the OS."""
  return s.seed if s.seed is not None else secrets.randbits(63)


@functools.lru_cache(maxsize=8)
def _clipped_sums_fn(spec: client_lib.StatsSpec, clip_norm: float,
                     t_chunk: int, embed_batch: int):
  """Jitted ``(root, t0, x [Tc, B, ...], cls [Tc, B]) -> sums [Tc, C, D]``.

  Per iteration: psi_t and the Siamese augmentations, then the drawn examples
  (``cls`` their class, -1 on padding, which comes last) are augmented,
  embedded ``embed_batch`` at a time, clipped and summed per class. The
  loop stops after the last drawn example, so padding costs nothing.
  """
  embed = models.embed_fn(spec.model, spec.compute_dtype)
  C, eb = spec.num_classes, embed_batch
  D = models.feature_dim(spec.model, spec.input_shape)

  def per_t(root, t, x, cls):
    params = dm.network_params(spec.model, root, t, spec.input_shape)
    class_draws = dm.class_aug_draws(root, t, C, spec.dsa_strategy,
                                     spec.input_shape)

    def chunk(i, sums):
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * eb, eb)
      c = sl(cls)
      xs = client_lib.augment_per_slot(class_draws, sl(x), c,
                                       spec.dsa_strategy)
      emb = clip_rows(embed(params, xs).astype(jnp.float32), clip_norm)
      return sums + jax.nn.one_hot(c, C, dtype=emb.dtype).T @ emb

    used = jnp.sum(cls >= 0)
    return jax.lax.fori_loop(0, (used + eb - 1) // eb, chunk,
                             jnp.zeros((C, D), jnp.float32))

  def fn(root, t0, x, cls):
    return jax.lax.map(lambda a: per_t(root, t0 + a[0], a[1], a[2]),
                       (jnp.arange(t_chunk), x, cls))

  return jax.jit(fn)


_poisson_masks = jax.jit(jax.vmap(poisson_mask, in_axes=(None, 0, None, None)))
_noise = jax.jit(gaussian_noise, static_argnums=(2, 3))


def private_client_stats(root, client_x, client_y, client_ids,
                         spec: client_lib.StatsSpec, num_iterations: int,
                         s: PrivacySettings, seed: int, t_chunk: int = 8,
                         clipped_only: bool = False
                         ) -> client_lib.ClientStats:
  """The clients' differentially private statistics (see the module doc).

  Args:
    root: the shared root key (psi_t and the augmentations).
    client_x, client_y, client_ids: the clients' data and global ids.
    spec: the run's statistics spec (``batch_real`` sets the rates; second
      moments are not supported).
    num_iterations: T.
    s: the privacy settings.
    seed: the clients' secret seed (``secret_seed``): sampling and noise.
    t_chunk: iterations per device call.
    clipped_only: skip the noise (tests: the clipped sums alone).

  Returns:
    ``ClientStats`` with noised means ``[K, T, C, D]``, counts ``m_c``
    repeated over t, the class sizes and no second moments.
  """
  if spec.second_moments:
    raise ValueError("private statistics carry no second moments")
  T, C = num_iterations, spec.num_classes
  D = models.feature_dim(spec.model, spec.input_shape)
  K = len(client_x)
  class_counts = np.stack([np.bincount(np.asarray(y, np.int64), minlength=C)
                           for y in client_y]).astype(np.int32) if K else (
                               np.zeros((0, C), np.int32))
  # Who is drawn at every t, for every client, first: then one padded shape
  # (the largest draw) serves every call, and one program compiles.
  draws = []
  for k, y in zip(client_ids, client_y):
    key = keys_lib.dp_sample_key(keys_lib.dp_client_key(seed, k))
    rates = jnp.asarray(sample_rates(class_counts[len(draws)],
                                     spec.batch_real), jnp.float32)
    draws.append(np.asarray(_poisson_masks(key, jnp.arange(T),
                                           jnp.asarray(y, jnp.int32), rates)))
  eb = spec.embed_batch
  most = max([int(d.sum(1).max()) for d in draws] + [1])
  B = -(-most // eb) * eb
  t_chunk = max(1, min(t_chunk, T))
  fn = _clipped_sums_fn(spec, float(s.clip_norm), t_chunk, eb)
  means = np.zeros((K, T, C, D), np.float32)
  counts = np.zeros((K, T, C), np.int32)
  for i, (k, x, y) in enumerate(zip(client_ids, client_x, client_y)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    n = class_counts[i]
    m = expected_batch(n, spec.batch_real)
    sigma = noise_multipliers(n, spec.batch_real, T, s)
    sums = np.zeros((T, C, D), np.float32)
    for t0 in range(0, T, t_chunk):
      xb = np.zeros((t_chunk, B) + x.shape[1:], np.float32)
      cb = np.full((t_chunk, B), -1, np.int32)
      for j, t in enumerate(range(t0, min(t0 + t_chunk, T))):
        idx = np.flatnonzero(draws[i][t])
        xb[j, :idx.size], cb[j, :idx.size] = x[idx], y[idx]
      out = np.asarray(fn(root, jnp.int32(t0), jnp.asarray(xb),
                          jnp.asarray(cb)))
      sums[t0:t0 + t_chunk] = out[:T - t0]
    if not clipped_only:
      noise_key = keys_lib.dp_noise_key(keys_lib.dp_client_key(seed, k))
      scale = jnp.asarray(sigma * s.clip_norm, jnp.float32)
      sums += np.stack([np.asarray(_noise(noise_key, t, C, D, scale))
                        for t in range(T)])
    held = m > 0
    means[i][:, held] = sums[:, held] / m[held][None, :, None]
    counts[i] = m[None, :]
  return client_lib.ClientStats(means, counts, class_counts, None)


# --------------------------------------------------------------------------
# What the server can check of a noised mean
# --------------------------------------------------------------------------

# Probability that an honest client's message fails the range check.
FALSE_REJECTION = 1e-9


def noised_mean_range(lo, hi, class_counts, batch_real, steps, dim,
                      s: PrivacySettings) -> Tuple[np.ndarray, np.ndarray]:
  """Range ``[T or 1, C, D]`` an honest client's noised means lie in.

  A clipped embedding is the embedding scaled towards 0, so its entries lie
  in ``[min(lo, 0), max(hi, 0)]`` with ``(lo, hi)`` psi_t's range. The sum
  over a draw of at most ``n_max`` examples (a binomial quantile) divided by
  ``m_c``, plus ``z`` standard deviations ``sigma_c C / m_c`` of noise, with
  both tails split so that an honest message (all ``T C D`` entries) fails
  with probability at most ``FALSE_REJECTION``. Depends only on public
  quantities (the class sizes the message carries and the config).
  """
  n = np.asarray(class_counts, np.int64)
  C = n.shape[0]
  q = sample_rates(n, batch_real)
  m = np.maximum(expected_batch(n, batch_real), 1).astype(np.float64)
  sigma = noise_multipliers(n, batch_real, steps, s)
  tail = FALSE_REJECTION / 2
  n_max = np.where(q > 0, scipy_stats.binom.isf(tail / (steps * C), n, q), 0)
  z = scipy_stats.norm.isf(tail / (2 * steps * C * dim))
  spread = (z * sigma * s.clip_norm / m)[None, :, None]
  factor = (n_max / m)[None, :, None]
  lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
  return (np.minimum(lo, 0.0) * factor - spread,
          np.maximum(hi, 0.0) * factor + spread)

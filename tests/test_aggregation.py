"""Robust aggregation (collabdm_jax.aggregation) against malicious clients.

K = 7 clients, f in {1, 2, 3} < K/2 of them malicious; the targets must
stay within each aggregator's stated bound of the honest clients'
statistics, while the plain mean is moved far away (so the tests can fail).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import aggregation
from collabdm_jax import attacks
from collabdm_jax import losses
from collabdm_jax import server
from collabdm_jax.aggregation import AggregatorConfig
from collabdm_jax.protocol import ClientMessage

K, T, C, D = 7, 2, 3, 16


def _honest(key, k):
  """Client k's honest statistics: class means near a shared centre."""
  kc, kn = jax.random.split(jax.random.fold_in(key, k))
  centre = jnp.abs(jax.random.normal(jax.random.key(0), (T, C, D))) + 1.0
  means = np.asarray(centre + 0.1 * jax.random.normal(kn, (T, C, D)), np.float32)
  # Class sizes 36..40: under count weighting, 3 malicious clients capped at
  # the median weight hold at most 3*40 / (3*40 + 3*36 + 40) < 0.45 of it.
  cc = np.asarray(jax.random.randint(kc, (C,), 36, 41), np.int32)
  counts = np.tile(np.minimum(cc, 16), (T, 1)).astype(np.int32)
  return ClientMessage(client_id=k, root_key_fingerprint="f", config_hash="h",
                       means=means, counts=counts, class_counts=cc,
                       second_moments=np.square(means) + 0.01)


def _clients(attack, f, weighting):
  key = jax.random.key(42)
  msgs = [_honest(key, k) for k in range(K)]
  honest = msgs[f:]
  for k in range(f):
    msgs[k] = attacks.attack(
        attack, jax.random.fold_in(key, 100 + k), msgs[k], honest,
        factor=-1e4, std=100.0,
        claim_class_size=10**6 if weighting == "count" else None,
        batch_real=16)
  return msgs, honest


def _targets(msgs, weighting, cfg):
  return np.asarray(server.aggregate_messages(msgs, weighting,
                                              aggregator=cfg).mean)


ROBUST = ["median", "trimmed_mean", "geometric_median", "clipped_mean"]
ATTACKS = ["scaled", "sign_flip", "noise", "copy"]


@pytest.mark.parametrize("weighting", ["uniform", "count"])
@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("f", [1, 2, 3])
@pytest.mark.parametrize("name", ROBUST)
def test_robust_targets_stay_within_bound_of_honest(name, f, attack, weighting):
  msgs, honest = _clients(attack, f, weighting)
  # Trim at least the malicious share of the (capped) weight.
  cfg = AggregatorConfig(name=name, trim_fraction=0.45, clip_multiplier=2.0,
                         weight_cap=1.0)
  got = _targets(msgs, weighting, cfg)                    # [T, C, D]
  h = np.stack([m.means for m in honest])                 # [K-f, T, C, D]
  lo, hi, centre = h.min(0), h.max(0), h.mean(0)
  # The malicious share a of the (capped) weight in each cell: the bounds
  # below hold while a < 1/2 (a <= beta for the trimmed mean).
  w = np.stack([np.broadcast_to(m.class_counts, (T, C)) for m in msgs]).astype(float)
  if weighting == "uniform":
    w = np.ones_like(w)
  w = np.minimum(w, np.median(w, axis=0))
  a = w[:f].sum(0) / w.sum(0)
  assert (a <= cfg.trim_fraction).all()
  if name in ("median", "trimmed_mean"):
    # Coordinate-wise: inside the honest clients' range, coordinate by coordinate.
    assert (got >= lo - 1e-5).all() and (got <= hi + 1e-5).all()
  elif name == "geometric_median":
    # Minsker 2015, Lemma 2.1: honest weight 1 - a > 1/2 within r of centre.
    r = np.linalg.norm(h - centre, axis=-1).max(0)
    bound = (1 - a) / np.sqrt(1 - 2 * a) * r
    assert (np.linalg.norm(got - centre, axis=-1) <= bound * 1.001 + 1e-5).all()
  else:
    # The median m lies in the honest box (diameter diam), every honest
    # client within diam of it, so tau <= multiplier * diam and the result
    # lies within tau of m: within (multiplier + 1) * diam of the centre.
    diam = np.linalg.norm(hi - lo, axis=-1)
    assert (np.linalg.norm(got - centre, axis=-1)
            <= (cfg.clip_multiplier + 1) * diam + 1e-5).all()


@pytest.mark.parametrize("weighting", ["uniform", "count"])
@pytest.mark.parametrize("attack", ["scaled", "sign_flip", "noise"])
def test_the_plain_mean_is_moved_far(attack, weighting):
  """The same attacks break the mean: the bounds above are not vacuous."""
  msgs, honest = _clients(attack, 3, weighting)
  got = _targets(msgs, weighting, AggregatorConfig(name="mean"))
  h = np.stack([m.means for m in honest])
  diam = np.linalg.norm(h.max(0) - h.min(0), axis=-1)
  assert (np.linalg.norm(got - h.mean(0), axis=-1) > 3.0 * diam).all()


def test_mean_aggregator_is_todays_weighted_mean():
  msgs, _ = _clients("scaled", 0, "count")
  stats = server.messages_to_stats(msgs)
  for weighting in ("count", "uniform"):
    want = losses.aggregate_class_moments(*stats, weighting=weighting)
    got = server.aggregate_messages(msgs, weighting, with_std=True,
                                    aggregator=AggregatorConfig("mean"))
    for a, b in zip(want, got):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_coordinate_median_and_trimmed_mean_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 5)).astype(np.float32)
  ones = jnp.ones(9)
  np.testing.assert_allclose(aggregation.coordinate_median(x, ones),
                             np.median(x, 0), rtol=1e-6)
  np.testing.assert_allclose(aggregation.coordinate_median(x[:8], ones[:8]),
                             np.median(x[:8], 0), rtol=1e-6)
  # beta = 2/9 of equal weights drops exactly the 2 lowest and 2 highest.
  s = np.sort(x, 0)
  np.testing.assert_allclose(aggregation.trimmed_mean(x, ones, 2 / 9),
                             s[2:7].mean(0), rtol=1e-5)
  np.testing.assert_allclose(aggregation.trimmed_mean(x, ones, 0.0),
                             x.mean(0), rtol=1e-5)
  # Integer weights act as repeated rows; zero weights as absent rows.
  w = np.array([3, 1, 0, 2, 1, 1, 0, 2, 1], np.float32)
  rep = np.repeat(x, w.astype(int), axis=0)
  np.testing.assert_allclose(aggregation.coordinate_median(x, w),
                             np.median(rep, 0), rtol=1e-6)
  np.testing.assert_allclose(aggregation.trimmed_mean(x, w, 3 / 11),
                             np.sort(rep, 0)[3:8].mean(0), rtol=1e-5)


def test_geometric_median_minimises_the_sum_of_distances():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  w = jnp.asarray(rng.uniform(0.5, 2.0, size=8), jnp.float32)
  z = aggregation.geometric_median(x, w)
  cost = lambda p: float(jnp.sum(w * jnp.linalg.norm(x - p, axis=-1)))
  for d in rng.normal(size=(50, 4)) * 1e-2:
    assert cost(z) <= cost(z + d) + 1e-6
  # The optimality condition: the weighted unit vectors sum to ~0.
  u = (x - z) / jnp.linalg.norm(x - z, axis=-1, keepdims=True)
  assert float(jnp.linalg.norm(jnp.einsum("k,kd->d", w, u))) < 1e-3 * float(w.sum())


def test_clipped_mean_without_outliers_is_near_the_mean_and_jits():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(10, 3)) * 0.01 + 5.0, jnp.float32)
  w = jnp.ones(10)
  got = jax.jit(aggregation.clipped_mean)(x, w, 100.0)  # radius never binds
  np.testing.assert_allclose(got, x.mean(0), rtol=1e-5)


def test_weight_cap_and_empty_cells():
  w = jnp.array([10.0, 20.0, 30.0, 1e6, 0.0])
  np.testing.assert_allclose(aggregation.capped(w, 1.0), [10, 20, 25, 25, 0])
  x = jnp.zeros((3, 2, 4))
  msgs_w = jnp.zeros((3, 2))
  for name in ROBUST:
    out = aggregation.aggregate_cells(x, msgs_w, AggregatorConfig(name=name))
    assert out.shape == (2, 4) and np.isfinite(np.asarray(out)).all()


def test_robust_std_targets_and_validity():
  msgs, _ = _clients("scaled", 0, "count")
  # Client 0 does not hold class 1: its zeros must not drag the median.
  m0 = msgs[0]
  counts = m0.counts.copy()
  counts[:, 1] = 0
  means = m0.means.copy()
  means[:, 1] = 0
  sq = m0.second_moments.copy()
  sq[:, 1] = 0
  msgs[0] = dataclasses.replace(m0, counts=counts, means=means, second_moments=sq)
  got = server.aggregate_messages(msgs, "uniform", with_std=True,
                                  aggregator=AggregatorConfig("median"))
  h = np.stack([m.means[:, 1] for m in msgs[1:]])
  np.testing.assert_allclose(np.asarray(got.mean)[:, 1], np.median(h, 0), rtol=1e-6)
  assert np.asarray(got.valid).all()
  # sq = mean**2 + 0.01 for every client, so std is about 0.1.
  assert np.allclose(np.asarray(got.std), 0.1, atol=0.05)


def test_bad_aggregator_settings_are_rejected():
  with pytest.raises(ValueError, match="aggregator must be one of"):
    AggregatorConfig(name="krum")
  with pytest.raises(ValueError, match="trim_fraction"):
    AggregatorConfig(name="trimmed_mean", trim_fraction=0.5)
  with pytest.raises(ValueError, match="weight_cap"):
    AggregatorConfig(weight_cap=0.0)


def test_label_swap_moves_statistics_between_classes():
  m = _honest(jax.random.key(3), 0)
  m = dataclasses.replace(m, local_images=np.zeros((2, 1, 1, 1), np.float32),
                          local_labels=np.array([0, 2], np.int32))
  s = attacks.label_swap(m, [2, 0, 1])
  np.testing.assert_array_equal(s.means[:, 2], m.means[:, 0])
  np.testing.assert_array_equal(s.class_counts[[2, 0, 1]], m.class_counts)
  np.testing.assert_array_equal(s.local_labels, [2, 1])
  with pytest.raises(ValueError, match="permutation"):
    attacks.label_swap(m, [0, 0, 1])

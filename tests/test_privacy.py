"""Differential privacy of the uploads (collabdm_jax/privacy.py).

The accountant's epsilon, the per-example clipping, the Poisson sampling and
the noise scale on their own and through the client pass; a DP run end to
end (simulation, and client files read by a server that checks them); and
privacy off leaving every message exactly as it was.
"""

import dataclasses
import json
import math

import dp_accounting
from dp_accounting import rdp
from dp_accounting.pld import pld_privacy_accountant
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import client as client_lib
from collabdm_jax import keys as keys_lib
from collabdm_jax import pipeline
from collabdm_jax import privacy
from collabdm_jax import protocol
from collabdm_jax import setup as setup_lib
from collabdm_jax import stages
from collabdm_jax import wire
from experiments.configs import smoke


def _settings(**kw):
  fields = dict(epsilon=4.0, delta=1e-5, clip_norm=1.0, seed=0)
  fields.update(kw)
  return privacy.PrivacySettings(**fields)


def _dp_epsilon(q, sigma, steps, delta, discretization=1e-3):
  """epsilon straight from dp-accounting, built here, not by privacy.py."""
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)), steps)
  acc = pld_privacy_accountant.PLDAccountant(
      value_discretization_interval=discretization)
  return acc.compose(event).get_epsilon(delta)


# --------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------


def test_reported_epsilon_equals_dp_accounting_for_a_known_setting():
  # Two clients; b = 32, T = 50; class sizes below, at and above b.
  counts = {0: [0, 10, 32, 64], 1: [400, 0, 0, 1000]}
  s = _settings(epsilon=2.0, delta=1e-6)
  report = privacy.accounting_report(counts, 32, 50, s)
  assert report["target_epsilon"] == 2.0 and report["delta"] == 1e-6
  assert report["releases_per_example"] == 50
  worst = 0.0
  for k, n in counts.items():
    rec = report["clients"][str(k)]
    for c, nc in enumerate(n):
      if nc == 0:  # no example, no release
        assert rec["epsilons"][c] is None
        assert rec["noise_multipliers"][c] is None
        assert rec["sample_rates"][c] == 0
        continue
      q = rec["sample_rates"][c]
      assert q == pytest.approx(min(1.0, 32 / nc), rel=1e-12)
      sigma = rec["noise_multipliers"][c]
      eps = _dp_epsilon(q, sigma, 50, 1e-6)
      assert rec["epsilons"][c] == pytest.approx(eps, rel=1e-9)
      # The calibration meets the target, tightly: a multiplier 1% smaller
      # would overspend.
      assert eps <= 2.0
      assert _dp_epsilon(q, sigma * 0.99, 50, 1e-6) > 2.0
      worst = max(worst, eps)
  assert report["epsilon"] == pytest.approx(worst, rel=1e-12)
  # Rates of 1 (classes no larger than b) need the most noise.
  rec = report["clients"]["0"]
  assert rec["noise_multipliers"][1] == rec["noise_multipliers"][2]
  assert rec["noise_multipliers"][2] > rec["noise_multipliers"][3]
  assert (report["clients"]["1"]["noise_multipliers"][0]
          > report["clients"]["1"]["noise_multipliers"][3])


def test_pld_epsilon_is_no_looser_than_rdp_and_known_gaussian():
  # RDP is the looser accountant of the two; with q = 1 and one step the
  # mechanism is the plain Gaussian, whose exact epsilon dp-accounting has.
  q, sigma, steps, delta = 0.05, 1.1, 200, 1e-5
  pld_eps = privacy.epsilon_spent(q, sigma, steps, delta)
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma)), steps)
  rdp_eps = rdp.RdpAccountant().compose(event).get_epsilon(delta)
  assert pld_eps <= rdp_eps
  assert pld_eps > 0.7 * rdp_eps
  exact = dp_accounting.get_epsilon_gaussian(3.0, 1e-5)
  assert privacy.epsilon_spent(1.0, 3.0, 1, 1e-5) == pytest.approx(
      exact, rel=2e-3)


def test_settings_off_on_and_refusals():
  cfg = smoke.get_config()
  assert privacy.settings(cfg) is None
  cfg.privacy.epsilon = math.inf
  assert privacy.settings(cfg) is None
  cfg.privacy.epsilon = 4.0
  assert privacy.settings(cfg).epsilon == 4.0
  with pytest.raises(ValueError, match="delta"):
    _settings(delta=0.0)
  with pytest.raises(ValueError, match="clip_norm"):
    _settings(clip_norm=-1.0)
  with pytest.raises(ValueError, match="epsilon"):
    _settings(epsilon=0.0)
  bad = smoke.get_config()
  bad.privacy.epsilon = 4.0
  bad.stats.second_moments = True
  with pytest.raises(ValueError, match="second_moments"):
    setup_lib.setup(bad)
  bad = smoke.get_config()
  bad.privacy.epsilon = 4.0
  bad.server.init = "real"
  with pytest.raises(ValueError, match="init='real'"):
    setup_lib.setup(bad)


# --------------------------------------------------------------------------
# The mechanism
# --------------------------------------------------------------------------


def test_clip_rows_bounds_every_row_and_keeps_short_ones():
  v = jax.random.normal(jax.random.key(0), (500, 64)) * jnp.linspace(
      0.01, 3.0, 500)[:, None]
  out = np.asarray(privacy.clip_rows(v, 5.0))
  norms = np.linalg.norm(out, axis=1)
  before = np.linalg.norm(np.asarray(v), axis=1)
  assert (norms <= 5.0 * (1 + 1e-6)).all()
  short = before < 5.0
  assert short.any() and (~short).any()
  np.testing.assert_allclose(out[short], np.asarray(v)[short], rtol=1e-6)
  np.testing.assert_allclose(norms[~short], 5.0, rtol=1e-5)
  # Clipping scales, never turns.
  cos = (out * np.asarray(v)).sum(1) / (norms * before)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
  assert (np.asarray(privacy.clip_rows(jnp.zeros((2, 3)), 1.0)) == 0).all()


def test_poisson_mask_draws_each_example_at_its_class_rate():
  y = jnp.asarray(np.repeat(np.arange(3), [200, 50, 10]), jnp.int32)
  rates = jnp.asarray([0.1, 0.5, 1.0])
  masks = np.stack([np.asarray(privacy.poisson_mask(jax.random.key(1), t, y,
                                                    rates))
                    for t in range(400)])
  y = np.asarray(y)
  for c, q in enumerate([0.1, 0.5, 1.0]):
    per_example = masks[:, y == c].mean(0)
    n = masks[:, y == c].size
    overall = masks[:, y == c].mean()
    # Binomial: within 5 standard deviations of q overall, and every example
    # near q (independent draws, not one fixed subset).
    assert abs(overall - q) <= 5 * math.sqrt(q * (1 - q) / n) + 1e-12
    assert abs(per_example - q).max() <= 5 * math.sqrt(q * (1 - q) / 400) + 1e-12
  # The batch size varies (Poisson, not a fixed-size draw).
  sizes = masks[:, y == 0].sum(1)
  assert sizes.std() > 2


def test_gaussian_noise_has_the_requested_scale():
  scale = jnp.asarray([0.5, 2.0, 0.0])
  z = np.stack([np.asarray(privacy.gaussian_noise(jax.random.key(7), t, 3,
                                                  4096, scale))
                for t in range(8)])  # [T, C, D]
  for c, sd in enumerate([0.5, 2.0]):
    x = z[:, c].ravel()
    n = x.size
    # sample std within 5 standard errors (~sd / sqrt(2n)); mean near 0.
    assert abs(x.std() - sd) < 5 * sd / math.sqrt(2 * n)
    assert abs(x.mean()) < 5 * sd / math.sqrt(n)
  assert (z[:, 2] == 0).all()
  # Fresh noise per iteration and class.
  assert not np.allclose(z[0, 0] / 0.5, z[1, 0] / 0.5)
  assert not np.allclose(z[0, 0] / 0.5, z[0, 1] / 2.0)


def _tiny():
  cfg = smoke.get_config()
  s = setup_lib.setup(cfg)
  ids = [0, 1]
  xs = [s.train_x[s.partition.client_indices[k]] for k in ids]
  ys = [s.dataset.train_y[s.partition.client_indices[k]] for k in ids]
  return s, ids, xs, ys


def test_unclipped_full_draw_equals_the_protocols_class_means():
  # q = 1 (batch_real None) and a clip norm no embedding reaches: the private
  # pass without noise must embed exactly what the ordinary pass embeds.
  s, ids, xs, ys = _tiny()
  spec = dataclasses.replace(s.stats_spec, batch_real=None)
  ref = client_lib.client_stats(s.root, xs, ys, ids, spec, 3)
  dp = privacy.private_client_stats(s.root, xs, ys, ids, spec, 3,
                                    _settings(clip_norm=1e9), seed=0,
                                    clipped_only=True)
  np.testing.assert_array_equal(dp.class_counts, ref.class_counts)
  np.testing.assert_array_equal(dp.counts, ref.counts)
  np.testing.assert_allclose(dp.means, ref.means, rtol=1e-4, atol=1e-5)
  assert dp.second_moments is None


def test_every_example_contributes_at_most_the_clip_norm():
  # One example per class: each released (noise-free) sum is that example's
  # clipped embedding, or zero when the draw skipped it.
  s, _, xs, ys = _tiny()
  x, y = xs[0], ys[0]
  first = np.asarray([np.flatnonzero(y == c)[0] for c in np.unique(y)])
  x1, y1 = x[first], y[first]
  C = s.dataset.num_classes
  spec = dataclasses.replace(s.stats_spec, batch_real=None)
  big = privacy.private_client_stats(s.root, [x1], [y1], [0], spec, 3,
                                     _settings(clip_norm=1e9), seed=0,
                                     clipped_only=True)
  raw = np.linalg.norm(big.means[0][:, y1], axis=-1)  # [T, classes held]
  clip = float(np.median(raw)) / 2  # clips every example here
  out = privacy.private_client_stats(s.root, [x1], [y1], [0], spec, 3,
                                     _settings(clip_norm=clip), seed=0,
                                     clipped_only=True)
  sums = out.means[0] * out.counts[0][..., None]
  norms = np.linalg.norm(sums, axis=-1)
  assert (norms <= clip * (1 + 1e-5)).all()
  held = np.zeros(C, bool)
  held[y1] = True
  np.testing.assert_allclose(norms[:, held], np.minimum(raw, clip), rtol=1e-4)
  # Many examples per class, Poisson-drawn at rate b / n: a sum of k clipped
  # embeddings has norm at most k C.
  spec = s.stats_spec  # batch_real = 8
  out = privacy.private_client_stats(s.root, [x], [y], [0], spec, 3,
                                     _settings(clip_norm=clip), seed=0,
                                     clipped_only=True)
  n = out.class_counts[0]
  m = np.minimum(n, 8)
  np.testing.assert_array_equal(out.counts[0], np.tile(m, (3, 1)))
  sums = out.means[0] * m[None, :, None]
  key = keys_lib.dp_sample_key(keys_lib.dp_client_key(0, 0))
  rates = jnp.asarray(privacy.sample_rates(n, 8), jnp.float32)
  for t in range(3):
    drawn = np.bincount(y[np.asarray(privacy.poisson_mask(
        key, t, jnp.asarray(y), rates))], minlength=C)
    assert (np.linalg.norm(sums[t], axis=-1) <= drawn * clip * (1 + 1e-5)).all()


def test_released_noise_follows_sigma():
  # Noised minus noise-free sums, over sigma_c C: standard normal entries.
  s, ids, xs, ys = _tiny()
  st = _settings(epsilon=1.0, clip_norm=3.0)
  clean = privacy.private_client_stats(s.root, xs, ys, ids, s.stats_spec, 3,
                                       st, seed=5, clipped_only=True)
  noised = privacy.private_client_stats(s.root, xs, ys, ids, s.stats_spec, 3,
                                        st, seed=5)
  zs = []
  for i in range(len(ids)):
    n = clean.class_counts[i]
    m = privacy.expected_batch(n, 8)
    sigma = privacy.noise_multipliers(n, 8, 3, st)
    for c in np.flatnonzero(n):
      noise = (noised.means[i, :, c] - clean.means[i, :, c]) * m[c]
      zs.append(noise.ravel() / (sigma[c] * 3.0))
    # Absent classes: nothing released.
    assert (noised.means[i][:, n == 0] == 0).all()
  z = np.concatenate(zs)
  assert abs(z.std() - 1) < 5 / math.sqrt(2 * z.size) + 1e-3
  assert abs(z.mean()) < 5 / math.sqrt(z.size)
  # Another secret seed, other noise (and other draws).
  other = privacy.private_client_stats(s.root, xs, ys, ids, s.stats_spec, 3,
                                       st, seed=6)
  assert not np.allclose(other.means, noised.means)


# --------------------------------------------------------------------------
# Through the pipeline
# --------------------------------------------------------------------------


def test_privacy_off_leaves_every_message_unchanged():
  # epsilon None and inf go through the non-private path; the config hash
  # does not mention privacy, so the bytes are those of today's messages.
  cfg = smoke.get_config()
  s = setup_lib.setup(cfg)
  off = [protocol.encode_message(m) for m in stages.client_messages(s, [0, 1])]
  cfg_inf = smoke.get_config()
  cfg_inf.privacy.epsilon = math.inf
  cfg_inf.privacy.clip_norm = 3.0
  s_inf = setup_lib.setup(cfg_inf)
  inf = [protocol.encode_message(m)
         for m in stages.client_messages(s_inf, [0, 1])]
  assert off == inf
  assert "privacy" not in setup_lib.protocol_fields(cfg)
  # The statistics are the ordinary pass's, local images included. That
  # pass ran client 0 beside client 1; alone, its program has other shapes,
  # and XLA may then round the augmentation's arithmetic differently (a few
  # float32 ulps).
  ref = client_lib.client_stats(s.root, [s.train_x[s.partition.client_indices[0]]],
                                [s.dataset.train_y[s.partition.client_indices[0]]],
                                [0], s.stats_spec, cfg.num_iterations)
  m0 = protocol.decode_message(off[0])
  np.testing.assert_allclose(m0.means, ref.means[0], rtol=1e-5, atol=1e-6)
  assert m0.local_images is not None


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
  cfg = smoke.get_config()
  cfg.privacy.epsilon = 4.0
  cfg.privacy.seed = 3
  cfg.eval.num_nets = 1
  cfg.eval.epochs = 1
  cfg.checkpoint.every = 0
  work = tmp_path_factory.mktemp("dp")
  return cfg, work, pipeline.run(cfg, str(work))


@pytest.mark.slow
def test_dp_run_reports_epsilon_and_uploads_no_local_images(dp_run):
  cfg, work, results = dp_run
  saved = json.loads((work / "results.json").read_text())
  rep = saved["privacy"]
  assert rep["target_epsilon"] == 4.0 and rep["epsilon"] <= 4.0
  assert rep["server_init"] == "noise" and rep["local_images"] is False
  s = setup_lib.setup(cfg)
  for k, n in enumerate(s.partition.counts):
    rec = rep["clients"][str(k)]
    for c in np.flatnonzero(n):
      eps = _dp_epsilon(rec["sample_rates"][c], rec["noise_multipliers"][c],
                        cfg.num_iterations, cfg.privacy.delta)
      assert rec["epsilons"][c] == pytest.approx(eps, rel=1e-9)
  assert rep["epsilon"] == max(e for r in rep["clients"].values()
                               for e in r["epsilons"] if e is not None)
  assert 0 <= saved["accuracy_mean"] <= 1
  msgs = stages.client_messages(s, [0, 1, 2])
  assert all(m.local_images is None for m in msgs)
  assert "privacy" in setup_lib.protocol_fields(cfg)


@pytest.mark.slow
def test_server_accepts_private_files_and_still_rejects_forged_ones(dp_run,
                                                                    tmp_path):
  cfg, _, sim = dp_run
  msg_dir = tmp_path / "msgs"
  for k in range(cfg.partition.num_clients):
    pipeline.run_client(cfg, k, msg_dir)
  # Client 2's means blown up 1000x: outside any honest noised range.
  path = wire.message_path(msg_dir, 2)
  m = protocol.load_message(path)
  protocol.save_message(path, dataclasses.replace(m, means=m.means * 1000))
  res = pipeline.run_server(cfg, msg_dir, tmp_path / "server")
  assert res["clients_used"] == [0, 1]
  assert "outside" in res["clients_rejected"]["2"]
  assert res["privacy"]["epsilon"] <= 4.0
  assert res["privacy"]["clients"]["0"] == sim["privacy"]["clients"]["0"]


def test_noised_range_holds_honest_means():
  # Many honest noised releases of a setting with heavy noise all fall in
  # the range the server derives from the class sizes alone.
  s, ids, xs, ys = _tiny()
  st = _settings(epsilon=1.0, clip_norm=3.0)
  out = privacy.private_client_stats(s.root, xs, ys, ids, s.stats_spec, 3,
                                     st, seed=11)
  D = out.means.shape[-1]
  box = setup_lib.embedding_range(s)  # psi_t's range, [T, 1, D]
  for i in range(len(ids)):
    lo, hi = privacy.noised_mean_range(box[0], box[1], out.class_counts[i],
                                       8, 3, D, st)
    assert (out.means[i] >= lo).all() and (out.means[i] <= hi).all()
    # Not vacuous: the range is far tighter than what a forger could send.
    assert np.abs(hi).max() < 1e3

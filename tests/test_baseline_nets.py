"""The model baselines' networks: BatchNorm as PyTorch has it, the Net
wrapper, DeepInversion's prior, and FedAvg's per-client validation split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax.baselines import fedavg
from collabdm_jax.baselines import nets


def bn_apply(x, train, weights=None, stats=None):
  """A lone ``nets.BatchNorm`` on ``x``: (output, new running stats)."""
  bn = nets.BatchNorm()
  v = bn.init(jax.random.key(0), x, False)
  if stats is not None:
    v = {"params": v["params"], "batch_stats": stats}
  out, upd = bn.apply(v, x, train, weights, mutable=["batch_stats"])
  return np.asarray(out), jax.tree.map(np.asarray, upd["batch_stats"])


def test_batchnorm_matches_pytorch_semantics():
  rng = np.random.default_rng(0)
  x = (3.0 + 2.0 * rng.standard_normal((6, 5, 4, 3))).astype(np.float32)
  out, stats = bn_apply(jnp.asarray(x), True)
  mean = x.mean((0, 1, 2))
  var = x.var((0, 1, 2))  # biased, for normalising
  np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5),
                             rtol=1e-4, atol=1e-4)
  m = 6 * 5 * 4
  # Running statistics: momentum 0.1 from mean 0 / var 1, unbiased variance.
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var * m / (m - 1),
                             rtol=1e-5)
  # Inference normalises by the running statistics, whatever the batch.
  run = {"mean": jnp.full((3,), 2.0), "var": jnp.full((3,), 4.0)}
  out, kept = bn_apply(jnp.asarray(x), False, stats=run)
  np.testing.assert_allclose(out, (x - 2.0) / np.sqrt(4.0 + 1e-5), rtol=1e-5)
  np.testing.assert_allclose(kept["mean"], 2.0)


def test_batchnorm_leaves_zero_weight_samples_out():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((7, 4, 4, 2)).astype(np.float32)
  padded = np.concatenate([x, 100 + rng.standard_normal((3, 4, 4, 2))]
                          ).astype(np.float32)
  w = np.array([1] * 7 + [0] * 3, np.float32)
  short, s_stats = bn_apply(jnp.asarray(x), True)
  long, l_stats = bn_apply(jnp.asarray(padded), True, jnp.asarray(w))
  np.testing.assert_allclose(long[:7], short, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(l_stats[k], s_stats[k], rtol=1e-5)


def test_net_wrapper_and_deep_inversion_prior():
  net = nets.make_net("convnet", 10, {"width": 8, "depth": 2}, "batchnorm")
  assert net.has_batchnorm
  assert (net.module.width, net.module.depth) == (8, 2)
  x = jax.random.normal(jax.random.key(1), (12, 28, 28, 1))
  v = net.init(jax.random.key(2), (28, 28, 1))
  params, state = net.split(v)
  assert set(state) == {"norm0", "norm1"}
  logits, new = net.train_logits(v, x)
  assert logits.shape == (12, 10)
  # Training mode moved the running statistics, inference leaves them.
  assert np.abs(np.asarray(new["batch_stats"]["norm0"]["mean"])).max() > 0
  chex_equal = jax.tree.map(np.array_equal, net.split(new)[0], params)
  assert all(jax.tree.leaves(chex_equal))
  # The prior is zero when the running statistics are the batch's moments
  # of every layer's input, and the L2 norms of the gaps otherwise.
  _, moments = net.logits_and_moments(v, x)
  gap = float(nets.deep_inversion_loss(moments))
  want = sum(np.linalg.norm(np.asarray(rv) - np.asarray(var))
             + np.linalg.norm(np.asarray(rm) - np.asarray(m))
             for m, var, rm, rv in moments)
  assert gap == pytest.approx(want, rel=1e-5) and gap > 0
  matched = {f"norm{d}": {"mean": moments[d][0], "var": moments[d][1]}
             for d in range(2)}
  # Layer 0's input does not depend on the running statistics, so matching
  # it zeroes its term; layer 1's input changes with layer 0's statistics,
  # so match them one layer at a time.
  v0 = net.merge(params, dict(state, norm0=matched["norm0"]))
  _, m0 = net.logits_and_moments(v0, x)
  v1 = net.merge(params, {"norm0": matched["norm0"],
                          "norm1": {"mean": m0[1][0], "var": m0[1][1]}})
  _, m1 = net.logits_and_moments(v1, x)
  assert float(nets.deep_inversion_loss(m1)) < 1e-4 * gap
  # The evaluation network itself has no statistics to match.
  plain = nets.make_net("convnet", 10, {"width": 8, "depth": 2})
  assert not plain.has_batchnorm
  pv = plain.init(jax.random.key(2), (28, 28, 1))
  assert plain.split(pv) == (pv, {})
  with pytest.raises(ValueError, match="BatchNorm"):
    plain.logits_and_moments(pv, x)
  with pytest.raises(ValueError, match="net_norm"):
    nets.make_net("convnet", 10, {}, "groupnorm")
  with pytest.raises(ValueError, match="convnet"):
    nets.make_net("mlp", 10, {}, "batchnorm")


# --------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------


def test_validation_counts_are_stratified_and_keep_a_training_sample():
  counts = np.array([100, 40, 7, 1, 0, 2])
  out = fedavg.validation_counts(counts, 0.15)
  assert out.sum() == 23  # 0.15 * 150 = 22.5, rounded half up
  assert (out <= np.maximum(counts - 1, 0)).all()
  np.testing.assert_array_equal(out[[0, 1]], [15, 6])
  assert out[3] == 0 and out[4] == 0
  # Nothing to hold out from a client of one sample per class.
  assert fedavg.validation_counts(np.ones(10, int), 0.5).sum() == 0


def test_validation_split_is_disjoint_stratified_and_keyed():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 203)
  key = jax.random.key(7)
  tr, va = fedavg.validation_split(key, labels, 0.2, 5)
  assert len(np.intersect1d(tr, va)) == 0
  np.testing.assert_array_equal(np.union1d(tr, va), np.arange(203))
  np.testing.assert_array_equal(
      np.bincount(labels[va], minlength=5),
      fedavg.validation_counts(np.bincount(labels, minlength=5), 0.2))
  again = fedavg.validation_split(key, labels, 0.2, 5)
  np.testing.assert_array_equal(again[1], va)
  other = fedavg.validation_split(jax.random.key(8), labels, 0.2, 5)
  assert not np.array_equal(other[1], va)


def test_choose_prefers_accuracy_then_loss_then_fewer_epochs():
  curves = [[(3, 0.5, 1.0), (6, 0.8, 0.9), (9, 0.8, 0.7)],
            [(3, 0.8, 0.7), (6, 0.6, 0.5)]]
  got = fedavg.choose(curves, (0.01, 0.1))
  assert got == {"lr": 0.1, "epochs": 3, "val_accuracy": 0.8,
                 "val_loss": 0.7}
  with pytest.raises(ValueError, match="no validation"):
    fedavg.choose([[], []], (0.01, 0.1))


def test_fast_kernels_give_the_same_logits_and_gradients():
  """``Net.fast_kernels`` (fast_convnet's kernels, the CPU default of the
  baselines) computes the ConvNet's function: logits, parameter gradients
  and input gradients (DENSE's generator learns through the teachers)
  match the models' network to float rounding; other networks ignore it."""
  plain = nets.make_net("convnet", 10, {"width": 8, "depth": 2})
  fast = nets.make_net("convnet", 10, {"width": 8, "depth": 2},
                       fast_kernels=True)
  assert fast.fast_kernels and not plain.fast_kernels
  v = plain.init(jax.random.key(4), (28, 28, 1))
  x = jax.random.normal(jax.random.key(5), (6, 28, 28, 1))
  y = jnp.arange(6) % 10

  def loss(net, v, x):
    logits, _ = net.train_logits(v, x)
    return jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(6), y])

  np.testing.assert_allclose(fast.logits(v, x), plain.logits(v, x),
                             rtol=1e-4, atol=1e-4)
  gp, gx = jax.grad(loss, argnums=(1, 2))(plain, v, x)
  fp, fx = jax.grad(loss, argnums=(1, 2))(fast, v, x)
  assert float(jnp.max(jnp.abs(gx))) > 1e-3  # a real gradient to compare
  np.testing.assert_allclose(fx, gx, rtol=1e-3, atol=1e-5)
  for name in ("conv0", "conv1", "classifier"):
    np.testing.assert_allclose(fp[name]["kernel"], gp[name]["kernel"],
                               rtol=1e-3, atol=1e-5)
  # The convolution biases drop out of instance norm: fast_convnet gives
  # them an exact zero gradient, the models' network float noise.
  assert float(jnp.max(jnp.abs(gp["conv1"]["bias"]))) < 1e-5
  bn = nets.make_net("convnet", 10, {"width": 8, "depth": 2}, "batchnorm",
                     fast_kernels=True)
  assert not bn.fast_kernels  # BatchNorm: the models' kernels

"""Tests of the evaluation protocol (collabdm_jax.evaluate)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collabdm_jax import augment
from collabdm_jax import evaluate as ev
from collabdm_jax import fast_convnet
from collabdm_jax import models
from collabdm_jax.data import images

NUM_BLOBS = 4
# Small MLP on tables without augmentation: compiles in seconds on CPU.
MLP_CFG = ev.EvalConfig(
    arch="mlp", num_nets=3, epochs=20, batch_size=64, dsa_strategy="none",
    model_kwargs=(("width", 32), ("depth", 1)))


def _blobs(seed, n, dim=8, sep=3.0):
  """NUM_BLOBS Gaussian blobs with well separated centres (fixed by seed 0)."""
  centres = np.random.default_rng(0).normal(size=(NUM_BLOBS, dim))
  centres *= sep / np.linalg.norm(centres, axis=1, keepdims=True)
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NUM_BLOBS, n).astype(np.int32)
  x = centres[y] + 0.5 * rng.normal(size=(n, dim))
  return x.astype(np.float32), y


# 300 training rows with batch 64: four full batches and a ragged one of 44.
TRAIN_X, TRAIN_Y = _blobs(1, 300)
TEST_X, TEST_Y = _blobs(2, 400)


def _call(config=MLP_CFG, x=TRAIN_X, y=TRAIN_Y, tx=TEST_X, ty=TEST_Y,
          num_classes=NUM_BLOBS, key=None):
  key = jax.random.key(0) if key is None else key
  return ev.evaluate_synthetic(key, x, y, tx, ty, num_classes=num_classes,
                               config=config)


@pytest.fixture(scope="module")
def trained():
  return ev.evaluate_synthetic(jax.random.key(0), TRAIN_X, TRAIN_Y, TEST_X,
                               TEST_Y, num_classes=NUM_BLOBS, config=MLP_CFG)


@pytest.fixture(scope="module")
def untrained():
  return ev.evaluate_synthetic(
      jax.random.key(0), TRAIN_X, TRAIN_Y, TEST_X, TEST_Y,
      num_classes=NUM_BLOBS, config=dataclasses.replace(MLP_CFG, epochs=0))


def test_training_reaches_high_accuracy_untrained_is_chance(trained,
                                                            untrained):
  assert trained.accuracies.shape == (3,)
  assert np.all(trained.accuracies > 0.9)
  assert np.all(trained.train_loss < 0.3)
  assert trained.per_class_recall.shape == (3, NUM_BLOBS)
  assert np.all(trained.per_class_recall > 0.8)
  # Untrained nets: near chance (1/4) and no training loss to report.
  assert abs(untrained.mean - 1.0 / NUM_BLOBS) < 0.2
  assert np.all(np.isnan(untrained.train_loss))
  assert trained.predictions.shape == (3, len(TEST_Y))
  assert trained.predictions.dtype == np.int32
  np.testing.assert_allclose(trained.accuracies,
                             np.mean(trained.predictions == TEST_Y, axis=1))


def test_deterministic_per_key_and_different_across_nets(trained, untrained):
  again = ev.evaluate_synthetic(jax.random.key(0), TRAIN_X, TRAIN_Y, TEST_X,
                                TEST_Y, num_classes=NUM_BLOBS, config=MLP_CFG)
  np.testing.assert_array_equal(again.predictions, trained.predictions)
  np.testing.assert_array_equal(again.train_loss, trained.train_loss)
  # Each net has its own initialisation and shuffles.
  assert len(set(trained.train_loss.tolist())) == 3
  preds = untrained.predictions
  assert not np.array_equal(preds[0], preds[1])
  assert not np.array_equal(preds[1], preds[2])
  other = ev.evaluate_synthetic(jax.random.key(1), TRAIN_X, TRAIN_Y, TEST_X,
                                TEST_Y, num_classes=NUM_BLOBS, config=MLP_CFG)
  assert not np.array_equal(other.train_loss, trained.train_loss)


def test_net_i_depends_only_on_fold_in_key_i(trained):
  # Net i is keyed by fold_in(key, i): a run with fewer nets reproduces the
  # first nets of a larger run.
  two = ev.evaluate_synthetic(
      jax.random.key(0), TRAIN_X, TRAIN_Y, TEST_X, TEST_Y,
      num_classes=NUM_BLOBS, config=dataclasses.replace(MLP_CFG, num_nets=2))
  np.testing.assert_allclose(two.train_loss, trained.train_loss[:2],
                             rtol=1e-5)
  np.testing.assert_array_equal(two.predictions, trained.predictions[:2])


def test_mean_and_population_std(untrained):
  acc = untrained.accuracies
  assert len(set(acc.tolist())) > 1  # Otherwise ddof would not matter.
  assert untrained.mean == pytest.approx(np.mean(acc))
  assert untrained.std == pytest.approx(np.std(acc, ddof=0))
  assert untrained.std != pytest.approx(np.std(acc, ddof=1))
  d = untrained.as_dict()
  assert d["num_nets"] == 3 and d["std"] == pytest.approx(untrained.std)
  assert d["accuracies"] == pytest.approx(acc.tolist())
  assert "predictions" not in d


def _cache_sizes(programs):
  return tuple(fn._cache_size() for fn in programs)


def test_no_recompile_for_equal_shapes(trained):
  programs = ev.compiled_programs(
      "mlp", NUM_BLOBS, MLP_CFG.model_kwargs, "", MLP_CFG.batch_size,
      MLP_CFG.epochs, MLP_CFG.test_batch_size, ev.default_micro_batch())
  for loop in ("fused", "per_net"):
    cfg = dataclasses.replace(MLP_CFG, loop=loop)
    _call(cfg)
    sizes = _cache_sizes(programs)
    # New key and hyper-parameters, same shapes: nothing recompiles.
    _call(dataclasses.replace(cfg, lr=0.05, momentum=0.5, weight_decay=0.0),
          key=jax.random.key(7))
    assert _cache_sizes(programs) == sizes


def test_vmapped_nets_train_exactly_as_each_net_alone(trained):
  # The default on CPU trains the nets one after another (what ``trained``
  # used); all nets vmapped into one program must give each net the same
  # training, and a net trained alone with its key the same again.
  fused = _call(dataclasses.replace(MLP_CFG, loop="fused"))
  per_net = _call(dataclasses.replace(MLP_CFG, loop="per_net"))
  np.testing.assert_allclose(fused.train_loss_per_epoch,
                             per_net.train_loss_per_epoch, rtol=1e-4)
  np.testing.assert_array_equal(fused.predictions, per_net.predictions)
  np.testing.assert_array_equal(per_net.predictions, trained.predictions)
  net_keys = [jax.random.fold_in(jax.random.key(0), i) for i in range(3)]
  for i, k in enumerate(net_keys):
    # Net i trained alone from its own key.
    alone = ev.compiled_programs(
        "mlp", NUM_BLOBS, MLP_CFG.model_kwargs, "", MLP_CFG.batch_size,
        MLP_CFG.epochs, MLP_CFG.test_batch_size, ev.default_micro_batch())
    _, losses = alone.train_net(k, jnp.asarray(TRAIN_X), jnp.asarray(TRAIN_Y),
                                np.float32(MLP_CFG.lr),
                                np.float32(MLP_CFG.momentum),
                                np.float32(MLP_CFG.weight_decay))
    np.testing.assert_allclose(np.asarray(losses),
                               fused.train_loss_per_epoch[i], rtol=1e-4)
  assert fused.train_loss_per_epoch.shape == (3, MLP_CFG.epochs)
  # Losses fall over training and the last epoch is train_loss.
  assert np.all(fused.train_loss_per_epoch[:, -1]
                < fused.train_loss_per_epoch[:, 0])
  np.testing.assert_array_equal(fused.train_loss,
                                fused.train_loss_per_epoch[:, -1])


def test_learning_rate_schedule_drops_at_half():
  lrs = np.asarray(ev.learning_rate_at(jnp.arange(10), 10, 0.01))
  np.testing.assert_allclose(lrs[:5], 0.01)
  np.testing.assert_allclose(lrs[5:], 0.001, rtol=1e-6)
  odd = np.asarray(ev.learning_rate_at(jnp.arange(7), 7, 1.0))
  np.testing.assert_allclose(odd, [1, 1, 1, .1, .1, .1, .1], rtol=1e-6)


@pytest.mark.parametrize("n,batch,steps,width", [(10, 4, 3, 4),
                                                  (300, 64, 5, 64),
                                                  (3, 256, 1, 3),
                                                  (8, 8, 1, 8)])
def test_epoch_batches_cover_every_sample_once(n, batch, steps, width):
  idx, mask = ev.epoch_batches(jax.random.key(3), n, batch)
  idx, mask = np.asarray(idx), np.asarray(mask)
  assert idx.shape == mask.shape == (steps, width)
  assert mask.sum() == n
  np.testing.assert_array_equal(np.bincount(idx[mask], minlength=n),
                                np.ones(n))
  # Only the tail of the last batch is padding.
  assert mask[:-1].all()
  assert np.all((idx >= 0) & (idx < n))


def test_epoch_batches_shuffle_depends_on_key():
  a, _ = ev.epoch_batches(jax.random.key(0), 50, 16)
  b, _ = ev.epoch_batches(jax.random.key(1), 50, 16)
  assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_prepare_training_set_pae_gives_four_times():
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  y = np.array([0, 1, 2, 0, 1, 2], np.int32)
  x4, y4 = ev.prepare_training_set(x, y, pae=True)
  assert x4.shape == (24, 8, 8, 3) and y4.shape == (24,)
  np.testing.assert_array_equal(np.bincount(np.asarray(y4)),
                                4 * np.bincount(y))
  x1, y1 = ev.prepare_training_set(x, y, pae=False)
  assert x1.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y1), y)


def _pattern_images(seed, per_class, size=16):
  """3 classes of low-frequency oriented patterns (horizontal stripes,
  vertical stripes, checker; period 8 px) that survive flips, small
  crops/rotations and 2x down/up-sampling."""
  rr, cc = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  rows, cols = np.cos(rr * np.pi / 4), np.cos(cc * np.pi / 4)
  patterns = [rows, cols, 1.5 * rows * cols]
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(3), per_class).astype(np.int32)
  x = np.stack([patterns[k] for k in y])[..., None] * np.ones(3)
  x = x + 0.3 * rng.normal(size=x.shape)
  return x.astype(np.float32), y


# Small ConvNet with the default DSA strategy, trained on 2x2 mosaics with
# PAE (as CollabDM-pae stores its sets): 8 pattern images per class packed
# into 2 mosaics per class, which PAE unpacks again (24 training images).
def test_micro_batched_gradient_gives_the_same_loss_and_gradients():
  # CPU steps compute gradients in pieces; per-sample norms make that a
  # change of summation order only. 20 samples in pieces of 8: the last
  # piece is padded with zero weights.
  model = models.make_model("convnet", 3, width=8, depth=2)
  params = models.init_params(model, jax.random.key(0), (12, 12, 3))
  x = jax.random.normal(jax.random.key(1), (20, 12, 12, 3))
  y = jnp.arange(20) % 3
  w = (jnp.arange(20) < 17).astype(jnp.float32)
  apply = models.logits_fn(model)

  def loss_sum(p, xb, yb, wb):
    return jnp.sum(wb * optax.softmax_cross_entropy_with_integer_labels(
        apply(p, xb), yb))

  whole = jax.value_and_grad(loss_sum)(params, x, y, w)
  for micro in (None, 8, 20, 64):
    pieces = jax.jit(lambda p, m=micro: ev.weighted_loss_and_grad(
        loss_sum, p, x, y, w, m))(params)
    np.testing.assert_allclose(pieces[0], whole[0], rtol=1e-5)
    # A convolution bias before instance norm has exactly zero gradient
    # (the norm removes it); both sides hold only rounding noise there.
    got, want = dict(pieces[1]), dict(whole[1])
    scale = max(float(jnp.max(jnp.abs(l))) for l in jax.tree.leaves(want))
    for name in [n for n in want if n.startswith("conv")]:
      for g in (got[name]["bias"], want[name]["bias"]):
        assert float(jnp.max(jnp.abs(g))) < 1e-5 * scale
      got[name] = dict(got[name], bias=0.0)
      want[name] = dict(want[name], bias=0.0)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
  # Masked samples contribute nothing.
  cut = jax.value_and_grad(loss_sum)(params, x[:17], y[:17], w[:17])
  np.testing.assert_allclose(whole[0], cut[0], rtol=1e-5)


CONV_CFG = ev.EvalConfig(arch="convnet", num_nets=2, epochs=60, pae=True,
                         model_kwargs=(("width", 8), ("depth", 2)))


@pytest.fixture(scope="module")
def pattern_data():
  images, labels = _pattern_images(0, 8)
  train_x = np.asarray(augment.mosaic_init(jnp.asarray(images)))
  test_x, test_y = _pattern_images(1, 30)
  return train_x, labels[::4], test_x, test_y


def test_convnet_with_dsa_and_pae_learns_images(pattern_data):
  assert CONV_CFG.dsa_strategy == augment.DEFAULT_STRATEGY
  result = ev.evaluate_synthetic(jax.random.key(0), *pattern_data,
                                 num_classes=3, config=CONV_CFG)
  assert result.accuracies.shape == (2,)
  assert result.mean > 0.9, result.as_dict()
  assert np.all(np.isfinite(result.train_loss))


@pytest.mark.slow  # the fused loop vmaps convolutions: slow on CPU
def test_fused_and_per_net_loops_agree_with_dsa_and_pae(pattern_data):
  # Same shapes as above, so only the fused program is a new compilation.
  runs = [ev.evaluate_synthetic(
      jax.random.key(5), *pattern_data, num_classes=3,
      config=dataclasses.replace(CONV_CFG, epochs=4, loop=loop))
          for loop in ("fused", "per_net")]
  np.testing.assert_allclose(runs[0].train_loss_per_epoch,
                             runs[1].train_loss_per_epoch, rtol=1e-4)
  np.testing.assert_array_equal(runs[0].predictions, runs[1].predictions)
  assert runs[0].train_loss[0] != runs[0].train_loss[1]


def test_classification_metrics_hand_example():
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
  preds = np.array([0, 0, 1, 2, 1, 0, 2, 2])
  m = ev.classification_metrics(preds, labels, 3, benign_class=0)
  assert m["accuracy"] == pytest.approx(5 / 8)
  np.testing.assert_allclose(m["per_class_recall"], [0.5, 0.5, 1.0])
  assert m["balanced_accuracy"] == pytest.approx(2 / 3)
  # Benign samples 0..3: two of four flagged as attacks.
  assert m["false_positive_rate"] == pytest.approx(0.5)
  np.testing.assert_array_equal(m["confusion_matrix"],
                                [[2, 1, 1], [1, 1, 0], [0, 0, 2]])
  # A class absent from the labels has no recall and is left out of the
  # balanced accuracy.
  m4 = ev.classification_metrics(preds, labels, 4)
  assert np.isnan(m4["per_class_recall"][3])
  assert m4["balanced_accuracy"] == pytest.approx(2 / 3)
  assert "false_positive_rate" not in m4
  # Stacked predictions of several nets give per-net metrics.
  perfect = labels.copy()
  ms = ev.classification_metrics(np.stack([preds, perfect]), labels, 3,
                                 benign_class=0)
  np.testing.assert_allclose(ms["accuracy"], [5 / 8, 1.0])
  np.testing.assert_allclose(ms["balanced_accuracy"], [2 / 3, 1.0])
  np.testing.assert_allclose(ms["false_positive_rate"], [0.5, 0.0])
  assert ms["per_class_recall"].shape == (2, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(config=dataclasses.replace(MLP_CFG, num_nets=0)), "num_nets"),
    (dict(config=dataclasses.replace(MLP_CFG, epochs=-1)), "epochs"),
    (dict(config=dataclasses.replace(MLP_CFG, batch_size=0)), "batch_size"),
    (dict(config=dataclasses.replace(MLP_CFG, lr=0.0)), "lr"),
    (dict(config=dataclasses.replace(MLP_CFG, momentum=1.0)), "momentum"),
    (dict(config=dataclasses.replace(MLP_CFG, loop="gpu")), "loop"),
    (dict(config=dataclasses.replace(MLP_CFG, arch="lenet")), "arch"),
    (dict(config=dataclasses.replace(MLP_CFG, dsa_strategy="blur")), "blur"),
    (dict(config=dataclasses.replace(MLP_CFG, dsa_strategy="flip")),
     "dsa_strategy"),
    (dict(config=dataclasses.replace(MLP_CFG, pae=True)), "pae"),
    (dict(y=TRAIN_Y[:-1]), "train_y"),
    (dict(ty=TEST_Y[:10]), "test_y"),
    (dict(y=np.where(TRAIN_Y == 0, NUM_BLOBS, TRAIN_Y)), "train_y"),
    (dict(ty=TEST_Y - 1), "test_y"),
    (dict(tx=TEST_X[:, :4]), "test_x"),
    (dict(x=np.full_like(TRAIN_X, np.nan)), "train_x"),
    (dict(num_classes=1), "num_classes"),
    (dict(key=3), "key"),
    (dict(key=jax.random.split(jax.random.key(0), 2)), "key"),
])
def test_bad_input_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _call(**kwargs)


def test_classification_metrics_bad_input():
  labels = np.array([0, 1, 2])
  with pytest.raises(ValueError, match="labels"):
    ev.classification_metrics(np.array([0, 1]), labels, 3)
  with pytest.raises(ValueError, match="predictions"):
    ev.classification_metrics(np.array([0, 1, 3]), labels, 3)
  with pytest.raises(ValueError, match="labels"):
    ev.classification_metrics(np.array([0, 1, 2]), np.array([0, 1, 5]), 3)
  with pytest.raises(ValueError, match="benign_class"):
    ev.classification_metrics(np.array([0, 1, 2]), labels, 3, benign_class=3)


def test_epoch_batches_bad_input():
  with pytest.raises(ValueError, match="batch_size"):
    ev.epoch_batches(jax.random.key(0), 10, 0)
  with pytest.raises(ValueError, match="num_examples"):
    ev.epoch_batches(jax.random.key(0), 0, 4)


@pytest.fixture(scope="module")
def fashion_ipc10():
  """10 real Fashion-MNIST training images per class, and 1,000 test images."""
  data = images.load_dataset("fashion_mnist_embedded")
  pick = images.class_balanced_indices(data.train_y, 10)
  return (data.train_x[pick], data.train_y[pick].astype(np.int32),
          data.test_x, data.test_y.astype(np.int32))


def test_fast_convnet_trains_each_net_as_the_model_kernels(fashion_ipc10):
  # On CPU, ConvNets train and predict with fast_convnet's kernels; each
  # network must follow the training it gets with the models' own kernels
  # (same key: same init, shuffles and DSA draws), float rounding aside.
  # Real images, DM's protocol at a smaller width and epoch count.
  # Rounding differences grow as training goes on: after these 10 epochs
  # the models' own alternative first block (fused_first_block, the same
  # network) moved losses by up to 2e-5 and a parameter by 2e-3 of its
  # layer's largest value for these keys, the fast kernels by 4e-5 / 2e-3.
  train_x, train_y, test_x, test_y = fashion_ipc10
  kwargs = (("width", 32), ("depth", 3))
  epochs = 10
  model = models.make_model("convnet", 10, **dict(kwargs))
  assert fast_convnet.supports(model, train_x.shape[1:])
  runs = {}
  for use_fast in (False, True):
    programs = ev.compiled_programs(
        "convnet", 10, kwargs, augment.DEFAULT_STRATEGY, 256, epochs, 500,
        ev.MICRO_BATCH_CPU, use_fast)
    params, losses = programs.train_net(
        jax.random.key(1), jnp.asarray(train_x), jnp.asarray(train_y),
        np.float32(0.01), np.float32(0.9), np.float32(5e-4))
    stacked = jax.tree.map(lambda a: a[None], params)
    runs[use_fast] = (params, np.asarray(losses),
                      np.asarray(programs.predict(stacked, test_x))[0])
  (p_ref, loss_ref, pred_ref), (p_fast, loss_fast, pred_fast) = (
      runs[False], runs[True])
  assert loss_ref[-1] < 0.85 * loss_ref[0]  # the nets did learn
  np.testing.assert_allclose(loss_fast, loss_ref, rtol=2e-4)
  for a, b in zip(jax.tree.leaves(p_fast), jax.tree.leaves(p_ref)):
    assert np.max(np.abs(a - b)) <= 1e-2 * np.max(np.abs(b))
  acc_ref = np.mean(pred_ref == test_y)
  assert acc_ref > 0.4  # 10 classes
  assert np.mean(pred_fast == test_y) == acc_ref
  assert np.mean(pred_fast == pred_ref) >= 0.998

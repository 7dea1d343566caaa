"""Comparison baselines on a tiny real run (embedded Fashion-MNIST subset).

One Setup is shared by the whole module: 3 clients, 30 training and 20 test
images per class, ConvNets of width 8 and depth 2, budgets of a few steps.
DSA is cut to crop+flip so the many small programs compile quickly.
"""

import dataclasses
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import baselines
from collabdm_jax.baselines import central_dm
from collabdm_jax.baselines import common
from collabdm_jax.baselines import dense
from collabdm_jax.baselines import fedavg
from collabdm_jax.baselines import merged_local_dm
from collabdm_jax import keys
from collabdm_jax import models
from collabdm_jax import server
from collabdm_jax import setup as setup_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
C = 10


def default_config():
  spec = importlib.util.spec_from_file_location(
      "default_config", REPO / "experiments" / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config():
  c = default_config()
  c.dataset = "fashion_mnist_embedded"
  c.data_kwargs.max_train_per_class = 30
  c.data_kwargs.max_test_per_class = 20
  c.partition.num_clients = 3
  c.model.width = 8
  c.model.depth = 2
  c.eval.model_kwargs.width = 8
  c.eval.model_kwargs.depth = 2
  c.eval.num_nets = 2
  c.dsa_strategy = "crop_flip"
  c.num_iterations = 5
  c.local.iterations = 2
  c.local.batch_real = 16
  c.baseline.update({
      "local_epochs": 5, "local_batch": 32,
      "dense_epochs": 6, "dense_g_steps": 5, "dense_synthesis_batch": 16,
      "dense_kd_batch": 16, "dense_ngf": 8, "dense_kd_lr": 0.05,
  })
  return c


@pytest.fixture(scope="module")
def s():
  return setup_lib.setup(tiny_config())


def with_config(s, **changes):
  """The same Setup with top-level config fields changed."""
  c = s.config.copy_and_resolve_references()
  for k, v in changes.items():
    c[k] = v
  return dataclasses.replace(s, config=c)


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


def test_default_baseline_settings(s):
  c = default_config()
  plain = dataclasses.replace(s, config=c)
  assert fedavg.local_train_config(plain) == fedavg.LocalTrainConfig(
      epochs=5, dsa_strategy=s.dsa_strategy)
  # default.py's block holds the dataclasses' defaults.
  assert dense.dense_config(plain) == dense.DenseConfig()
  central = central_dm.local_dm_config(plain)
  assert central.lr == 1.0
  # None: as the CollabDM field (local DM's momentum and real batch).
  assert (central.momentum, central.batch_real) == (
      c.local.momentum, c.local.batch_real)
  c.baseline.central_batch_real = 7
  assert central_dm.local_dm_config(plain).batch_real == 7


@pytest.mark.parametrize("name,value", [("local_epochs", -1), ("local_lr", 0.0),
                                        ("local_momentum", 1.0),
                                        ("dense_g_steps", 0)])
def test_bad_settings_raise(s, name, value):
  c = s.config.copy_and_resolve_references()
  c.baseline[name] = value
  bad = dataclasses.replace(s, config=c)
  read = dense.dense_config if name.startswith("dense") else \
      fedavg.local_train_config
  with pytest.raises(ValueError, match=name):
    read(bad)


def test_baseline_keys_are_distinct_streams():
  root = jax.random.key(0)
  data = {n: tuple(np.asarray(jax.random.key_data(
      common.baseline_key(root, n)))) for n in baselines.RUNNERS}
  assert len(set(data.values())) == len(data)
  with pytest.raises(ValueError, match="name"):
    common.baseline_key(root, "fedprox")


# --------------------------------------------------------------------------
# Image baselines
# --------------------------------------------------------------------------


def dm_loss(s, images, labels, num_nets=4):
  """Sum over classes of DM's loss on held-out random nets, no augmentation."""
  embed = jax.jit(models.embed_fn(s.model))
  both = jnp.asarray(np.concatenate([s.train_x, images]))  # one compile
  n = len(s.train_x)
  total = 0.0
  for j in range(num_nets):
    params = models.init_params(s.model, jax.random.fold_in(
        jax.random.key(12345), j), s.input_shape)
    emb = np.asarray(embed(params, both))
    real, syn = emb[:n], emb[n:]
    for c in range(C):
      target = real[s.dataset.train_y == c].mean(0)
      total += np.sum((target - syn[labels == c].mean(0)) ** 2)
  return total / num_nets


def test_central_dm_moves_images_and_lowers_dm_loss(s):
  timings = {}
  init = central_dm.run(with_config(s, num_iterations=0), timings)
  out = central_dm.run(s, timings)
  ipc = s.config.server.ipc
  for r in (init, out):
    assert r["images"].shape == (C * ipc,) + s.input_shape
    assert r["images"].dtype == np.float32 and r["labels"].dtype == np.int32
    np.testing.assert_array_equal(r["labels"], np.repeat(np.arange(C), ipc))
  # Zero iterations leave the real initialisation: every image is a
  # training image of its own class.
  train_x = s.train_x.reshape(len(s.train_x), -1)
  for img, c in zip(init["images"], init["labels"]):
    d = np.abs(train_x - img.reshape(-1)).max(1)
    assert d.min() == 0.0 and s.dataset.train_y[d.argmin()] == c
  moved = np.abs(out["images"] - init["images"]).reshape(C, -1).max(1)
  assert (moved > 1e-3).all()
  assert dm_loss(s, out["images"], out["labels"]) < 0.9 * dm_loss(
      s, init["images"], init["labels"])
  assert timings["central_dm"] > 0


def test_select_per_class_caps_at_ipc_like_the_server_init():
  rng = np.random.default_rng(0)
  counts = {0: 7, 1: 3, 3: 5}
  pool_y = np.concatenate([np.full(n, c, np.int32) for c, n in counts.items()])
  pool_x = rng.standard_normal((len(pool_y), 4, 4, 1)).astype(np.float32)
  key = keys.server_key(jax.random.key(3))
  x, y = merged_local_dm.select_per_class(key, pool_x, pool_y, 4, 5, (4, 4, 1))
  np.testing.assert_array_equal(np.bincount(y, minlength=4), [5, 3, 0, 5])
  assert np.all(np.diff(y) >= 0)
  np.testing.assert_array_equal(x[y == 1], pool_x[pool_y == 1])
  server_init = server.initial_synthetic_set(key, "local", 4, 5, (4, 4, 1),
                                             pool_x, pool_y)
  for c in (0, 3):
    np.testing.assert_array_equal(x[y == c], server_init[c])
  # Capped classes are drawn without repetition from the class's own pool.
  flat = pool_x[pool_y == 0].reshape(7, -1)
  hits = [np.flatnonzero((flat == img.reshape(-1)).all(1)) for img in x[y == 0]]
  assert all(len(h) == 1 for h in hits)
  assert len({int(h[0]) for h in hits}) == 5
  with pytest.raises(ValueError, match="ipc"):
    merged_local_dm.select_per_class(key, pool_x, pool_y, 4, 0, (4, 4, 1))


def test_merged_local_dm_budget_per_class(s):
  timings = {}
  out = merged_local_dm.run(s, timings)
  ipc = s.config.server.ipc
  client_ipc = setup_lib.local_ipc(s.config)
  holders = (s.partition.counts > 0).sum(0)
  expected = np.minimum(ipc, client_ipc * holders)
  assert (expected == ipc).any() and ((expected > 0) & (expected < ipc)).any()
  np.testing.assert_array_equal(np.bincount(out["labels"], minlength=C),
                                expected)
  assert out["labels"].dtype == np.int32 and np.all(np.diff(out["labels"]) >= 0)
  assert out["images"].shape == (expected.sum(),) + s.input_shape
  assert out["images"].dtype == np.float32
  assert np.isfinite(out["images"]).all()
  assert timings["merged_local_dm"] > 0


# --------------------------------------------------------------------------
# Model baselines
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fedavg_result(s):
  timings = {}
  out = fedavg.run(s, timings)
  out["timings"] = timings
  return out


def check_model_result(s, r, n):
  assert r["accuracies"].shape == (n,)
  assert r["predictions"].shape == (n, len(s.dataset.test_y))
  assert r["predictions"].dtype == np.int32
  np.testing.assert_allclose(
      r["accuracies"], (r["predictions"] == s.dataset.test_y).mean(1))
  assert r["accuracy_mean"] == pytest.approx(r["accuracies"].mean())
  assert r["accuracy_std"] == pytest.approx(r["accuracies"].std())
  assert r["per_class_recall"].shape == (C,)


def test_fedavg_averages_by_client_size_and_beats_chance(s, fedavg_result):
  r = fedavg_result
  check_model_result(s, r, 2)
  assert r["accuracy_mean"] > 0.2
  sizes = np.array([len(i) for i in s.partition.client_indices], np.float64)
  leaf = lambda tree: tree["classifier"]["kernel"]
  clients, avg = leaf(r["client_params"]), leaf(r["params"])
  assert clients.shape[:2] == (2, 3) and avg.shape == (2,) + clients.shape[2:]
  expected = np.einsum("k,sk...->s...", sizes / sizes.sum(), clients)
  np.testing.assert_allclose(avg, expected, rtol=1e-5, atol=1e-6)
  # Clients trained apart from one shared init per seed.
  assert np.abs(clients[:, 0] - clients[:, 1]).max() > 1e-4
  assert np.abs(clients[0] - clients[1]).max() > 1e-4
  assert set(r["timings"]) == {"fedavg_client_training", "fedavg_evaluate"}


def test_fedavg_is_deterministic(s, fedavg_result):
  again = fedavg.run(s, {})
  np.testing.assert_array_equal(again["predictions"],
                                fedavg_result["predictions"])
  chex.assert_trees_all_equal(again["params"], fedavg_result["params"])


def test_dense_distils_the_ensemble_into_the_student(s, fedavg_result):
  timings = {}
  r = dense.run(s, timings, client_params=fedavg_result["client_params"])
  check_model_result(s, r, 2)
  model = common.eval_model(s.config, C)
  ens = dense.ensemble_logits(model)
  apply_fn = common.logits_of(model)
  T = dense.dense_config(s).temperature
  kl = jax.jit(lambda teachers, p, x: jnp.mean(
      dense.kl_per_sample(apply_fn(p, x), ens(teachers, x), T)))
  x = jnp.asarray(s.test_x)
  ratios = []
  for i in range(2):
    take = lambda t: jax.tree.map(lambda a: a[i], t)
    teachers = take(fedavg_result["client_params"])
    ratios.append(float(kl(teachers, take(r["params"]), x))
                  / float(kl(teachers, take(r["init_params"]), x)))
  # The distillation loss, measured on real test images the student never
  # saw, fell clearly for every seed: the student moved towards the
  # teachers (an untrained or broken student stays at ratio ~1).
  assert max(ratios) < 0.95 and np.mean(ratios) < 0.85, ratios
  agree = (r["predictions"] == r["ensemble_predictions"]).mean()
  assert agree > (r["init_predictions"] == r["ensemble_predictions"]).mean()
  lo = (0.0 - s.dataset.mean) / s.dataset.std
  hi = (1.0 - s.dataset.mean) / s.dataset.std
  for hist in r["history"]:
    # Every generator round lowers the teachers' cross-entropy on its targets.
    assert hist["gen"].shape == (6, 5, 4)
    assert (hist["gen"][:, -1, 1] < hist["gen"][:, 0, 1]).all()
    assert np.isfinite(hist["kd"]).all()
    # Generated samples are pixels in [0, 1] in the dataset's normalisation,
    # all of them written (no zero placeholder left in the pool).
    pool = hist["pool"]
    assert pool.shape == (6 * 16,) + s.input_shape
    assert (pool >= lo - 1e-5).all() and (pool <= hi + 1e-5).all()
    assert (np.abs(pool).reshape(len(pool), -1).max(1) > 0).all()
  assert set(timings) == {"dense_client_training", "dense_server",
                          "dense_evaluate"}
  again = dense.run(s, {}, client_params=fedavg_result["client_params"])
  np.testing.assert_array_equal(again["predictions"], r["predictions"])
  with pytest.raises(ValueError, match="client_params"):
    dense.run(s, {}, client_params=jax.tree.map(
        lambda a: a[:1], fedavg_result["client_params"]))


def test_dense_generator_shapes_and_checks():
  tab = dense.make_generator((7,), 4)
  sample = jax.jit(lambda k, z: tab.apply(tab.init(k, z), z))
  x = sample(jax.random.key(0), jax.random.normal(jax.random.key(1), (5, 16)))
  assert x.shape == (5, 7) and np.isfinite(np.asarray(x)).all()
  img = dense.make_generator((28, 28, 3), 4, mean=(0.1, 0.2, 0.3), std=0.5)
  assert img.mean == (0.1, 0.2, 0.3) and img.std == (0.5, 0.5, 0.5)
  with pytest.raises(ValueError, match="divisible by 4"):
    dense.make_generator((30, 30, 1), 4)
  with pytest.raises(ValueError, match="mean and std"):
    dense.make_generator((28, 28, 3), 4, mean=(0.1, 0.2), std=1.0)
  with pytest.raises(ValueError, match="std"):
    dense.make_generator((28, 28, 1), 4, std=0.0)

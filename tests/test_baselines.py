"""Comparison baselines on a tiny real run (embedded Fashion-MNIST subset).

One Setup is shared by the whole module: 3 clients, 30 training and 20 test
images per class, ConvNets of width 8 and depth 2, budgets of a few steps.
DSA is cut to crop+flip so the many small programs compile quickly.
"""

import dataclasses
import importlib.util
import json
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
from collabdm_jax.baselines import model_cache
from collabdm_jax.baselines import nets
from collabdm_jax import evaluate
from collabdm_jax import fast_convnet
from collabdm_jax import keys
from collabdm_jax import models
from collabdm_jax import pipeline
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
      "local_epochs": 6, "local_val_every": 2, "local_batch": 32,
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
      dsa_strategy=s.dsa_strategy)
  # The clients train the evaluation ConvNet, or its BatchNorm variant.
  assert not fedavg.baseline_net(plain).has_batchnorm
  c.baseline.net_norm = "batchnorm"
  net = fedavg.baseline_net(plain)
  assert net.has_batchnorm and net.module.width == 128
  # default.py's block holds the dataclasses' defaults.
  assert dense.dense_config(plain) == dense.DenseConfig()
  central = central_dm.local_dm_config(plain)
  assert central.lr == 1.0
  # None: as the CollabDM field (local DM's momentum and real batch).
  assert (central.momentum, central.batch_real) == (
      c.local.momentum, c.local.batch_real)
  c.baseline.central_batch_real = 7
  assert central_dm.local_dm_config(plain).batch_real == 7


@pytest.mark.parametrize("changes,name", [
    ({"local_epochs": -1}, "local_epochs"),
    ({"local_epochs": 0}, "local_epochs"),  # nothing to validate
    ({"local_lrs": (0.0, 0.1)}, "local_lrs"),
    ({"local_lrs": (0.1, 0.1)}, "local_lrs"),
    ({"local_lrs": ()}, "local_lrs"),
    ({"local_momentum": 1.0}, "local_momentum"),
    ({"local_val_fraction": 1.0}, "local_val_fraction"),
    # Without a validation split there is nothing to choose a rate on.
    ({"local_val_fraction": 0.0}, "local_lrs"),
    ({"local_patience": 0}, "local_patience"),
    ({"dense_g_steps": 0}, "dense_g_steps"),
    # DeepInversion's prior needs BatchNorm running statistics.
    ({"dense_bn": 1.0}, "dense_bn"),
    ({"dense_ensemble": "median"}, "dense_ensemble"),
    ({"net_norm": "layernorm"}, "net_norm"),
])
def test_bad_settings_raise(s, changes, name):
  c = s.config.copy_and_resolve_references()
  c.baseline.update(changes)
  bad = dataclasses.replace(s, config=c)
  read = dense.dense_config if name.startswith(("dense", "net")) else \
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
  w = sizes / sizes.sum()
  leaf = lambda tree: tree["classifier"]["kernel"]
  clients, avg = leaf(r["client_params"]), leaf(r["params"])
  assert clients.shape[:2] == (2, 3)
  assert avg.shape == (2,) + clients.shape[2:]
  expected = np.einsum("k,sk...->s...", w, clients)
  np.testing.assert_allclose(avg, expected, rtol=1e-5, atol=1e-6)
  # Clients trained apart from one shared init per seed.
  assert np.abs(clients[:, 0] - clients[:, 1]).max() > 1e-4
  assert np.abs(clients[0] - clients[1]).max() > 1e-4
  assert set(r["timings"]) == {"fedavg_client_training", "fedavg_evaluate"}
  acc = np.asarray(r["extra"]["client_accuracies"])
  assert acc.shape == (2, 3) and ((acc > 0) & (acc < 1)).all()


def test_fedavg_records_its_choices(s, fedavg_result):
  rec = fedavg_result["extra"]["local_training"]
  lcfg = fedavg.local_train_config(s)
  assert rec["net"] == "ConvNet"
  assert rec["settings"]["lrs"] == list(lcfg.lrs)
  ys = fedavg.client_data(s)[1]
  for c, y in zip(rec["clients"], ys):
    assert c["n"] == len(y) == c["n_train"] + c["n_val"]
    assert c["n_val"] == fedavg.validation_counts(
        np.bincount(y, minlength=C), lcfg.val_fraction).sum()
    assert set(c["curves"]) == {repr(v) for v in lcfg.lrs}
    # The choice is the best check of the recorded curves, and the search
    # spent what the curves say (early stops included).
    assert fedavg.choose([c["curves"][repr(v)] for v in lcfg.lrs],
                         lcfg.lrs) == {k: c[k] for k in (
                             "lr", "epochs", "val_accuracy", "val_loss")}
    assert c["search_epochs"] == sum(v[-1][0] for v in c["curves"].values())
    for curve in c["curves"].values():
      epochs = [p[0] for p in curve]
      assert epochs == list(range(2, 2 * len(curve) + 1, 2))
      assert all(p[1] * c["n_val"] == pytest.approx(round(p[1] * c["n_val"]))
                 for p in curve)
    assert c["search_s"] > 0 and c["refit_s"] > 0
  assert rec["search_s"] == pytest.approx(
      sum(c["search_s"] for c in rec["clients"]), abs=1e-2)


def test_fedavg_selection_is_real_validation_then_refit(s):
  """On one real client: the curves are the validation accuracy of models
  trained on the training part; a rate that cannot learn is not chosen;
  the uploaded model is a refit on all the data with the choice."""
  net = fedavg.baseline_net(s)
  xs, ys = fedavg.client_data(s)
  x, y = xs[0], ys[0]
  base = fedavg.local_train_config(s)
  cfg = dataclasses.replace(base, lrs=(1e-5, 0.1), epochs=6, val_every=3,
                            patience=None)
  key = jax.random.key(42)
  params, report = fedavg.train_local_models(
      key, net, s.input_shape, [x], [y], 1, cfg, C)
  c = report[0]
  curves = c["curves"]
  assert c["lr"] == 0.1
  assert max(p[1] for p in curves["0.1"]) > max(p[1] for p in curves["1e-05"])
  # Recompute the chosen check by hand, with the documented streams.
  seed0 = jax.random.fold_in(key, 0)
  tr, va = fedavg.validation_split(
      jax.random.fold_in(jax.random.fold_in(seed0, 3), 0), y, 0.15, C)
  assert (len(tr), len(va)) == (c["n_train"], c["n_val"])
  programs = fedavg.client_programs(net, s.input_shape, 32,
                                    base.dsa_strategy,
                                    evaluate.default_micro_batch())
  pad = lambda a: np.concatenate([a, np.zeros((len(y) - len(a),)
                                              + a.shape[1:], a.dtype)])
  model, _ = fedavg.train_runs(
      programs, [jax.random.fold_in(seed0, 0)],
      [jax.random.fold_in(jax.random.fold_in(seed0, 2), 0)], [c["lr"]],
      jnp.asarray(pad(x[tr])), jnp.asarray(pad(y[tr])), len(tr),
      c["epochs"], cfg)
  pred = common.predict(nets.logits_fn(net), model, x[va])[0]
  assert np.mean(pred == y[va]) == pytest.approx(c["val_accuracy"], abs=1e-9)
  # The upload is exactly the fixed-budget training on all the data.
  fixed = dataclasses.replace(cfg, lrs=(c["lr"],), epochs=c["epochs"],
                              val_fraction=0.0)
  again, rep = fedavg.train_local_models(key, net, s.input_shape, [x], [y], 1,
                                         fixed, C)
  assert rep[0]["lr"] == c["lr"] and "curves" not in rep[0]
  chex.assert_trees_all_close(again, params, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="too few"):
    fedavg.train_local_models(key, net, s.input_shape, [x[:3]], [y[:3]], 1,
                              cfg, C)


def test_fedavg_client_step_with_fast_convnet_kernels_matches_models(s):
  """The CPU path (fast_convnet's kernels) takes the same SGD steps as the
  models' own network, to float rounding."""
  net = fedavg.baseline_net(s)
  assert net.fast_kernels == (jax.default_backend() == "cpu")
  assert fast_convnet.supports(net.module, s.input_shape)
  xs, ys = fedavg.client_data(s)
  x, y = jnp.asarray(xs[0]), jnp.asarray(ys[0])
  cfg = fedavg.local_train_config(s)
  key = [jax.random.key(5)]
  out = []
  for fast in (False, True):
    programs = fedavg.client_programs(
        dataclasses.replace(net, fast_kernels=fast), s.input_shape, 16,
        cfg.dsa_strategy, 4)
    out.append(fedavg.train_runs(programs, key, key, [0.1], x, y,
                                 len(ys[0]), 2, cfg)[0])
  start = fedavg.client_programs(net, s.input_shape, 16, cfg.dsa_strategy,
                                 4)[0](jnp.stack(key), 0.9, 5e-4)[0]
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       out[0], start)
  # The steps moved the kernels far beyond the tolerance below.
  assert min(moved["conv0"]["kernel"], moved["conv1"]["kernel"]) > 1e-2
  chex.assert_trees_all_close(out[1], out[0], rtol=2e-4, atol=2e-5)


def test_fedavg_patience_stops_a_run_early(s):
  net = fedavg.baseline_net(s)
  xs, ys = fedavg.client_data(s)
  x, y = jnp.asarray(xs[0]), jnp.asarray(ys[0])
  cfg = dataclasses.replace(fedavg.local_train_config(s), epochs=20,
                            val_every=1, patience=2)
  programs = fedavg.client_programs(net, s.input_shape, 32, cfg.dsa_strategy,
                                    None)
  keys = [jax.random.key(3)] * 2
  # Run 0 cannot move (lr 0): its checks are identical, so it stops after
  # the first check plus `patience` checks without improvement; run 1
  # learns and, trained side by side, keeps the group going.
  _, curves = fedavg.train_runs(programs, keys, keys, [0.0, 0.1], x, y,
                                len(ys[0]), 20, cfg, (x, y, len(ys[0])))
  assert [p[0] for p in curves[0]] == [1, 2, 3]
  assert len({(p[1], p[2]) for p in curves[0]}) == 1
  assert len(curves[1]) > 3
  best = max(range(len(curves[1])),
             key=lambda j: (curves[1][j][1], -curves[1][j][2]))
  assert len(curves[1]) in (20, best + 3)


def test_fedavg_is_deterministic(s, fedavg_result):
  again = fedavg.run(s, {})
  np.testing.assert_array_equal(again["predictions"],
                                fedavg_result["predictions"])
  chex.assert_trees_all_equal(again["params"], fedavg_result["params"])
  strip = lambda rec: [{k: v for k, v in c.items() if not k.endswith("_s")}
                       for c in rec["local_training"]["clients"]]
  assert strip(again["extra"]) == strip(fedavg_result["extra"])


def with_baseline(s, **changes):
  """The same Setup with ``config.baseline`` fields changed."""
  c = s.config.copy_and_resolve_references()
  c.baseline.update(changes)
  return dataclasses.replace(s, config=c)


def test_fedavg_and_dense_train_the_client_models_once(s, fedavg_result,
                                                        tmp_path,
                                                        monkeypatch):
  """With a client cache the first run stores the client models and the
  others read them back: the same models, without training them again."""
  cached = with_baseline(s, client_cache_dir=str(tmp_path))
  first = fedavg.run(cached, {})
  stored = first["extra"]["local_training"]["cache"]
  assert stored["action"] == "stored"
  assert fedavg_result["extra"]["local_training"]["cache"] is None
  # Storing changes nothing: these are the models of the run without cache.
  chex.assert_trees_all_equal(first["client_params"],
                              fedavg_result["client_params"])
  np.testing.assert_array_equal(first["predictions"],
                                fedavg_result["predictions"])

  def no_training(*args, **kwargs):
    raise AssertionError("the client models were trained again")

  monkeypatch.setattr(fedavg, "train_local_models", no_training)
  again = fedavg.run(cached, {})
  read = again["extra"]["local_training"]
  assert read["cache"] == dict(stored, action="read")
  # The record is the training run's, wall times included.
  strip = lambda rec: {k: v for k, v in rec.items() if k != "cache"}
  assert strip(read) == strip(first["extra"]["local_training"])
  np.testing.assert_array_equal(again["predictions"],
                                fedavg_result["predictions"])
  # DENSE (another server budget, same clients) reads the same teachers:
  # its FedAvg of them is FedAvg's.
  d = dense.run(with_baseline(cached, dense_epochs=1,
                              dense_g_steps=1), {})
  assert d["extra"]["local_training"]["cache"]["action"] == "read"
  np.testing.assert_array_equal(d["fedavg_predictions"],
                                fedavg_result["predictions"])
  # Another local training misses the entry and trains.
  monkeypatch.undo()
  other = fedavg.run(with_baseline(cached, local_lrs=(0.05,),
                                   local_val_fraction=0.0, local_epochs=1),
                     {})
  assert other["extra"]["local_training"]["cache"]["action"] == "stored"
  assert len(list(tmp_path.glob("*.npz"))) == 2


def test_an_interrupted_client_training_resumes_with_the_clients_it_finished(
    s, tmp_path, monkeypatch):
  """Client models are stored one client at a time: a training cut off
  after client 0 reads client 0 back when started again, trains only the
  others and ends with the models of an uninterrupted training; the
  partial entries go once the whole entry is stored."""
  cached = with_baseline(s, client_cache_dir=str(tmp_path), local_lrs=(0.05,),
                         local_val_fraction=0.0, local_epochs=1)
  K = len(s.partition.client_indices)
  assert K >= 2
  calls = []
  train_runs = fedavg.train_runs
  monkeypatch.setattr(fedavg, "train_runs",
                      lambda *a, **kw: calls.append(1) or train_runs(*a, **kw))
  save = model_cache.ClientProgress.save

  def save_then_stop(self, k, params, entry):
    save(self, k, params, entry)
    if k == 0:
      raise KeyboardInterrupt("machine lost")

  monkeypatch.setattr(model_cache.ClientProgress, "save", save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    fedavg.client_models(cached, 2)
  per_client = len(calls)  # one refit call per seed on the CPU
  # Client 0's partial entry was stored before the stop, nothing else.
  [entry] = [p.name for p in tmp_path.glob("*.npz")]
  digest = entry[:-len("-client0.npz")]
  assert entry == model_cache.client_entry_name(digest, 0) + ".npz"
  monkeypatch.setattr(model_cache.ClientProgress, "save", save)
  params, record = fedavg.client_models(cached, 2)
  assert len(calls) == per_client * K  # client 0 was not trained again
  assert [c.get("resumed", False) for c in record["clients"]] == \
      [True] + [False] * (K - 1)
  assert record["cache"]["action"] == "stored"
  # Only the whole entry is left.
  assert [p.name for p in tmp_path.glob("*.npz")] == [f"{digest}.npz"]
  assert record["cache"]["fingerprint"] == digest
  whole, _ = fedavg.train_local_models(
      common.baseline_key(s.root, "fedavg"), fedavg.baseline_net(s),
      s.input_shape, *fedavg.client_data(s), 2,
      fedavg.local_train_config(cached), s.dataset.num_classes)
  chex.assert_trees_all_equal(params, whole)


def test_a_run_cut_off_mid_training_goes_on_from_its_last_check(
    s, tmp_path, monkeypatch):
  """A client's run stores its state at each validation check: a training
  cut off inside client 0's search, at its second check, goes on from that
  check when started again (no epoch is trained twice) and ends with the
  models and report of an uninterrupted training; the run checkpoints go
  once their client's models are stored."""
  cached = with_baseline(s, client_cache_dir=str(tmp_path),
                         local_lrs=(0.05, 0.1), local_epochs=6,
                         local_val_every=2, local_patience=None)
  epochs_trained = []
  client_programs = fedavg.client_programs

  def counting_programs(*args, **kwargs):
    init, order, step, val_sums = client_programs(*args, **kwargs)
    counted = lambda *a: epochs_trained.append(1) or order(*a)
    return init, counted, step, val_sums

  monkeypatch.setattr(fedavg, "client_programs", counting_programs)
  save = model_cache.RunCheckpoint.save
  saves = []

  def save_then_stop(self, state, record):
    save(self, state, record)
    saves.append(self.name)
    if len(saves) == 2:
      raise KeyboardInterrupt("machine lost")

  monkeypatch.setattr(model_cache.RunCheckpoint, "save", save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    fedavg.client_models(cached, 2)
  assert saves[0] == saves[1] and saves[0].endswith("-client0-search0")
  assert len(epochs_trained) == 4  # two checks, every 2 epochs
  [left] = [p.name for p in tmp_path.glob("*.npz")]
  assert left == saves[0] + ".npz"
  monkeypatch.setattr(model_cache.RunCheckpoint, "save", save)
  params, record = fedavg.client_models(cached, 2)
  resumed_epochs = len(epochs_trained) - 4
  assert record["cache"]["action"] == "stored"
  assert [p.name for p in tmp_path.glob("*.npz")] == [
      record["cache"]["fingerprint"] + ".npz"]

  epochs_trained.clear()
  whole, report = fedavg.train_local_models(
      common.baseline_key(s.root, "fedavg"), fedavg.baseline_net(s),
      s.input_shape, *fedavg.client_data(s), 2,
      fedavg.local_train_config(cached), s.dataset.num_classes)
  # Resuming skipped exactly the 4 epochs trained before the cut.
  assert resumed_epochs == len(epochs_trained) - 4
  chex.assert_trees_all_equal(params, whole)
  # Client 0's wall times count its search's seconds before the cut.
  first = record["clients"][0]
  assert 0 < first["resumed_s"] <= first["search_s"]
  assert all("resumed_s" not in c for c in record["clients"][1:])
  timeless = lambda c: {k: v for k, v in c.items()
                        if k not in ("search_s", "refit_s", "resumed_s")}
  assert [timeless(c) for c in record["clients"]] == \
      [timeless(c) for c in report]


def test_pipeline_writes_the_baselines_record(s, tmp_path):
  c = s.config.copy_and_resolve_references()
  c.method = "fedavg"
  c.eval.num_nets = 1
  c.baseline.local_lrs = (0.05,)
  c.baseline.local_val_fraction = 0.0
  c.baseline.local_epochs = 1
  results = pipeline.run(c, tmp_path)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["local_training"]["clients"][0]["epochs"] == 1
  assert len(on_disk["client_accuracies"][0]) == 3
  assert on_disk["accuracy_mean"] == pytest.approx(results["accuracy_mean"])
  assert on_disk["wall_s"]["fedavg_client_training"] > 0


def test_dense_distils_the_ensemble_into_the_student(s, fedavg_result):
  timings = {}
  r = dense.run(s, timings, client_params=fedavg_result["client_params"])
  check_model_result(s, r, 2)
  net = fedavg.baseline_net(s)
  ens = dense.ensemble_logits(net)
  apply_fn = nets.logits_fn(net)
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
  extra = r["extra"]
  # FedAvg of the same client models is FedAvg's own result.
  np.testing.assert_array_equal(r["fedavg_predictions"],
                                fedavg_result["predictions"])
  np.testing.assert_allclose(extra["fedavg_accuracies"],
                             fedavg_result["accuracies"])
  np.testing.assert_allclose(
      extra["ensemble_accuracies"],
      (r["ensemble_predictions"] == s.dataset.test_y).mean(1))
  assert extra["local_training"] is None  # the teachers were passed in
  assert extra["dense"]["budget"] == {
      "rounds": 6, "generator_steps": 30, "pool_size": 96,
      "kd_steps": sum(range(1, 7)), "kd_batch": 16}
  lo = (0.0 - s.dataset.mean) / s.dataset.std
  hi = (1.0 - s.dataset.mean) / s.dataset.std
  for hist in r["history"]:
    # Every generator round lowers the teachers' cross-entropy on its
    # targets; no BatchNorm, no prior.
    assert hist["gen"].shape == (6, 5, 5)
    assert (hist["gen"][:, -1, 1] < hist["gen"][:, 0, 1]).all()
    assert (hist["gen"][..., 4] == 0).all()
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


def test_batchnorm_clients_average_their_statistics_and_feed_the_prior(s):
  c = s.config.copy_and_resolve_references()
  c.eval.num_nets = 1
  c.baseline.update({"net_norm": "batchnorm", "dense_bn": 1.0,
                     "local_lrs": (0.05,), "local_val_fraction": 0.0,
                     "local_epochs": 3, "dense_epochs": 3})
  bs = dataclasses.replace(s, config=c)
  r = fedavg.run(bs, {})
  assert r["extra"]["local_training"]["net"] == "BNConvNet"
  sizes = np.array([len(i) for i in s.partition.client_indices], np.float64)
  for leaf in (lambda tree: tree["params"]["classifier"]["kernel"],
               # Running statistics are averaged like the weights.
               lambda tree: tree["batch_stats"]["norm1"]["var"]):
    clients, avg = leaf(r["client_params"]), leaf(r["params"])
    np.testing.assert_allclose(
        avg, np.einsum("k,sk...->s...", sizes / sizes.sum(), clients),
        rtol=1e-5, atol=1e-6)
    assert np.abs(clients[:, 0] - clients[:, 1]).max() > 1e-4
  d = dense.run(bs, {}, client_params=r["client_params"])
  gen = d["history"][0]["gen"]
  # Each round's generator closes part of the gap between its batch's
  # statistics and the teachers' running ones.
  assert (gen[:, 0, 4] > 0).all() and (gen[:, -1, 4] < gen[:, 0, 4]).all()
  np.testing.assert_array_equal(d["fedavg_predictions"], r["predictions"])
  # The students are BatchNorm networks, trained statistics included.
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(),
                       d["params"]["batch_stats"],
                       d["init_params"]["batch_stats"])
  assert min(jax.tree.leaves(moved)) > 0


def test_dense_generator_loss_terms():
  t = jnp.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
  st = jnp.array([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]])
  y = jnp.array([0, 2])
  total, (ce, adv, div, bn) = dense.generator_loss(t, st, y, 0.7, oh=1.0,
                                                   adv=2.0, div=0.5, bn=3.0)
  logp = jax.nn.log_softmax(t)
  assert float(ce) == pytest.approx(-float(logp[0, 0] + logp[1, 2]) / 2)
  # Only the first sample has student and teacher disagree.
  want_adv = -float(dense.kl_per_sample(st[:1], t[:1])[0]) / 2
  assert float(adv) == pytest.approx(want_adv, rel=1e-5)
  p = np.asarray(jax.nn.softmax(t)).mean(0)
  assert float(div) == pytest.approx(float(np.sum(p * np.log(p))), rel=1e-5)
  assert float(bn) == pytest.approx(0.7)
  assert float(total) == pytest.approx(
      float(ce) + 2 * float(adv) + 0.5 * float(div) + 3 * 0.7, rel=1e-5)


def test_dense_probability_ensemble_averages_the_softmaxes():
  # Confident, disagreeing clients (logits up to ~60): the naive
  # log(mean(softmax)) would underflow where the log-space form does not.
  logits = 20.0 * jax.random.normal(jax.random.key(0), (3, 7, C))
  probs = dense.ensemble_of_logits(list(logits), "probs")
  np.testing.assert_allclose(
      jax.nn.softmax(probs), jax.nn.softmax(logits).mean(0),
      rtol=1e-5, atol=1e-7)
  assert np.isfinite(np.asarray(probs)).all()
  np.testing.assert_allclose(dense.ensemble_of_logits(logits, "probs"),
                             probs, rtol=1e-6)
  # The reference's mean of logits is a different teacher here: not even
  # its predicted classes all agree with the mean of probabilities.
  mean = dense.ensemble_of_logits(list(logits))
  np.testing.assert_allclose(mean, logits.mean(0), rtol=1e-6, atol=1e-5)
  assert (np.argmax(mean, -1) != np.argmax(probs, -1)).any()
  for bad in ("median", "logit", None):
    with pytest.raises(ValueError, match="ensemble must be one of"):
      dense.ensemble_of_logits(list(logits), bad)


def test_dense_ensemble_choice_reaches_every_teacher_term(s, fedavg_result):
  # The models' kernels: XLA fuses fast_convnet's differently in the two
  # programs compared bit for bit below (float rounding, not the ensemble).
  net = dataclasses.replace(fedavg.baseline_net(s), fast_kernels=False)
  teachers = jax.tree.map(lambda a: a[0], fedavg_result["client_params"])
  x = jnp.asarray(s.test_x[:64])
  K = jax.tree.leaves(teachers)[0].shape[0]
  clients = [net.logits(jax.tree.map(lambda a, k=k: a[k], teachers), x)
             for k in range(K)]
  # The default is the reference's ensemble, bit for bit: the clients'
  # logits summed in order, divided by K.
  np.testing.assert_array_equal(
      jax.jit(dense.ensemble_logits(net))(teachers, x),
      jax.jit(lambda t: sum(net.logits(jax.tree.map(
          lambda a, k=k: a[k], t), x) for k in range(K)) / K)(teachers))
  np.testing.assert_allclose(
      jax.nn.softmax(dense.ensemble_logits(net, "probs")(teachers, x)),
      np.mean([jax.nn.softmax(v) for v in clients], 0), rtol=1e-4, atol=1e-6)
  cfg = dataclasses.replace(dense.dense_config(s), epochs=2, g_steps=2)
  args = (teachers, net, s.input_shape, C)
  key = jax.random.key(3)
  runs = {e: dense.distill(key, *args, dataclasses.replace(cfg, ensemble=e),
                           s.dataset.mean, s.dataset.std)
          for e in dense.ENSEMBLES}
  # Same keys, same pool of the first step, another teacher: the
  # generator's losses differ from its first step and so do the students.
  g_logits, g_probs = runs["logits"][2]["gen"], runs["probs"][2]["gen"]
  np.testing.assert_array_equal(g_logits[0, 0, 4], g_probs[0, 0, 4])
  assert np.abs(g_logits[0, 0, 1:3] - g_probs[0, 0, 1:3]).min() > 1e-6
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                      runs["logits"][0], runs["probs"][0])
  assert max(jax.tree.leaves(diff)) > 1e-6
  with pytest.raises(ValueError, match="cfg.ensemble"):
    dense.distill(key, *args, dataclasses.replace(cfg, ensemble="mean"))
  with pytest.raises(ValueError, match="median"):
    dense.ensemble_logits(net, "median")


def test_a_cut_off_dense_server_goes_on_from_its_saved_rounds(
    s, fedavg_result, tmp_path, monkeypatch):
  """DENSE saves its student, optimiser state, pool and history after its
  rounds: a run cut off after round 2 of seed 1 goes on from there (seed
  0 read whole, rounds 1-2 of seed 1 not run again) and ends with the
  uninterrupted run's students and predictions; the saved rounds go once
  every student is finished."""
  cached = with_baseline(s, client_cache_dir=str(tmp_path), dense_epochs=4,
                         dense_g_steps=2)
  whole = dense.run(cached, {}, client_params=fedavg_result["client_params"])
  assert not list(tmp_path.iterdir())  # finished: nothing left behind
  assert "resumed_s" not in whole["extra"]["dense"]

  distill = dense.distill
  rounds_run, cut = [], []

  def cut_after_round_2_of_seed_1(key, *args, checkpoint=None, **kw):
    seed = int(checkpoint.name.rsplit("seed", 1)[1])

    def on_round(e, student):
      rounds_run.append((seed, e))
      if (seed, e) == (1, 1) and not cut:
        cut.append(1)
        raise KeyboardInterrupt("machine lost")

    return distill(key, *args, checkpoint=checkpoint, save_every_s=0.0,
                   on_round=on_round, **kw)

  monkeypatch.setattr(dense, "distill", cut_after_round_2_of_seed_1)
  with pytest.raises(KeyboardInterrupt):
    dense.run(cached, {}, client_params=fedavg_result["client_params"])
  # Seed 0's four rounds and seed 1's first are saved (the cut came
  # before round 2's save).
  assert rounds_run == [(0, e) for e in range(4)] + [(1, 0), (1, 1)]
  assert len(list(tmp_path.glob("dense-*-seed*.npz"))) == 2
  rounds_run.clear()
  again = dense.run(cached, {}, client_params=fedavg_result["client_params"])
  assert rounds_run == [(1, 1), (1, 2), (1, 3)]
  assert again["extra"]["dense"]["resumed_s"] > 0
  chex.assert_trees_all_equal(again["params"], whole["params"])
  np.testing.assert_array_equal(again["predictions"], whole["predictions"])
  for h_again, h_whole in zip(again["history"], whole["history"]):
    chex.assert_trees_all_equal(h_again, h_whole)
  assert not list(tmp_path.iterdir())


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

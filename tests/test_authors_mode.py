"""Authors' mode (experiments/configs/authors.py) and the options it needs.

The settings are checked against what the authors' code runs
(docs/fidelity.md); the unbiased std against numpy; and the mode runs end to
end on a tiny budget.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import client as client_lib
from collabdm_jax import losses
from collabdm_jax import models
from collabdm_jax import pipeline
from collabdm_jax import setup as setup_lib
from experiments.configs import authors
from experiments.configs import default


def test_config_resolves_to_the_authors_settings():
  c = authors.get_config()
  assert c.method == "collabdm" and c.dataset == "fashion_mnist"
  assert c.data_kwargs.max_train_per_class is None  # the full dataset
  p = c.partition
  assert (p.method, p.num_clients, p.alpha, p.min_size) == (
      "collabdm", 5, 0.5, 10)
  assert p.ipc == c.server.ipc == 10
  assert c.num_iterations == 400
  assert c.stats.batch_real == 100 and not c.stats.second_moments
  assert c.server.weighting == "uniform"
  assert (c.server.lr, c.server.momentum, c.server.init) == (10.0, 0.5, "local")
  assert not c.server.pae and c.server.std_weight == 0
  lcfg = setup_lib.local_config(c, setup_lib.dsa_strategy(c, c.dataset))
  assert (lcfg.ipc, lcfg.iterations, lcfg.lr, lcfg.momentum,
          lcfg.batch_real) == (3, 401, 1.0, 0.5, 256)  # ipc // K + 1 = 3
  assert lcfg.std_weight == 0 and not lcfg.pae and lcfg.init == "real"
  # The authors keep flip for every dataset (DM drops it for digits).
  for arg in ("", "mnist", "cifar10"):
    cfg = authors.get_config(arg)
    assert "flip" in setup_lib.dsa_strategy(cfg, cfg.dataset)
  assert "flip" not in setup_lib.dsa_strategy(default.get_config(), "mnist")
  e = c.eval
  assert (e.arch, e.epochs, e.lr, e.momentum, e.weight_decay, e.batch_size,
          e.dsa) == ("convnet", 1000, 0.01, 0.9, 5e-4, 256, True)
  assert c.model.to_dict() == default.get_config().model.to_dict()


def test_the_partition_floor_follows_the_server_ipc():
  c = authors.get_config()
  c.server.ipc = 50  # the authors' command-line default
  assert c.partition.ipc == 50
  assert setup_lib.local_ipc(c) == 11


def test_variants():
  aug = authors.get_config("aug")
  assert aug.server.pae and aug.local.std_weight == 1.0
  lcfg = setup_lib.local_config(aug, setup_lib.dsa_strategy(aug, aug.dataset))
  assert lcfg.pae and lcfg.std_weight == 1.0 and lcfg.std_ddof == 1
  assert aug.server.std_weight == 0  # no std term at the server
  iid = authors.get_config("iid")
  assert iid.partition.method == "iid" and iid.stats.batch_real == 512
  both = authors.get_config("aug,cifar10")
  assert both.dataset == "cifar10" and both.server.pae
  with pytest.raises(ValueError, match="unknown"):
    authors.get_config("augment")
  with pytest.raises(ValueError, match="at most one dataset"):
    authors.get_config("mnist,cifar10")


def test_unbiased_std_matches_numpy():
  x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
  for ddof in (0, 1):
    np.testing.assert_allclose(
        losses.embedding_std(jnp.asarray(x), ddof=ddof),
        np.sqrt(np.var(x, axis=0, ddof=ddof) + 1e-8), rtol=1e-5)
  # Weighted: zero-weight rows (padding) do not count, in N - ddof either.
  w = np.array([1, 1, 1, 0, 1, 0, 1], np.float32)
  np.testing.assert_allclose(
      losses.embedding_std(jnp.asarray(x), jnp.asarray(w), ddof=1),
      np.sqrt(np.var(x[w > 0], axis=0, ddof=1) + 1e-8), rtol=1e-5)
  mean, mean_sq = x.mean(0), np.square(x).mean(0)
  np.testing.assert_allclose(
      losses.std_from_moments(mean, mean_sq, 7.0, ddof=1),
      np.std(x, axis=0, ddof=1), rtol=1e-4)
  target = np.ones(5, np.float32)
  np.testing.assert_allclose(
      losses.std_matching_loss(target, jnp.asarray(x), ddof=1),
      np.sum(np.square(target - np.sqrt(np.var(x, 0, ddof=1) + 1e-8))),
      rtol=1e-5)


def _local(ddof, std_weight):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
  y = np.repeat(np.arange(2), 20).astype(np.int32)
  model = models.make_model("convnet", 2, width=4, depth=1,
                            norm="instancenorm", activation="relu",
                            pooling="avgpool")
  cfg = client_lib.LocalDMConfig(ipc=2, iterations=2, batch_real=8,
                                 dsa_strategy="", pae=True,
                                 std_weight=std_weight, std_ddof=ddof)
  images, _ = client_lib.local_distill(jax.random.key(1), x, y, 2, model,
                                       (8, 8, 1), cfg)
  return images


def test_std_ddof_changes_local_dm_only_through_the_std_term():
  np.testing.assert_array_equal(_local(0, 0.0), _local(1, 0.0))
  assert not np.allclose(_local(0, 1.0), _local(1, 1.0))
  with pytest.raises(ValueError, match="std_ddof"):
    client_lib.LocalDMConfig(ipc=1, std_ddof=2)


def test_authors_mode_runs_end_to_end(tmp_path):
  c = authors.get_config("aug")
  c.dataset = "fashion_mnist_embedded"
  c.data_kwargs.max_train_per_class = 30
  c.data_kwargs.max_test_per_class = 10
  c.server.ipc = 2
  c.num_iterations = 2
  c.local.iterations = 2
  c.stats.batch_real = 8
  c.stats.t_chunk = 2
  c.local.batch_real = 8
  c.model.width = 8
  c.model.depth = 2
  c.eval.num_nets = 1
  c.eval.epochs = 2
  c.eval.model_kwargs.width = 8
  c.eval.model_kwargs.depth = 2
  c.checkpoint.every = 0
  results = pipeline.run(c, tmp_path)
  assert results["method"] == "collabdm-pae"
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["config"]["server"]["weighting"] == "uniform"
  assert on_disk["config"]["local"]["std_ddof"] == 1
  counts = np.asarray(on_disk["client_class_counts"])
  assert counts.shape == (5, 10) and counts.min() >= 2  # the ipc floor
  syn = np.load(tmp_path / "synthetic.npz")
  assert syn["images"].shape == (20, 28, 28, 1) and bool(syn["pae"])
  assert 0.0 <= results["accuracy_mean"] <= 1.0

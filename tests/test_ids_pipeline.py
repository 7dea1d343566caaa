"""CollabDM on real intrusion-detection traffic (5G-IDS), end to end.

Tiny budgets (small MLPs, a few dozen iterations): about 30 s on 2 busy CPU
cores with a warm compilation cache, under a minute cold. Skipped when the
shared data bundle is absent.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import augment
from collabdm_jax import keys as keys_lib
from collabdm_jax import models
from collabdm_jax import pipeline
from collabdm_jax import server as server_lib
from collabdm_jax import setup as setup_lib
from experiments import full_data_detector
from experiments.configs import ids_5g
from experiments.configs import ids_table
from experiments.configs import nsl_kdd
from tests import test_provenance

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
G5 = DATA / "5g-ids"
# Test_Data.csv: 2,987 normal and 800 attack rows (shared/data/README.md).
TEST_MAJORITY = 2987 / 3787

needs_5g = pytest.mark.skipif(
    not all((G5 / f).is_file() for f in
            ("Train_subset_1.csv", "Train_subset_2.csv", "Test_Data.csv")),
    reason=f"5G-IDS CSVs not found in {G5} (shared data bundle missing)")


def tiny(arg=""):
  """ids_5g.py with seconds-sized budgets, reading the bundle explicitly."""
  c = ids_5g.get_config(arg)
  c.data_dir = str(G5)
  c.partition.num_clients = 3
  c.partition.alpha = 0.5
  c.model.width = 32
  c.num_iterations = 30
  c.stats.batch_real = 64
  c.stats.t_chunk = 15
  c.local.iterations = 10
  c.local.batch_real = 64
  c.server.ipc = 5
  c.eval.num_nets = 2
  c.eval.epochs = 100
  c.eval.model_kwargs.width = 32
  return c


def check_detection_results(results):
  for key in ("accuracy_mean", "balanced_accuracy_mean",
              "balanced_accuracy_std", "false_positive_rate_mean",
              "false_positive_rate_std", "per_class_recall"):
    assert key in results, key
  assert len(results["per_class_recall"]) == 2
  # Balanced accuracy is the mean of the two recalls; FPR = 1 - normal recall.
  np.testing.assert_allclose(results["balanced_accuracy_mean"],
                             np.mean(results["per_class_recall"]), atol=1e-9)
  np.testing.assert_allclose(results["false_positive_rate_mean"],
                             1 - results["per_class_recall"][0], atol=1e-9)


@needs_5g
def test_collabdm_detects_attacks_with_all_features(tmp_path):
  c = tiny()
  results = pipeline.run(c, tmp_path)
  check_detection_results(results)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["balanced_accuracy_mean"] == results["balanced_accuracy_mean"]
  assert on_disk["method"] == "collabdm"
  test_provenance.check_record(on_disk["provenance"])
  # Every site uploaded, and the synthetic table has ipc rows of 26 features.
  assert set(results["upload_bytes_per_client"]) == {"0", "1", "2"}
  syn = np.load(tmp_path / "synthetic.npz")
  assert syn["images"].shape == (10, 26)
  np.testing.assert_array_equal(syn["labels"], [0] * 5 + [1] * 5)
  # A majority-class detector gets 0.789 accuracy and 0.5 balanced accuracy;
  # with the GTP columns the classes are separable, so a working pipeline is
  # near perfect.
  assert results["accuracy_mean"] > TEST_MAJORITY + 0.15
  assert results["balanced_accuracy_mean"] > 0.9
  assert results["false_positive_rate_mean"] < 0.05


def matching_gap(s, x, y, num_nets=4):
  """DM's objective under held-out random networks: summed over classes and
  networks, the squared distance between the mean embedding of the rows
  ``x`` of a class and that of the real training rows of the class."""
  embed = jax.jit(models.embed_fn(s.model))
  total = 0.0
  for t in range(num_nets):
    # Keys unrelated to the run's root: networks the server never saw.
    params = models.random_network_params(
        s.model, jax.random.key(10_000 + t), 0, s.input_shape)
    for k in range(s.dataset.num_classes):
      real = embed(params, s.train_x[s.dataset.train_y == k]).mean(0)
      total += float(jnp.sum((embed(params, x[y == k]).mean(0) - real) ** 2))
  return total


@needs_5g
def test_collabdm_without_gtp_learns_from_noise_with_tabular_augmentation(
    tmp_path, monkeypatch):
  # The server starts from Gaussian noise (no local rows), so everything the
  # detector knows about attacks comes from the sites' matched statistics.
  c = tiny("drop_gtp,tabular_aug")
  c.local.enabled = False
  c.server.init = "noise"
  # Noise starts far from the data; the reference's larger server step
  # (used there for ipc >= 100) covers that distance in 30 iterations.
  c.server.lr = 10.0
  seen = []
  original = augment.apply_siamese

  def spy(draws, x, strategy):
    if strategy == augment.TABULAR_STRATEGY:
      seen.append(tuple(x.shape))
    return original(draws, x, strategy)

  monkeypatch.setattr(augment, "apply_siamese", spy)
  results = pipeline.run(c, tmp_path)
  check_detection_results(results)
  assert results["config"]["dsa_strategy"] == "tabular"
  # The Siamese tabular transform ran on the real side (one row per slot)
  # and on the synthetic side (one class block of ipc rows): 18 features,
  # the GTP columns and their proxies gone.
  assert (1, 18) in seen and (5, 18) in seen, seen
  assert results["balanced_accuracy_mean"] > 0.85
  assert results["accuracy_mean"] > TEST_MAJORITY + 0.05

  # Distillation itself, independent of the detector's training luck.
  s = setup_lib.setup(c)
  start = server_lib.initial_synthetic_set(
      keys_lib.server_key(s.root), "noise", 2, c.server.ipc, s.input_shape)
  x0, y0 = server_lib.synthetic_dataset(start)
  syn = np.load(tmp_path / "synthetic.npz")
  x1, y1 = syn["images"], syn["labels"]
  assert x1.shape == (10, 18)
  # Against networks it never saw, the synthetic rows match the real class
  # embeddings far better than the noise they started from (about 10x on
  # this budget).
  assert matching_gap(s, x1, y1) < matching_gap(s, x0, y0) / 3
  # In feature space each synthetic class sits by its own real class.
  means = [s.train_x[s.dataset.train_y == k].mean(0) for k in (0, 1)]
  for k in (0, 1):
    centre = x1[y1 == k].mean(0)
    own = np.linalg.norm(centre - means[k])
    other = np.linalg.norm(centre - means[1 - k])
    assert own < 0.5 * other, (k, own, other)


@needs_5g
def test_full_data_detector_writes_pipeline_style_results(tmp_path):
  c = tiny("drop_gtp")
  c.eval.num_nets = 1
  results = full_data_detector.run(c, tmp_path, epochs=2)
  check_detection_results(results)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["method"] == "full_data"
  test_provenance.check_record(on_disk["provenance"])
  assert on_disk["train_rows"] == 18342
  # Pooling raw data costs every row: 18 float32 features + an int32 label.
  assert on_disk["upload_bytes_total"] == 18342 * (18 * 4 + 4)
  assert results["balanced_accuracy_mean"] > 0.9
  with pytest.raises(ValueError, match="epochs"):
    full_data_detector.run(c, tmp_path, epochs=0)


def test_configs_parse_options_and_sweep_grid():
  c = ids_5g.get_config("drop_gtp,as_image")
  assert c.data_kwargs.to_dict() == {"drop_gtp": True}
  assert c.tabular_as_image and c.model.arch == "convnet"
  assert ids_5g.get_config().model.to_dict() == dict(
      arch="mlp", width=128, depth=2, activation="relu", norm="none")
  assert nsl_kdd.get_config("binary").data_kwargs.to_dict() == {
      "grouping": "binary"}
  with pytest.raises(ValueError, match="drop_gpt"):
    ids_5g.get_config("drop_gpt")
  with pytest.raises(ValueError, match="config argument"):
    ids_table.get_config("cifar10")
  sweep = pytest.importorskip("launch.sweep")
  cells = sweep.make_cells(ids_table.get_config("5g"))
  assert len(cells) == 3 * 3 * 2
  configs = [sweep.apply_overrides(ids_table.get_config("5g").base,
                                   cell.overrides) for cell in cells]
  assert {(x.method, x.seed, x.data_kwargs.drop_gtp) for x in configs} == {
      (m, s, g) for m in ids_table.METHODS for s in ids_table.SEEDS
      for g in (False, True)}
  assert len(sweep.make_cells(ids_table.get_config("nsl_kdd"))) == 9

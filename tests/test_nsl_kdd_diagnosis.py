"""The NSL-KDD diagnosis program's statistics and data transforms."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from collabdm_jax.data.types import Dataset
from experiments import nsl_kdd_diagnosis as diag


def _rows(values, **fields):
  return {seed: {"seed": seed, "balanced_accuracy": v, **fields}
          for seed, v in values.items()}


def test_paired_difference_uses_common_seeds_and_t_interval():
  a = _rows({0: 0.60, 1: 0.62, 2: 0.65, 3: 0.70})
  b = _rows({0: 0.58, 1: 0.61, 2: 0.61})  # seed 3 has no partner
  p = diag.paired(a, b)
  d = np.array([0.02, 0.01, 0.04])
  assert p["n"] == 3
  np.testing.assert_allclose(p["differences"], d)
  np.testing.assert_allclose(p["mean"], d.mean())
  np.testing.assert_allclose(p["std"], d.std(ddof=1))
  half = scipy_stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
  np.testing.assert_allclose(p["ci"], (d.mean() - half, d.mean() + half))


def test_paired_without_common_seeds_or_with_one():
  assert diag.paired(_rows({0: 0.5}), _rows({1: 0.5})) is None
  one = diag.paired(_rows({0: 0.5}), _rows({0: 0.4}))
  assert one["n"] == 1 and "ci" not in one
  np.testing.assert_allclose(one["mean"], 0.1)


def test_pick_rejects_two_rows_for_one_seed():
  rows = [{"seed": 0, "init": "real", "t": 0},
          {"seed": 0, "init": "real", "t": 0}]
  with pytest.raises(ValueError, match="two rows for seed 0"):
    diag._pick(rows, init="real", t=0)
  assert diag._pick(rows, init="noise") == {}


def test_minmax_dataset_maps_raw_training_features_to_unit_range():
  rng = np.random.default_rng(0)
  raw_train = rng.normal(5.0, 3.0, (50, 4))
  raw_train[:, 3] = 2.0  # constant column
  raw_test = rng.normal(5.0, 3.0, (20, 4))
  mean, std = raw_train.mean(0), np.where(raw_train.std(0) > 0,
                                          raw_train.std(0), 1.0)
  ds = Dataset(name="t", train_x=((raw_train - mean) / std).astype(np.float32),
               train_y=np.zeros(50, np.int32),
               test_x=((raw_test - mean) / std).astype(np.float32),
               test_y=np.zeros(20, np.int32), num_classes=2,
               class_names=("a", "b"), input_shape=(4,),
               mean=mean.astype(np.float32), std=std.astype(np.float32),
               source="test", kind="tabular")
  mm = diag.minmax_dataset(ds)
  np.testing.assert_allclose(mm.train_x[:, :3].min(0), 0.0, atol=1e-6)
  np.testing.assert_allclose(mm.train_x[:, :3].max(0), 1.0, atol=1e-6)
  np.testing.assert_allclose(mm.train_x[:, 3], 0.0, atol=1e-6)
  # The stored statistics undo the scaling back to the raw features.
  np.testing.assert_allclose(mm.denormalize(mm.test_x), raw_test, atol=1e-4)


def test_cell_formats_lists_for_csv():
  assert diag._cell([0.5, 2]) == "0.5;2"
  assert diag._cell([[1, 2], [3, 4]]) == "[[1, 2], [3, 4]]"
  assert diag._cell(["neptune", "smurf"]) == "neptune;smurf"
  assert diag._cell(3.0) == 3.0


def test_fill_slots_copies_pooled_rows_and_keeps_empty_classes():
  rng = np.random.default_rng(1)
  start = rng.standard_normal((3, 4, 2)).astype(np.float32)
  pooled = np.array([4, 1, 0])  # full, one pooled row, none
  out = diag.fill_slots(start, pooled, "copies", np.random.default_rng(0),
                        jitter=0.01)
  np.testing.assert_array_equal(out[0], start[0])
  np.testing.assert_array_equal(out[1, 0], start[1, 0])
  np.testing.assert_allclose(out[1, 1:], np.broadcast_to(start[1, 0], (3, 2)),
                             atol=0.05)
  assert not np.allclose(out[1, 1], out[1, 2])  # jitter separates copies
  np.testing.assert_array_equal(out[2], start[2])
  train_x = np.arange(20, dtype=np.float32).reshape(10, 2)
  train_y = np.array([0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
  real = diag.fill_slots(start, pooled, "real", np.random.default_rng(0),
                         train_x, train_y)
  for row in real[1, 1:]:
    assert any(np.array_equal(row, train_x[i]) for i in (1, 2, 3, 4))
  assert len({tuple(r) for r in real[1, 1:]}) == 3  # distinct real rows
  with pytest.raises(ValueError, match="fill must be"):
    diag.fill_slots(start, pooled, "mean", np.random.default_rng(0))

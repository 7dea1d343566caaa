"""The client-model cache: files without pickle, fingerprints that miss on
any change, damaged entries reported (the runs that use it: test_baselines)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax.baselines import model_cache


def params_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"conv0": {"kernel": rng.standard_normal((1, 3, 3, 1, 4)),
                    "bias": rng.standard_normal((1, 4))},
          "classifier": {"kernel": rng.standard_normal((1, 8, 2))}}


def test_params_round_trip_without_pickle(tmp_path):
  params = params_tree()
  path = tmp_path / "teachers.npz"
  model_cache.save_params(path, params)
  back = model_cache.load_params(path)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # An object array (what a pickle payload would need) is refused.
  np.savez(tmp_path / "evil.npz", **{"conv0/kernel": np.array([{}], object)})
  with pytest.raises(ValueError, match="pickle"):
    model_cache.load_params(tmp_path / "evil.npz")


def test_only_nested_dicts_with_plain_keys_are_stored(tmp_path):
  with pytest.raises(ValueError, match="nested dicts"):
    model_cache.save_params(tmp_path / "a.npz", {"layers": [np.zeros(2)]})
  with pytest.raises(ValueError, match="without '/'"):
    model_cache.save_params(tmp_path / "b.npz", {"a/b": np.zeros(2)})


def clients(seed=0):
  rng = np.random.default_rng(seed)
  xs = [rng.standard_normal((n, 4, 4, 1)).astype(np.float32) for n in (5, 7)]
  ys = [rng.integers(0, 3, n).astype(np.int32) for n in (5, 7)]
  return xs, ys


def test_fingerprint_changes_with_every_input():
  key = jax.random.key(0)
  xs, ys = clients()
  desc = {"net": "ConvNet(width=8)", "local": {"lrs": [0.01, 0.1]},
          "num_seeds": 2}
  base, covered = model_cache.fingerprint(key, xs, ys, desc)
  # Deterministic, JSON-able, and it names what it covered.
  assert base == model_cache.fingerprint(key, [x.copy() for x in xs], ys,
                                         dict(desc))[0]
  json.dumps(covered)
  assert len(covered["clients"]) == 2 and covered["code"]
  x2 = [x.copy() for x in xs]
  x2[1][3, 0, 0, 0] += 1e-6
  y2 = [y.copy() for y in ys]
  y2[0][0] = (y2[0][0] + 1) % 3
  changed = [
      model_cache.fingerprint(jax.random.key(1), xs, ys, desc)[0],
      model_cache.fingerprint(key, x2, ys, desc)[0],
      model_cache.fingerprint(key, xs, y2, desc)[0],
      model_cache.fingerprint(key, xs[::-1], ys[::-1], desc)[0],
      model_cache.fingerprint(key, xs, ys, dict(desc, num_seeds=3))[0],
      model_cache.fingerprint(key, xs, ys,
                              dict(desc, local={"lrs": [0.01]}))[0],
  ]
  assert len(set(changed + [base])) == len(changed) + 1


def test_store_then_load_and_damaged_entries_are_reported(tmp_path):
  params = jax.tree.map(jnp.asarray, params_tree(1))
  record = {"search_s": 1.5, "clients": [{"lr": 0.1}]}
  assert model_cache.load(tmp_path, "abc") is None
  path = model_cache.store(tmp_path, "abc", params, record, {"note": 1})
  assert path == model_cache.entry_path(tmp_path, "abc")
  # Only the two entry files remain (the temporary ones were renamed).
  assert sorted(p.name for p in tmp_path.iterdir()) == ["abc.json", "abc.npz"]
  back, entry = model_cache.load(tmp_path, "abc")
  assert entry["record"] == record and entry["covered"] == {"note": 1}
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # Arrays that do not match the entry's record: an error, not a reuse.
  model_cache.save_params(path, params_tree(2) | {"extra": {"w": np.ones(3)}})
  with pytest.raises(ValueError, match="does not match its record"):
    model_cache.load(tmp_path, "abc")


def test_a_run_checkpoint_keeps_any_state_tree_and_refuses_another(tmp_path):
  """A run's state (variables and an optimiser state of tuples) comes back
  in its own tree structure; a checkpoint of another shape is reported."""
  state = (params_tree(), (jnp.zeros(3), {"momentum": jnp.ones((2, 2))}))
  ckpt = model_cache.RunCheckpoint(tmp_path, "abc-client0-search0", {})
  assert ckpt.load(state) is None
  ckpt.save(state, {"epoch": 4, "active": [True]})
  back, record = ckpt.load(state)
  assert record == {"epoch": 4, "active": [True]}
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  other = (params_tree(), (jnp.zeros(4), {"momentum": jnp.ones((2, 2))}))
  with pytest.raises(ValueError, match="does not fit this run's state"):
    ckpt.load(other)
  with pytest.raises(ValueError, match="does not fit this run's state"):
    ckpt.load(state[0])  # fewer arrays


def test_client_progress_removes_a_clients_run_checkpoints_with_it(tmp_path):
  progress = model_cache.ClientProgress(tmp_path, "abc", {})
  for k in (1, 10):
    progress.run_checkpoint(k, "search0").save(params_tree(), {"epoch": 2})
  progress.save(1, params_tree(), {"n": 5})
  # Client 1's run checkpoint went with its models stored; client 10's
  # (a name that starts like client 1's) stays.
  assert sorted(p.name for p in tmp_path.glob("*.npz")) == [
      "abc-client1.npz", "abc-client10-search0.npz"]
  progress.clear(11)
  assert not list(tmp_path.iterdir())

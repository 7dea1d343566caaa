"""The committed sweep configs of the reference tables and fidelity pairs
resolve (every cell's config is built, nothing runs) to what they promise."""

import pytest

from collabdm_jax import setup as setup_lib
from experiments.configs import fidelity
from experiments.configs import reference_table
from launch import sweep


def configs(part_module, arg):
  c = part_module.get_config(arg)
  return c, [sweep.cell_config(c, cell) for cell in sweep.make_cells(c)]


@pytest.mark.parametrize("part,n", [("main", 84), ("ipc", 12), ("cifar10", 21)])
def test_reference_tables_resolve_at_the_reference_budget(part, n):
  c, cfgs = configs(reference_table, part)
  assert len(cfgs) == n
  for cfg in cfgs:
    assert cfg.num_iterations == 100 and cfg.local.iterations == 100
    assert cfg.eval.num_nets == 3 and cfg.eval.epochs == 300
    assert cfg.data_kwargs.max_train_per_class is None
    assert cfg.seed == cfg.partition.seed and cfg.seed in (0, 1, 2)
    assert cfg.partition.method == "dirichlet"  # one split for every row
    if cfg.variant == "authors":
      assert cfg.server.weighting == "uniform"
      assert (cfg.stats.batch_real, cfg.local.batch_real) == (100, 256)
      assert "flip" in cfg.dsa_strategy and cfg.local.std_ddof == 1
    else:
      assert cfg.stats.batch_real == 64
    # Clients train to convergence at paper scale; DENSE's server runs the
    # CPU-sized budget (the docstring says why).
    b = cfg.baseline
    assert (b.local_epochs, b.local_val_every, b.local_patience) == (200, 5, 5)
    assert (b.dense_epochs, b.dense_g_steps, b.dense_synthesis_batch,
            b.dense_kd_batch) == (30, 10, 64, 64)
  counts = {}
  for cfg in cfgs:
    counts[cfg.variant] = counts.get(cfg.variant, 0) + 1
  if part == "ipc":
    assert {(cfg.variant, cfg.server.ipc) for cfg in cfgs} == {
        (v, i) for v in ("collabdm_count", "central_dm") for i in (1, 50)}
    assert all(cfg.partition.num_clients == 5 and cfg.partition.alpha == 0.5
               for cfg in cfgs)
  else:
    assert set(counts) == set(reference_table.VARIANTS)
    assert all(cfg.server.ipc == 10 for cfg in cfgs)
  if part == "cifar10":
    assert {cfg.dataset for cfg in cfgs} == {"cifar10"}
  by_variant = {cfg.variant: cfg for cfg in cfgs}
  assert by_variant["collabdm_count"].server.weighting == "count"
  if "collabdm_uniform" in by_variant:
    assert by_variant["collabdm_uniform"].server.weighting == "uniform"
    assert by_variant["dense"].method == "dense"
  for claim in c.claims:
    assert claim[1] in counts and claim[2] in counts


@pytest.mark.parametrize("setting", fidelity.SETTINGS)
def test_fidelity_pairs_differ_in_their_setting_only(setting):
  _, cfgs = configs(fidelity, setting)
  assert len(cfgs) == 6
  theirs = next(c for c in cfgs if c.variant == "theirs" and c.seed == 0)
  ours = next(c for c in cfgs if c.variant == "ours" and c.seed == 0)
  a = reference_table.flat_items(theirs.to_dict())
  b = reference_table.flat_items(ours.to_dict())
  diff = {p for p in a if a[p] != b[p]} - {"variant"}
  assert len(diff) == 1, diff
  # The base is the authors' mode.
  assert theirs.server.weighting in ("uniform", "count")
  assert theirs.local.batch_real in (256, 64)
  if setting == "flip":
    assert "flip" not in setup_lib.dsa_strategy(ours, ours.dataset)
    assert "flip" in setup_lib.dsa_strategy(theirs, theirs.dataset)


def test_unknown_parts_are_rejected():
  with pytest.raises(ValueError, match="part must be"):
    reference_table.get_config("gpu")
  with pytest.raises(ValueError, match="setting must be"):
    fidelity.get_config("lr")

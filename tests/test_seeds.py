"""Seeds and variants in sweeps; tables over seeds; paired differences.

Results files are synthetic (written here), so every number below is known.
"""

import csv
import json
import math

import ml_collections
import numpy as np
import pytest
from scipy import stats

from collabdm_jax import results
from experiments.configs import default
from launch import sweep


def sweep_config(**extra):
  c = ml_collections.ConfigDict()
  c.name = "t"
  c.base = default.get_config()
  c.grid = ml_collections.ConfigDict()
  c.grid.partition = ml_collections.ConfigDict()
  c.grid.partition.alpha = (0.1, 0.5)
  for k, v in extra.items():
    c[k] = v
  return c


def test_seeds_change_root_key_and_partition_together():
  c = sweep_config(seeds=(0, 3))
  cells = sweep.make_cells(c)
  assert [cl.name for cl in cells] == [
      "partition.alpha=0.1,seed=0", "partition.alpha=0.1,seed=3",
      "partition.alpha=0.5,seed=0", "partition.alpha=0.5,seed=3"]
  cfg = sweep.cell_config(c, cells[1])
  assert cfg.seed == 3 and cfg.partition.seed == 3
  assert dict(cells[1].labels) == {"partition.alpha": 0.1, "seed": 3}
  # Without seeds the names are what they always were.
  assert sweep.make_cells(sweep_config())[0].name == "partition.alpha=0.1"


@pytest.mark.parametrize("seeds,msg", [
    ((), "non-empty"), (3, "non-empty"), ((0, 0), "distinct"),
    ((-1,), ">= 0"), ((1.5,), ">= 0")])
def test_bad_seeds(seeds, msg):
  with pytest.raises(ValueError, match=msg):
    sweep.make_cells(sweep_config(seeds=seeds))


def test_variants_are_one_axis_of_named_overrides():
  variants = ml_collections.ConfigDict()
  variants.collabdm_uniform = {"method": "collabdm",
                               "server": {"weighting": "uniform"}}
  variants.central = {"method": "central_dm"}
  c = sweep_config(variants=variants, seeds=(0,))
  cells = {cl.name: cl for cl in sweep.make_cells(c)}
  assert len(cells) == 4  # 2 alphas x 2 variants x 1 seed
  cell = cells["variant=collabdm_uniform,partition.alpha=0.1,seed=0"]
  cfg = sweep.cell_config(c, cell)
  assert cfg.server.weighting == "uniform" and cfg.variant == "collabdm_uniform"
  central = sweep.cell_config(c, cells["variant=central,partition.alpha=0.5,seed=0"])
  assert central.method == "central_dm" and central.partition.alpha == 0.5
  variants.bad = {"server": {"no_such_field": 1}}
  with pytest.raises(ValueError, match="no_such_field"):
    sweep.make_cells(c)


def write(d, *, variant=None, method="collabdm", seed=0, acc=0.8,
          alpha=0.1, weighting=None, commit="abc"):
  d.mkdir(parents=True)
  config = {"seed": seed, "partition": {"method": "dirichlet", "seed": seed}}
  if variant:
    config["variant"] = variant
  payload = {"config": config, "method": method, "dataset": "fashion_mnist",
             "num_clients": 5, "alpha": alpha, "ipc": 10,
             "accuracy_mean": acc, "accuracy_std": 0.01,
             "accuracies": [acc - 0.01, acc + 0.01], "n_eval": 2,
             "wall_s": {"total": 10.0},
             "provenance": {"git_commit": commit * 5, "git_dirty": False}}
  (d / "results.json").write_text(json.dumps(payload))
  labels = {"partition.alpha": alpha, "seed": seed}
  if variant:
    labels["variant"] = variant
  if weighting:
    labels["server.weighting"] = weighting
  (d / "cell.json").write_text(json.dumps({"overrides": labels}))


CLAIM_ACC = {  # seed -> (collabdm, merged_local_dm, central_dm)
    0: (0.80, 0.78, 0.85), 1: (0.82, 0.79, 0.86), 2: (0.79, 0.78, 0.84)}


def method_runs(tmp_path):
  for seed, accs in CLAIM_ACC.items():
    for m, acc in zip(("collabdm", "merged_local_dm", "central_dm"), accs):
      write(tmp_path / f"{m}-{seed}", method=m, seed=seed, acc=acc)
  return results.collect(tmp_path)


def test_aggregate_is_mean_and_sample_std_of_per_seed_means(tmp_path):
  rows = method_runs(tmp_path)
  assert results.seeds_vary(rows)
  agg = {r["method"]: r for r in results.aggregate_seeds(rows)}
  col = [v[0] for v in CLAIM_ACC.values()]
  assert agg["collabdm"]["accuracy_mean"] == pytest.approx(np.mean(col))
  assert agg["collabdm"]["accuracy_std"] == pytest.approx(np.std(col, ddof=1))
  assert agg["collabdm"]["n_seeds"] == 3 and agg["collabdm"]["seeds"] == [0, 1, 2]
  assert agg["collabdm"]["commit"] == "abcabcabcabc"


def test_paired_difference_and_its_t_interval(tmp_path):
  rows = method_runs(tmp_path)
  (e,) = results.paired_differences(rows, "method", "collabdm",
                                    "merged_local_dm")
  d = np.array([0.02, 0.03, 0.01])
  assert e["n"] == 3 and e["seeds"] == [0, 1, 2]
  np.testing.assert_allclose(e["differences"], d, atol=1e-12)
  assert e["mean"] == pytest.approx(0.02)
  assert e["std"] == pytest.approx(0.01)
  # t_{0.975, 2} = 4.3027: the interval is 0.02 +- 4.3027 * 0.01 / sqrt(3).
  assert e["t"] == pytest.approx(4.302653, rel=1e-5)
  half = 4.302653 * 0.01 / math.sqrt(3)
  assert e["ci_low"] == pytest.approx(0.02 - half, rel=1e-5)
  assert e["ci_high"] == pytest.approx(0.02 + half, rel=1e-5)
  # scipy's one-sample t interval over the differences agrees.
  lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
  assert (e["ci_low"], e["ci_high"]) == pytest.approx((lo, hi))
  (c,) = results.paired_differences(rows, "method", "collabdm", "central_dm")
  assert c["mean"] == pytest.approx(-0.0467, abs=1e-4) and c["ci_high"] < 0


def test_pairs_only_common_seeds_and_one_seed_has_no_interval(tmp_path):
  write(tmp_path / "a0", method="collabdm", seed=0, acc=0.8)
  write(tmp_path / "a1", method="collabdm", seed=1, acc=0.9)
  write(tmp_path / "b1", method="central_dm", seed=1, acc=0.85)
  (e,) = results.paired_differences(results.collect(tmp_path), "method",
                                    "collabdm", "central_dm")
  assert e["n"] == 1 and e["seeds"] == [1]
  assert e["mean"] == pytest.approx(0.05)
  assert e["ci_low"] is None and e["std"] is None


def test_variants_pair_across_methods_and_weighting(tmp_path):
  for seed in range(3):
    write(tmp_path / f"c{seed}", variant="collabdm_count", seed=seed,
          acc=0.80 + 0.01 * seed)
    write(tmp_path / f"u{seed}", variant="collabdm_uniform", seed=seed,
          acc=0.79 + 0.01 * seed)
    write(tmp_path / f"m{seed}", variant="merged_local_dm",
          method="merged_local_dm", seed=seed, acc=0.70)
  rows = results.collect(tmp_path)
  (w,) = results.paired_differences(rows, "variant", "collabdm_count",
                                    "collabdm_uniform")
  assert w["mean"] == pytest.approx(0.01) and w["std"] == pytest.approx(0.0)
  (m,) = results.paired_differences(rows, "variant", "collabdm_count",
                                    "merged_local_dm")
  assert m["mean"] == pytest.approx(0.11)
  assert "variant" not in m["setting"] and "method" not in m["setting"]


def test_settings_are_compared_separately(tmp_path):
  for seed in range(2):
    for alpha, gap in ((0.1, 0.05), (0.5, 0.01)):
      write(tmp_path / f"a{alpha}-{seed}", seed=seed, alpha=alpha,
            acc=0.8 + gap + 0.001 * seed)
      write(tmp_path / f"b{alpha}-{seed}", method="merged_local_dm",
            seed=seed, alpha=alpha, acc=0.8)
  found = results.paired_differences(results.collect(tmp_path), "method",
                                     "collabdm", "merged_local_dm")
  by_alpha = {e["setting"]["alpha"]: e["mean"] for e in found}
  assert by_alpha == pytest.approx({0.1: 0.0505, 0.5: 0.0105})


def test_write_tables_emits_seed_tables_and_claims(tmp_path):
  method_runs(tmp_path / "runs")
  out = sweep.write_tables(tmp_path / "runs", tmp_path / "tables")
  text = out["markdown"].read_text()
  assert "## Over seeds" in text and "## Paired differences" in text
  assert "Made from commits: `abcabcabcabc` (9 runs)." in text
  # CollabDM: mean 80.33, sample std of (80, 82, 79) = 1.53.
  assert "| collabdm | 80.33 ± 1.53 |" in text
  assert "| collabdm − merged_local_dm (method) |" in text
  assert "| +2.00 | [-0.48, +4.48] | +2.00, +3.00, +1.00 |" in text
  with open(tmp_path / "tables" / "paired.csv") as f:
    paired = list(csv.DictReader(f))
  assert {(p["a"], p["b"]) for p in paired} == {
      ("collabdm", "merged_local_dm"), ("collabdm", "central_dm")}
  with open(tmp_path / "tables" / "results.csv") as f:
    header = next(csv.reader(f))
  assert "seed" in header and "commit" in header
  assert (tmp_path / "tables" / "results_seeds.csv").exists()


def test_claims_from_the_sweep_config(tmp_path):
  c = sweep_config(claims=(("variant", "x", "y"),))
  assert sweep.sweep_claims(c, []) == [("variant", "x", "y")]
  with pytest.raises(ValueError, match=r"\(key, a, b\)"):
    sweep.sweep_claims(sweep_config(claims=(("variant", "x"),)), [])
  assert ("server.weighting", "count", "uniform") in sweep.sweep_claims(
      sweep_config(), [{"server.weighting": "count"}])

"""Sweeps (launch.sweep) and result tables (collabdm_jax.results)."""

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from collabdm_jax import flower_app
from collabdm_jax import metrics
from collabdm_jax import pipeline
from collabdm_jax import results
from collabdm_jax import setup as setup_lib
from experiments.configs import fmnist_table_paper
from experiments.configs import smoke
from launch import sweep
from tests import test_provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def sweep_config(alphas=(-1.0, 0.5)):
  base = smoke.get_config()
  base.checkpoint.every = 0
  c = ml_collections.ConfigDict()
  c.name = "test sweep"
  c.base = base
  c.grid = ml_collections.ConfigDict()
  c.grid.partition = ml_collections.ConfigDict()
  c.grid.partition.alpha = alphas
  return c


# --------------------------------------------------------------------------
# Grid, names and overrides (no runs).


def test_grid_nested_and_dotted_forms_agree():
  nested = ml_collections.ConfigDict()
  nested.method = ("collabdm", "fedavg")
  nested.partition = {"alpha": (0.1, 0.5), "num_clients": (5, 10)}
  dotted = ml_collections.ConfigDict(
      {"partition.num_clients": [5, 10], "method": ["collabdm", "fedavg"],
       "partition.alpha": [0.1, 0.5]}, allow_dotted_keys=True)
  expected = [("method", ["collabdm", "fedavg"]),
              ("partition.alpha", [0.1, 0.5]),
              ("partition.num_clients", [5, 10])]
  assert sweep.grid_axes(nested) == expected
  assert sweep.grid_axes(dotted) == expected
  assert sweep.grid_axes(None) == []
  with pytest.raises(ValueError, match="non-empty list"):
    sweep.grid_axes({"method": ()})
  with pytest.raises(ValueError, match="non-empty list"):
    sweep.grid_axes({"method": "collabdm"})
  with pytest.raises(ValueError, match="given twice"):
    sweep.grid_axes({"partition.alpha": [1.0], "partition": {"alpha": [2.0]}})


def test_cells_are_the_product_with_readable_safe_names():
  c = sweep_config()
  c.grid.method = ("collabdm", "central_dm")
  c.grid.partition.alpha = (0.1, math.inf)
  cells = sweep.make_cells(c)
  assert [cell.name for cell in cells] == [
      "method=collabdm,partition.alpha=0.1",
      "method=collabdm,partition.alpha=inf",
      "method=central_dm,partition.alpha=0.1",
      "method=central_dm,partition.alpha=inf"]
  assert [cell.index for cell in cells] == [0, 1, 2, 3]
  assert sweep.make_cells(c) == cells  # deterministic
  assert sweep.cell_name([]) == "base"
  assert sweep.cell_name([("data_dir", "/a b/c"), ("stats.batch_real", None)]
                         ) == "data_dir=_a_b_c,stats.batch_real=None"
  long = [("x", "v" * 300)]
  name = sweep.cell_name(long)
  assert len(name) == sweep.MAX_NAME_CHARS
  assert name != sweep.cell_name([("x", "v" * 301)])


def test_overrides_are_checked_before_anything_runs():
  base = smoke.get_config()
  cfg = sweep.apply_overrides(base, [("partition.alpha", math.inf),
                                     ("stats.batch_real", None)])
  assert cfg.partition.alpha == math.inf and cfg.stats.batch_real is None
  assert base.partition.alpha == 0.5  # the base is not modified
  with pytest.raises(ValueError, match="partition has no field 'alpah'"):
    sweep.apply_overrides(base, [("partition.alpah", 0.1)])
  with pytest.raises(ValueError, match="baseline has no field 'local_epoch'"):
    sweep.apply_overrides(base, [("baseline.local_epoch", 1)])
  with pytest.raises(ValueError, match="cannot take 'five'"):
    sweep.apply_overrides(base, [("partition.num_clients", "five")])
  c = sweep_config()
  c.grid.partition.alpah = (0.1,)
  with pytest.raises(ValueError, match="alpah"):
    sweep.make_cells(c)
  c = sweep_config()
  c.seed = [0, 1]  # meant ``seeds``: would silently run one seed
  with pytest.raises(ValueError, match=r"unknown sweep config field\(s\) \['seed'\]"):
    sweep.make_cells(c)
  c = sweep_config()
  c.script = ml_collections.ConfigDict({"epochs": 3})  # another program's
  assert len(sweep.make_cells(c)) == len(sweep.make_cells(sweep_config()))
  c = sweep_config()
  c.grid.data_dir = ("a/b", "a_b")  # both sanitise to a_b
  with pytest.raises(ValueError, match="both map to folder"):
    sweep.make_cells(c)
  with pytest.raises(ValueError, match=r"cell must be in \[0, 2\)"):
    sweep.run_sweep(sweep_config(), "/nonexistent", [2])


# --------------------------------------------------------------------------
# A real 2-cell sweep on the smoke config: one cell fails, one runs.


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sweep")
  outcome = sweep.run_sweep(sweep_config(), workdir)
  return workdir, outcome


def test_failing_cell_is_recorded_and_does_not_stop_the_sweep(swept):
  workdir, outcome = swept
  bad, good = "partition.alpha=-1.0", "partition.alpha=0.5"
  # The failing cell comes first; the second still ran.
  assert outcome == {bad: "failed", good: "done"}
  error = json.loads((workdir / bad / "error.json").read_text())
  assert error["error_type"] == "ValueError"
  assert "alpha" in error["error"] and "Traceback" in error["traceback"]
  assert error["alpha"] == -1.0 and error["method"] == "collabdm"
  assert not (workdir / bad / "results.json").exists()
  # config.json is written when a run starts, so the failed cell has it.
  config = json.loads((workdir / bad / "config.json").read_text())
  assert config["partition"]["alpha"] == -1.0
  res = json.loads((workdir / good / "results.json").read_text())
  assert res["alpha"] == 0.5 and res["n_eval"] == 2
  cell = json.loads((workdir / good / "cell.json").read_text())
  test_provenance.check_record(cell.pop("provenance"), finished=False)
  assert cell == {"sweep": "test_sweep", "index": 1, "name": good,
                  "overrides": {"partition.alpha": 0.5}}
  # The failed cell says how it was started too.
  bad_cell = json.loads((workdir / bad / "cell.json").read_text())
  assert bad_cell["provenance"]["command"]
  assert "accuracy" in (workdir / good / "log.txt").read_text()
  for png in ("synthetic.png", "client_class_counts.png", "loss_curves.png"):
    assert (workdir / good / png).stat().st_size > 0
  phases = {r["phase"] for r in metrics.read_metrics(workdir / good)}
  assert phases == {"local_dm", "server", "eval_final"} | (
      {"eval"} & phases)
  assert list((workdir / good / "tensorboard").glob("events.out.tfevents.*"))
  assert [sweep.cell_status(workdir, c) for c in
          sweep.make_cells(sweep_config())] == ["failed", "done"]


def test_tables_from_the_sweep(swept, tmp_path):
  workdir, _ = swept
  out = sweep.write_tables(workdir, tmp_path / "res")
  rows = out["rows"]
  # Sorted by alpha: the failed cell (alpha -1) first.
  assert [(r["cell"], r["status"]) for r in rows] == [
      ("partition.alpha=-1.0", "failed"), ("partition.alpha=0.5", "ok")]
  assert rows[0]["alpha"] == -1.0 and rows[0]["accuracy_mean"] is None
  ok = rows[1]
  assert ok["method"] == "collabdm" and ok["dataset"] == "fashion_mnist_embedded"
  assert ok["num_clients"] == 3 and ok["ipc"] == 2 and ok["n_eval"] == 2
  assert 0 <= ok["accuracy_mean"] <= 1 and ok["wall_s"] > 0
  assert ok["upload_bytes_per_client"] > 0
  with open(out["csv"]) as f:
    table = list(csv.DictReader(f))
  for col in ("method", "dataset", "num_clients", "alpha", "ipc",
              "accuracy_mean", "accuracy_std", "n_eval",
              "upload_bytes_per_client", "wall_s"):
    assert col in table[0], col
  assert [t["status"] for t in table] == ["failed", "ok"]
  assert table[0]["accuracy_mean"] == ""
  assert float(table[1]["accuracy_mean"]) == pytest.approx(
      ok["accuracy_mean"])
  md = out["markdown"].read_text()
  assert f"{100 * ok['accuracy_mean']:.2f} ± " in md
  assert "ValueError: alpha must be > 0" in md and "1 ok, 1 failed" in md
  assert [p.name for p in out["plots"]] == [
      "accuracy_vs_alpha_fashion_mnist_embedded_K3_ipc2.png"]
  assert out["plots"][0].stat().st_size > 0


def test_rerun_skips_finished_cells_and_retries_failed(swept, monkeypatch,
                                                    caplog):
  workdir, _ = swept
  good = workdir / "partition.alpha=0.5" / "results.json"
  before = good.stat().st_mtime_ns
  calls = []

  def fake_run(config, cell_dir):
    calls.append((config.partition.alpha, pathlib.Path(cell_dir).name))
    raise RuntimeError("still broken")

  monkeypatch.setattr(pipeline, "run", fake_run)
  outcome = sweep.run_sweep(sweep_config(), workdir)
  assert outcome == {"partition.alpha=-1.0": "failed",
                     "partition.alpha=0.5": "skipped"}
  assert calls == [(-1.0, "partition.alpha=-1.0")]
  assert good.stat().st_mtime_ns == before
  error = json.loads((workdir / "partition.alpha=-1.0" / "error.json")
                     .read_text())
  assert error["error"] == "still broken"  # the newest failure is recorded
  assert "different config" not in caplog.text
  # A finished cell is kept even when the base config changed, with a warning.
  changed = sweep_config()
  changed.base.num_iterations = 4
  outcome = sweep.run_sweep(changed, workdir)
  assert outcome["partition.alpha=0.5"] == "skipped"
  assert "finished under a different config" in caplog.text


# --------------------------------------------------------------------------
# Result tables from synthetic results (no runs).


def write_run(d, method="collabdm", alpha=0.1, partition="dirichlet",
              mean=0.8123, std=0.0045, overrides=None, **extra):
  d.mkdir(parents=True)
  payload = {"config": {"partition": {"method": partition}}, "method": method,
             "dataset": "fashion_mnist", "num_clients": 5, "alpha": alpha,
             "ipc": 10, "accuracy_mean": mean, "accuracy_std": std,
             "accuracies": [mean - std, mean + std], "n_eval": 2,
             "upload_bytes_per_client": {"0": 1000, "1": 3000},
             "wall_s": {"server": 3.0, "total": 12.5},
             "client_class_counts": [[1, 2], [3, 4]]}
  payload.update(extra)
  (d / "results.json").write_text(json.dumps(payload))
  if overrides is not None:
    (d / "cell.json").write_text(json.dumps({"overrides": overrides}))


def test_collect_rows_from_results_errors_and_pending(tmp_path):
  write_run(tmp_path / "a", method="fedavg", alpha=0.5, mean=0.6)
  write_run(tmp_path / "b", alpha=float("inf"),
            overrides={"partition.alpha": float("inf"),
                       "server.weighting": "uniform"})
  write_run(tmp_path / "c", partition="iid", alpha=0.1)
  write_run(tmp_path / "d")
  (tmp_path / "d" / "checkpoints" / "x").mkdir(parents=True)
  (tmp_path / "d" / "checkpoints" / "x" / "results.json").write_text("{}")
  (tmp_path / "e").mkdir()
  (tmp_path / "e" / "error.json").write_text(json.dumps({
      "method": "dense", "dataset": "fashion_mnist", "num_clients": 5,
      "alpha": 0.1, "ipc": 10, "error_type": "MemoryError",
      "error": "out of memory", "config": {"partition": {"method": "x"}}}))
  (tmp_path / "f").mkdir()
  (tmp_path / "f" / "cell.json").write_text(json.dumps(
      {"overrides": {"method": "central_dm", "partition.alpha": 0.5}}))
  (tmp_path / "g").mkdir()
  (tmp_path / "g" / "results.json").write_text("{trunc")
  rows = results.collect(tmp_path)
  by_cell = {r["cell"]: r for r in rows}
  assert sorted(by_cell) == list("abcdefg")  # checkpoints/ not searched
  assert by_cell["b"]["alpha"] == "iid" and by_cell["c"]["alpha"] == "iid"
  assert by_cell["b"]["server.weighting"] == "uniform"
  assert "partition.alpha" not in by_cell["b"]  # already the alpha column
  d = by_cell["d"]
  assert d["status"] == "ok" and d["alpha"] == 0.1 and d["n_eval"] == 2
  assert d["upload_bytes_per_client"] == 2000 and d["upload_bytes_total"] == 4000
  assert d["wall_s"] == 12.5
  assert by_cell["e"]["status"] == "failed"
  assert by_cell["e"]["error"] == "MemoryError: out of memory"
  assert by_cell["f"]["status"] == "pending"
  assert by_cell["f"]["method"] == "central_dm"
  assert by_cell["g"]["status"] == "failed"
  assert "unreadable results.json" in by_cell["g"]["error"]
  # Sorted by alpha (iid last), then method in the paper's order.
  ok_order = [r["cell"] for r in rows if r["status"] == "ok"]
  assert ok_order == ["d", "a", "b", "c"]
  with pytest.raises(ValueError, match="sweep_dir"):
    results.collect(tmp_path / "missing")


def test_markdown_and_csv_contents(tmp_path):
  write_run(tmp_path / "x", overrides={"server.weighting": "count"})
  write_run(tmp_path / "y", method="fedavg", mean=0.5, std=0.25,
            overrides={"server.weighting": "count"})
  (tmp_path / "z").mkdir()
  (tmp_path / "z" / "error.json").write_text(json.dumps({
      "method": "dense", "dataset": "fashion_mnist", "num_clients": 5,
      "alpha": 0.1, "ipc": 10, "error_type": "ValueError",
      "error": "bad | value"}))
  rows = results.collect(tmp_path)
  md = results.to_markdown(rows).splitlines()
  assert md[0] == ("| method | dataset | clients | α | ipc | server.weighting "
                   "| accuracy (%) | n_eval | upload/client | wall (s) "
                   "| status | commit | error |")
  # write_run's results carry no provenance: their commit is unknown.
  assert md[2] == ("| collabdm | fashion_mnist | 5 | 0.1 | 10 | count "
                   "| 81.23 ± 0.45 | 2 | 2.00 kB | 12.5 | ok | unknown |  |")
  assert md[3].startswith("| fedavg | fashion_mnist | 5 | 0.1 | 10 | count "
                          "| 50.00 ± 25.00 |")
  assert md[4] == ("| dense | fashion_mnist | 5 | 0.1 | 10 | – | failed | – "
                   "| – | – | failed | – | ValueError: bad \\| value |")
  pivot = results.to_pivot_markdown(
      [r for r in rows if "server.weighting" in r])
  assert "| method | K=5, α=0.1 |" in pivot
  assert "| collabdm | 81.23 ± 0.45 |" in pivot
  path = results.to_csv(rows, tmp_path / "out" / "t.csv")
  with open(path) as f:
    table = list(csv.reader(f))
  assert table[0] == ["cell", "status", "method", "dataset", "partition",
                      "num_clients", "alpha", "ipc", "server.weighting",
                      "accuracy_mean", "accuracy_std", "n_eval",
                      "upload_bytes_per_client", "upload_bytes_total",
                      "wall_s", "commit", "error"]
  assert table[1][:9] == ["x", "ok", "collabdm", "fashion_mnist", "dirichlet",
                          "5", "0.1", "10", "count"]
  assert table[1][9:12] == ["0.8123", "0.0045", "2"]
  assert table[3][1] == "failed" and table[3][-1] == "ValueError: bad | value"


def test_formatting_helpers():
  assert results.format_alpha(0.5) == 0.5
  assert results.format_alpha(float("inf")) == "iid"
  assert results.format_alpha(0.1, "iid") == "iid"
  assert results.format_alpha("Infinity") == "iid"
  assert results.format_accuracy(0.81234, 0.0045) == "81.23 ± 0.45"
  assert results.format_accuracy(None, None) == "–"
  assert results.format_bytes(999) == "999 B"
  assert results.format_bytes(33_000_000) == "33.00 MB"
  with pytest.raises(ValueError, match="index"):
    results.to_pivot_markdown([], index="alpha")


# --------------------------------------------------------------------------
# The command line.


def sweep_command(cfg, work, *flags, timeout=600):
  """Runs ``python -m launch.sweep`` on sweep config file ``cfg`` (CPU)."""
  return subprocess.run(
      [sys.executable, "-m", "launch.sweep", f"--config={cfg}",
       f"--workdir={work}", *flags], cwd=ROOT, capture_output=True,
      text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_command_line_lists_cells_and_collects(tmp_path):
  cfg = tmp_path / "sweep_cfg.py"
  cfg.write_text(
      "import ml_collections\n"
      "from experiments.configs import smoke\n\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.name = 'cli'\n"
      "  c.base = smoke.get_config()\n"
      "  c.grid = ml_collections.ConfigDict()\n"
      "  c.grid.method = ('collabdm', 'fedavg')\n"
      "  return c\n")
  work = tmp_path / "work"
  write_run(work / "method=fedavg", method="fedavg")

  def launch(*flags):
    return sweep_command(cfg, work, *flags)

  proc = launch("--list_cells")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ["0\tpending\tmethod=collabdm",
                                      "1\tdone\tmethod=fedavg"]
  proc = launch("--collect_only", f"--results_dir={tmp_path / 'res'}",
                "--config.grid.method=('fedavg',)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  md = (tmp_path / "res" / "results.md").read_text()
  assert "| fedavg | fashion_mnist | 5 | 0.1 | 10 | 81.23 ± 0.45 |" in md
  assert (tmp_path / "res" / "results.csv").exists()
  assert not (work / "method=collabdm").exists()  # nothing ran


# --------------------------------------------------------------------------
# Cells in parallel worker processes.


def test_worker_command_drops_the_parent_only_flags():
  argv = ["launch/sweep.py", "--config=c.py:main", "--workdir=/w",
          "--cells=3,1", "--workers=4", "--stop_starting_after_s=60",
          "--config.base.eval.epochs=2", "--nolist_cells", "--cell=9"]
  cmd = sweep.worker_command(argv, 5)
  assert cmd[:3] == [sys.executable, "-m", "launch.sweep"]
  assert cmd[3:] == ["--config=c.py:main", "--workdir=/w",
                     "--config.base.eval.epochs=2", "--cell=5"]


def test_chosen_cells_keep_the_given_order_and_reject_repeats():
  cells = sweep.make_cells(sweep_config())
  assert [c.index for c in sweep.chosen_cells(cells, [1, 0])] == [1, 0]
  assert sweep.chosen_cells(cells, None) == cells
  with pytest.raises(ValueError, match="given twice"):
    sweep.chosen_cells(cells, [1, 1])
  with pytest.raises(ValueError, match=r"cell must be in \[0, 2\)"):
    sweep.chosen_cells(cells, [5])


def test_workers_run_each_cell_in_its_own_process(tmp_path):
  # Three cells: one finished before (skipped, no process), one that fails
  # (alpha -1) and one real smoke run; two workers run the last two at once.
  cfg = tmp_path / "sweep_cfg.py"
  cfg.write_text(
      "import ml_collections\n"
      "from experiments.configs import smoke\n\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.name = 'workers'\n"
      "  c.base = smoke.get_config()\n"
      "  c.base.checkpoint.every = 0\n"
      "  c.grid = ml_collections.ConfigDict()\n"
      "  c.grid.partition = ml_collections.ConfigDict()\n"
      "  c.grid.partition.alpha = (-1.0, 0.5, 1.0)\n"
      "  return c\n")
  work = tmp_path / "work"
  write_run(work / "partition.alpha=1.0", method="collabdm")

  def launch(*flags):
    return sweep_command(cfg, work, f"--results_dir={tmp_path / 'res'}",
                         *flags)

  # Past the deadline nothing starts, and nothing is written for the cells.
  proc = launch("--workers=2", "--stop_starting_after_s=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "0 done, 1 skipped, 0 failed, 2 not started" in proc.stdout
  assert not (work / "partition.alpha=0.5").exists()

  proc = launch("--workers=2", "--cells=2,1,0")
  assert proc.returncode == 1, proc.stderr[-3000:]  # one cell failed
  assert "1 done, 1 skipped, 1 failed" in proc.stdout
  bad, good = work / "partition.alpha=-1.0", work / "partition.alpha=0.5"
  assert (bad / "error.json").exists() and not (bad / "results.json").exists()
  assert "alpha" in json.loads((bad / "error.json").read_text())["error"]
  done = json.loads((good / "results.json").read_text())
  assert done["config"]["partition"]["alpha"] == 0.5
  # Each worker ran exactly its own cell.
  assert "cell 1 partition.alpha=0.5: running" in (good / "worker.log").read_text()
  assert "cell 0 " not in (good / "worker.log").read_text()
  assert not (work / "partition.alpha=1.0" / "worker.log").exists()
  # The parent wrote the tables over all three.
  md = (tmp_path / "res" / "results.md").read_text()
  assert "3 runs" in md and "1 failed" in md


def test_overrides_keep_field_references_live():
  # The paper config ties the partition's per-class floor to server.ipc; a
  # grid over server.ipc (or a Flower run_config override) must move both.
  base = fmnist_table_paper.get_config().base
  cfg = setup_lib.with_overrides(base, [("server.ipc", 50)])
  assert (cfg.server.ipc, cfg.partition.ipc) == (50, 50)
  assert (base.server.ipc, base.partition.ipc) == (10, 10)
  flower = flower_app.apply_overrides(base, "server.ipc=1")
  assert flower.partition.ipc == 1

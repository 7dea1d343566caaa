"""experiments/gpu_tables.sh: a lent GPU runs only the cells not committed."""

import os
import pathlib
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLES = ("reference_main", "reference_ipc", "reference_cifar10",
          "paper_fashion_mnist")


def committed_cells(table):
  return {p.name for p in
          (ROOT / "experiments/results" / table / "cells").iterdir()}


def run_script(tmp_path, **env):
  """The script with no time left: it lists and seeds, then starts no cell."""
  out = tmp_path / "out"
  proc = subprocess.run(
      ["bash", "experiments/gpu_tables.sh", "0", str(out)], cwd=ROOT,
      capture_output=True, text=True, timeout=600,
      env={**os.environ, "SWEEP_ROOT": str(tmp_path / "sw"),
           "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no_wheels"),
           **env})
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out


def listing(workdir, config):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.sweep", f"--config={config}",
       f"--workdir={workdir}", "--list_cells"], cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=True)
  return dict(line.split("\t")[2:0:-1]
              for line in proc.stdout.splitlines() if "\t" in line)


def test_committed_cells_are_seeded_so_only_the_missing_ones_would_run(
    tmp_path):
  out = run_script(tmp_path)
  sw = tmp_path / "sw"
  committed = {t: committed_cells(t) for t in TABLES}
  for table in TABLES:
    assert committed[table], table
    assert {p.name for p in (sw / table).iterdir()} == committed[table]
  # The sweep itself sees them as finished: in the main table exactly the
  # committed cells are done and the rest (FedAvg's, DENSE's) pending.
  status = listing(sw / "reference_main",
                   "experiments/configs/reference_table.py:main")
  assert ({n for n, s in status.items() if s == "done"}
          == committed["reference_main"])
  pending = {n for n, s in status.items() if s != "done"}
  assert pending and all(n.startswith(("variant=fedavg", "variant=dense"))
                         for n in pending)
  # The seeded cells come back packed with whatever the card finishes.
  with tarfile.open(out / "cells.tar.gz") as tar:
    packed = [n for n in tar.getnames() if n.endswith("results.json")]
  assert len(packed) == sum(len(c) for c in committed.values())


def test_rerun_committed_starts_from_empty_workdirs(tmp_path):
  run_script(tmp_path, RERUN_COMMITTED="1")
  sw = tmp_path / "sw"
  assert not any((sw / t).exists() and any((sw / t).iterdir())
                 for t in TABLES)

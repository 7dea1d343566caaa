"""experiments/attack_table.py at a tiny size: forge, gate, aggregate, evaluate."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_attack_table(tmp_path):
  out = tmp_path / "t.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.attack_table",
       "--config=experiments/configs/smoke.py", "--config.eval.num_nets=1",
       "--config.eval.epochs=1", "--f=1", "--attacks=scaled,copy",
       "--aggregators=median", "--factor=100", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  doc = json.loads(out.read_text())
  rows = {r["attack"]: r for r in doc["rows"]}
  assert set(rows) == {"scaled", "copy"}
  # Means scaled 100x leave psi_t's embedding range: the server drops client 0.
  assert list(rows["scaled"]["rejected"]) == ["0"]
  assert "lies outside" in rows["scaled"]["rejected"]["0"]
  assert rows["scaled"]["clients_used"] == [1, 2]
  # A copy of an honest client is well-formed and accepted.
  assert rows["copy"]["rejected"] == {} and rows["copy"]["clients_used"] == [0, 1, 2]
  for r in rows.values():
    assert r["aggregator"] == "median" and 0.0 <= r["accuracy_mean"] <= 1.0
  assert doc["provenance"]["git_commit"]
  table = out.with_suffix(".md").read_text()
  assert "| 1 | scaled |" in table and "(rej 1)" in table

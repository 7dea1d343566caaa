"""experiments/phase_pair.py on the smoke config: this checkout twice."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_phase_pair_times_every_phase_of_both_trees(tmp_path):
  out = tmp_path / "pair.json"
  subprocess.run(
      [sys.executable, "-m", "experiments.phase_pair",
       f"--trees={REPO},{REPO}", "--rounds=1", "--stats_iterations=2",
       "--config=smoke", f"--out={out}"], cwd=REPO, check=True,
      capture_output=True)
  doc = json.loads(out.read_text())
  (tree,) = doc["runs"]  # the same checkout twice: one key, two runs
  runs = doc["runs"][tree]
  assert len(runs) == 2
  for r in runs:
    assert r["package"].startswith(str(REPO))
    assert r["client_stats_iterations"] == 2
    assert r["local_iterations"] == 2 and r["server_iterations"] == 3
    assert 0 < r["server_first_iteration_s"] <= r["server_s"]
    assert r["client_stats_s"] > 0 and r["local_distill_s"] > 0
  # Same code, same keys: the same synthesis.
  assert runs[0]["server_final_loss"] == runs[1]["server_final_loss"]
  assert doc["trees"][tree]["git_commit"]
  assert doc["median_ratio_vs_first_tree"] == {}

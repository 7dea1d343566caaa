"""experiments/reference_bench.py: runs a config end to end and writes its JSON."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a whole (smoke-sized) run in a subprocess
def test_reference_bench_writes_phases_flops_and_provenance(tmp_path):
  out = tmp_path / "reference.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.reference_bench",
       "--config=experiments/configs/smoke.py", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  doc = json.loads(out.read_text())
  assert doc["total_s"] > 0 and 0 <= doc["accuracy_mean"] <= 1
  assert len(doc["accuracies"]) == 2  # the smoke config's eval nets
  assert doc["matmul_peak_gflops"] > 0
  for phase in ("local_distill", "client_stats", "server", "evaluate"):
    p = doc["phases"][phase]
    assert p["flops"] > 0 and p["wall_s"] > 0
    assert p["fraction_of_matmul_peak"] == pytest.approx(
        p["flops"] / p["wall_s"] / 1e9 / doc["matmul_peak_gflops"])
  assert doc["config_values"]["num_iterations"] == 3
  # The server's iteration times, from the run's metrics.jsonl: one row per
  # iteration, the steps and the first iteration together make the phase.
  its = doc["phases"]["server"]["iterations"]
  assert its["iterations"] == 3
  assert 0 < its["step_median_s"] <= its["step_max_s"]
  assert its["first_s"] + 2 * its["step_mean_s"] == pytest.approx(
      doc["phases"]["server"]["wall_s"])
  assert len(doc["provenance"]["git_commit"]) == 40
  assert doc["provenance"]["peak_rss_mb"] > 0
  assert doc["load_average_start"] and doc["environment"]["cpu_count"]

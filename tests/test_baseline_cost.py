"""experiments/baseline_cost.py: times the baselines' work and projects a
reference-table cell from it."""

import statistics

import pytest

from experiments.configs import reference_table
from tests import test_provenance


@pytest.mark.slow  # trains clients and runs DENSE's server in a subprocess
def test_quick_times_both_kernels_and_projects_the_cells(quick_script_json):
  doc = quick_script_json("experiments/baseline_cost.py", 900)
  assert doc["quick"] and doc["benchmark"] == "baseline_cost"
  client = doc["client_training"]
  per = client["s_per_sample_step"]
  assert sorted(per) == ["fast_convnet", "models"]
  assert all(len(v) == 1 and v[0] > 0 for v in per.values())
  assert client["ratio_median"] == pytest.approx(
      per["models"][0] / per["fast_convnet"][0], rel=1e-2)
  assert sorted(doc["dense_server"]) == ["fast_convnet", "models"]
  server = doc["dense_server"]["fast_convnet"]
  one, many = (statistics.median(server["run_s"][str(g)])
               for g in server["g_steps"])
  rounds, g = server["rounds"], server["g_steps"][1]
  # (run_s is rounded to milliseconds in the document)
  assert server["generator_step_s"] == pytest.approx(
      (many - one) / (rounds * (g - 1)), abs=2e-3)
  assert server["kd_step_s"] == pytest.approx(
      (one - rounds * server["generator_step_s"])
      / server["kd_steps_per_run"], abs=2e-3)
  proj = doc["projection"]
  # Reference budgets: 3 rates, search runs of 30-200 epochs on 85 % of the
  # images, 3 refits of 5-200 epochs on all of them.
  n, ns = proj["train_images"], proj["search_images"]
  assert proj["search_run_epochs"] == [30, 200]
  assert proj["refit_epochs"] == [5, 200]
  assert proj["client_sample_steps"] == {
      "lower": round(3 * 30 * ns + 3 * 5 * n),
      "upper": round(3 * 200 * ns + 3 * 200 * n)}
  # The reference table's DENSE server budget.
  b = reference_table.base_config().baseline
  budget = proj["dense_server_budget_per_seed"]
  steps = b.dense_epochs * b.dense_g_steps
  assert budget["rounds"] == b.dense_epochs
  assert budget["generator_steps"] == steps
  assert proj["dense_server_h_per_cell"] == pytest.approx(
      3 * (steps * server["generator_step_s"]
           + budget["kd_steps"] * server["kd_step_s"]) / 3600, abs=0.01)
  test_provenance.check_record(doc["provenance"])

"""experiments/dm_step_bench.py: its quick run times every variant it names."""

import math

from tests import test_provenance


def test_quick_bench_times_every_variant(quick_script_json):
  doc = quick_script_json("experiments/dm_step_bench.py", 900)
  test_provenance.check_record(doc["provenance"])
  cases = doc["cases"]
  assert set(cases) == {"server_ipc2", "local_dm", "eval_gradient"}
  server = cases["server_ipc2"]
  assert set(server["variants"]) == {
      "before", "now", "all_classes", "now_xla_conv", "now_im2col_conv",
      "all_classes_xla_conv", "all_classes_im2col_conv"}
  assert set(cases["local_dm"]["variants"]) == {
      "before", "now", "all_classes", "parties_per_class"}
  assert set(cases["local_dm"]["speedup_now_over_parties_per_class"]) == {
      "wall_min", "cpu_median"}
  assert set(cases["eval_gradient"]["variants"]) == {"before", "now",
                                                     "xla_conv"}
  for case in cases.values():
    for v in case["variants"].values():
      assert len(v["seconds_per_step"]) == doc["rounds"]
      assert math.isfinite(v["min_s"]) and 0 < v["min_s"] <= v["median_s"]
      assert len(v["cpu_seconds_per_step"]) == doc["rounds"]
      assert 0 < v["cpu_min_s"] <= v["cpu_median_s"]
  # With the same convolution, one closed-form step from the same state is
  # the scan's step (the code at base_commit) up to float rounding.
  diffs = server["first_step_max_abs_diff_vs_before"]
  assert diffs["before"] == 0 and diffs["now_im2col_conv"] < 1e-4
  assert cases["eval_gradient"]["max_abs_diff_vs_now"]["before"] < 1e-3
  assert server["flops_per_iteration"] > 0
  assert set(server["speedup_now_over_before"]) == {"wall_min", "cpu_median"}

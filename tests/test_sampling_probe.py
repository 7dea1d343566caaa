"""experiments/sampling_probe.py: its quick run times every step it names."""

import math

from tests import test_provenance


def test_quick_probe_times_each_step(quick_script_json):
  doc = quick_script_json("experiments/sampling_probe.py", 600)
  (case,) = doc["cases"]
  test_provenance.check_record(doc["provenance"])
  steps = case["seconds_per_call"]
  assert set(steps) == {"priorities", "sort", "gather", "draw_and_gather",
                        "block_function"}
  assert all(math.isfinite(v) and v > 0 for v in steps.values())
  # The draw is part of the block function's work, so it takes less time.
  assert 0 < case["draw_and_gather_share_of_block_function"] < 1
  assert case["samples_in_block"] >= case["slots_per_iteration"] > 0
  assert case["block_bytes"] == case["samples_in_block"] * 28 * 28 * 4

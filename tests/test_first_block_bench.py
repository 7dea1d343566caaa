"""experiments/first_block_bench.py: times the kernel against XLA, writes JSON."""

import shutil

import pytest

from tests import test_provenance


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs the kernel")
def test_quick_times_kernel_and_xla_side_by_side(quick_script_json):
  doc = quick_script_json("experiments/first_block_bench.py", 600)
  assert doc["settings"] == {"rounds": 2, "calls": 2, "quick": True}
  assert sorted(doc["cases"]) == ["block_10", "block_64", "embedding_64",
                                  "image_gradient_10"]
  for case in doc["cases"].values():
    assert sorted(case["seconds_per_call"]) == ["kernel", "xla"]
    for name, times in case["seconds_per_call"].items():
      assert len(times) == 2 and min(times) > 0
      assert case["min_s"][name] == min(times)
    assert case["ratio_is"] == "xla / kernel" and case["median_ratio"] > 0
    # The two variants compute the same function.
    assert case["max_relative_difference"] < 1e-5
  assert doc["environment"]["backend"] == "cpu"
  assert doc["environment"]["kernel_library"].endswith(".so")
  test_provenance.check_record(doc["provenance"])

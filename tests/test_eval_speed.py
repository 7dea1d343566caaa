"""experiments/eval_speed.py: times both ConvNet kernels and writes its JSON."""

import pytest

from tests import test_provenance


@pytest.mark.slow  # compiles and runs both kernels in a subprocess
def test_quick_times_both_kernels_side_by_side(quick_script_json):
  doc = quick_script_json("experiments/eval_speed.py", 900)
  assert doc["settings"]["quick"] and doc["settings"]["epochs"] == 2
  runs = doc["runs"]
  assert sorted(r["kernel"] for r in runs) == ["fast_convnet", "models"]
  for r in runs:
    for key in ("compile_train_s", "compile_predict_s", "train_s",
                "predict_s"):
      assert r[key] > 0
    assert 0 <= r["accuracy"] <= 1 and r["load_average"]
  summary = doc["summary"]
  for name in ("models", "fast_convnet"):
    s = summary[name]
    assert s["s_per_epoch"] == pytest.approx(s["train_s"] / 2)
    assert s["per_net_s"] == pytest.approx(
        (s["compile_train_s"] + s["compile_predict_s"]) / 3 + s["train_s"]
        + s["predict_s"])
    # Winograd convolutions: fewer FLOPs for the same training step.
    assert s["step_flops"] > 0
  assert (summary["fast_convnet"]["step_flops"]
          < summary["models"]["step_flops"])
  assert summary["speedup"]["per_net_s"] == pytest.approx(
      summary["models"]["per_net_s"] / summary["fast_convnet"]["per_net_s"])
  assert len(doc["prediction_agreement"]) == 1
  pairs = doc["interleaved_epochs"]
  assert pairs["pairs"] == 2 and len(pairs["ratio_per_pair"]) == 2
  assert pairs["ratio_median"] == pytest.approx(
      sum(pairs["ratio_per_pair"]) / 2)
  assert sorted(doc["predict_chunks_s"]) == ["10", "100", "1000"]
  test_provenance.check_record(doc["provenance"])

"""experiments/scale_check.py: the quick run's JSON document and its helpers.

The quick run (embedded Fashion-MNIST, K in {4, 12}, T in {2, 4}, width 8)
runs once per module in a subprocess, as CI would run it. The checks are on
structure and on relationships that hold whatever the machine (upload sizes,
counts, shapes, peak >= baseline), never on memory or timing thresholds.
"""

import math

from absl import flags
import msgpack
import numpy as np
import pytest

from collabdm_jax import data
from experiments import scale_check
from tests import test_provenance


@pytest.fixture(scope="module")
def quick(quick_script_json):
  return quick_script_json("experiments/scale_check.py", timeout=300)


@pytest.mark.slow  # runs the scale check script in a subprocess
def test_quick_runs_every_case_once(quick):
  q = scale_check.QUICK
  assert quick["sizes"] == "quick"
  assert quick["schema_version"] == scale_check.SCHEMA_VERSION
  assert quick["width"] == q["width"]
  test_provenance.check_record(quick["provenance"])
  # The cases ran in child processes: their peak is recorded too.
  assert quick["provenance"]["peak_rss_children_mb"] > 10
  got = sorted((c["clients"], c["iterations"]) for c in quick["cases"])
  assert got == sorted((k, t) for k in q["clients"] for t in q["iterations"])
  for c in quick["cases"]:
    assert c["width"] == q["width"] and c["dataset"] == q["dataset"]


@pytest.mark.slow  # runs the scale check script in a subprocess
def test_data_and_slots_are_consistent(quick):
  ds = data.load_dataset(scale_check.QUICK["dataset"])
  pixels = math.prod(ds.train_x.shape[1:])
  for c in quick["cases"]:
    # Every training sample goes to exactly one client.
    assert c["total_client_samples"] == len(ds.train_y)
    assert c["client_data_bytes"] == 4 * pixels * len(ds.train_y)
    assert c["min_size"] in scale_check.MIN_SIZE_CANDIDATES
    assert c["client_size_min"] >= c["min_size"]
    assert 0 < c["slots_per_iteration"] <= c["total_client_samples"]
    # batch_real = 32: at most 32 samples per (client, class) cell.
    assert c["slots_per_iteration"] <= 32 * ds.num_classes * c["clients"]
    assert c["slots_constant_over_t"]
    lay = c["layout"]
    assert lay["padded_slots_per_iteration"] >= c["slots_per_iteration"]
    assert lay["padded_samples"] >= c["total_client_samples"]
    assert lay["padded_block_bytes"] == 4 * pixels * lay["padded_samples"]
    assert 1 <= lay["distinct_block_shapes"] <= lay["num_blocks"]
    # Count weighting: the summed weight of every (t, c) is the class size.
    assert c["weights_equal_class_totals"] and c["targets_finite"]
    assert c["target_cells_valid"] == c["iterations"] * ds.num_classes


@pytest.mark.slow  # runs the scale check script in a subprocess
def test_memory_fields(quick):
  for c in quick["cases"]:
    assert c["baseline_rss_kib"] > 0
    assert c["peak_rss_kib"] >= c["baseline_rss_kib"]
    assert c["peak_minus_baseline_kib"] == (c["peak_rss_kib"]
                                            - c["baseline_rss_kib"])
    chunks = -(-c["iterations"] // c["t_chunk"])
    assert [t0 for t0, _ in c["rss_trace_kib"]] == [
        i * c["t_chunk"] for i in range(chunks)]
    if c["peak_reset_after_setup"]:
      # The peak covers the stream only, so every traced RSS lies below it
      # (up to the kernel's per-thread RSS counter lag, a few hundred KiB).
      assert max(r for _, r in c["rss_trace_kib"]) <= c["peak_rss_kib"] + 4096
    assert c["stream_s"] > 0 and c["wall_s"] >= c["stream_s"]


@pytest.mark.slow  # runs the scale check script in a subprocess
def test_message_sizes(quick):
  for c in quick["cases"]:
    T, C, D = c["iterations"], 10, c["embed_dim"]
    assert c["all_clients_same_shapes"]
    assert c["message_array_shapes"] == {"means": [T, C, D],
                                         "counts": [T, C],
                                         "class_counts": [C]}
    payload = 4 * (T * C * D + T * C + C)
    assert c["message_payload_bytes_nbytes"] == payload
    f32, bf16 = c["message_bytes_f32"], c["message_bytes_bf16"]
    assert f32 > payload  # plus header and checksum
    # bf16 halves the float arrays only; the int32 counts stay exact. The
    # headers differ by a few bytes (the dtype names).
    assert abs((f32 - bf16) - 2 * T * C * D) <= 64
    assert c["upload_k_times_message_bytes_f32"] == c["clients"] * f32
    assert c["upload_k_times_message_bytes_bf16"] == c["clients"] * bf16
    lo, hi = c["message_bytes_f32_min_max"]
    assert lo <= f32 <= hi
    assert lo * c["clients"] <= c["total_upload_bytes_f32"] <= hi * c["clients"]
    # Client ids < 128 are one-byte msgpack ints: all messages equally long.
    if c["clients"] <= 128:
      assert lo == hi
      assert c["total_upload_bytes_f32"] == c["clients"] * f32
      assert c["total_upload_bytes_bf16"] == c["clients"] * bf16


@pytest.mark.slow  # runs the scale check script in a subprocess
def test_summary_matches_cases(quick):
  s = quick["summary"]
  at = {(c["clients"], c["iterations"]): c for c in quick["cases"]}
  ks, ts = sorted(quick["clients"]), sorted(quick["iterations"])
  growth = lambda k, t: at[(k, t)]["peak_minus_baseline_kib"]
  for k in ks:
    entry = s["by_clients"][str(k)]
    ratio = entry[f"rss_growth_T{ts[-1]}_over_T{ts[0]}"]
    assert ratio == pytest.approx(growth(k, ts[-1]) / growth(k, ts[0]),
                                  rel=1e-3)
    assert entry["independent_of_T"] == (
        ratio <= scale_check.T_INDEPENDENCE_TOLERANCE)
  for t in ts:
    entry = s["by_iterations"][str(t)]
    assert entry[f"growth_K{ks[-1]}_over_K{ks[0]}"] == pytest.approx(
        growth(ks[-1], t) / growth(ks[0], t), rel=1e-3)
    for k in ks:
      assert entry["client_data_bytes"][str(k)] == at[(k, t)][
          "client_data_bytes"]


def test_summarize_flags_growth_with_t():
  case = lambda k, t, g: {"clients": k, "iterations": t,
                          "peak_minus_baseline_kib": g,
                          "client_data_bytes": 1, "total_upload_bytes_f32": 1}
  s = scale_check.summarize([case(10, 8, 100), case(10, 32, 400),
                             case(20, 8, 100), case(20, 32, 110)])
  assert s["by_clients"]["10"]["rss_growth_T32_over_T8"] == 4.0
  assert not s["by_clients"]["10"]["independent_of_T"]
  assert s["by_clients"]["20"]["independent_of_T"]
  assert s["by_iterations"]["32"]["growth_K20_over_K10"] == 0.275


def test_search_min_size_falls_back_to_smaller_sizes():
  labels = np.repeat(np.arange(2), 10)
  # 20 samples cannot give 4 clients 10 each, nor (with alpha 0.01 and one
  # class mostly to one client) 5 each; it must settle on a smaller size.
  part, min_size, rejected = scale_check.search_min_size(
      labels, 4, alpha=0.01, seed=0, num_classes=2)
  assert 10 in rejected and min_size not in rejected
  assert rejected == [m for m in scale_check.MIN_SIZE_CANDIDATES
                      if m > min_size]
  assert part.client_sizes().min() >= min_size
  assert part.client_sizes().sum() == 20


def test_msgpack_int_width_matches_header_growth():
  # The per-id message size formula assumes ids only change msgpack's
  # integer width: 1 byte below 128, 2 below 256, 3 below 65536.
  assert [scale_check._msgpack_int_len(v) for v in (0, 127, 128, 255, 256,
                                                    999)] == [1, 1, 2, 2, 3, 3]
  assert len(msgpack.packb({"client_id": 999})) - len(
      msgpack.packb({"client_id": 5})) == 2


@pytest.mark.parametrize("argv", [["--width=0"], ["--t-chunk=0"],
                                  ["--alpha=0"], ["--clients=0,4"],
                                  ["--iterations=x"]])
def test_bad_arguments_are_rejected(argv):
  f = flags.FlagValues()
  scale_check.define_flags(f)
  with pytest.raises(flags.IllegalFlagValueError):
    f(["scale_check.py", *argv])


def test_flags_fill_in_the_sizes_defaults():
  f = flags.FlagValues()
  scale_check.define_flags(f)
  f(["scale_check.py", "--quick", "--clients=5,7", "--t-chunk=3"])
  s = scale_check.settings(f)
  assert (s.clients, s.iterations, s.width, s.dataset, s.t_chunk) == (
      (5, 7), scale_check.QUICK["iterations"], scale_check.QUICK["width"],
      scale_check.QUICK["dataset"], 3)

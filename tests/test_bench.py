"""experiments/bench.py: the quick run's JSON document, and benchlib's helpers.

The quick benchmark runs once (module fixture) in a subprocess, as CI would
run it; the checks are on structure and on numbers being positive and
finite, never on timing thresholds (the machine is shared).
"""

import math

import pytest

from experiments.benchlib import cases
from experiments.benchlib import driver
from experiments.benchlib import gpu
from experiments.benchlib import measure
from tests import test_provenance


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(quick_script_json):
  return quick_script_json("experiments/bench.py", timeout=900)


@pytest.mark.slow  # runs the benchmark script in subprocesses
def test_quick_covers_every_case(quick):
  names = {c["name"] for c in quick["client_pass"]}
  expected = {cases.client_case_name(ds, k, t, d)
              for ds in cases.DATASETS for k in cases.QUICK["clients"]
              for t in cases.QUICK["iterations"] for d in (1, 4)}
  assert names == expected
  assert {s["name"] for s in quick["server_step"]} == {
      f"server_{ds}" for ds in cases.DATASETS}
  assert quick["sizes"] == "quick"
  assert quick["schema_version"] == cases.SCHEMA_VERSION
  test_provenance.check_record(quick["provenance"])
  assert quick["provenance"]["command"].startswith("experiments/bench.py")


@pytest.mark.slow  # runs the benchmark script in subprocesses
def test_client_cases_are_positive_finite_and_consistent(quick):
  peak = quick["matmul_peak"]["cpu"]
  assert _positive(peak["gflops"])
  assert peak["flops_per_call"] == peak["flops_expected"]  # XLA: 2 n^3
  assert peak["best_s"] == min(peak["times_s"])
  for c in quick["client_pass"]:
    for key in ("images_networks_per_s", "gflops", "matmul_peak_gflops",
                "fraction_of_matmul_peak", "client_pass_s", "flops_per_image",
                "embed_only_flops_per_image", "seconds_per_iteration"):
      assert _positive(c[key]), (c["name"], key, c[key])
    assert c["method"] == "extrapolated"
    assert 0 < c["measured_fraction_of_pass"] <= 1
    # Ratios and rates are what they claim to be.
    assert math.isclose(c["fraction_of_matmul_peak"],
                        c["gflops"] / c["matmul_peak_gflops"], rel_tol=1e-9)
    w = c["workload"]
    assert math.isclose(
        c["images_networks_per_s"],
        w["images_per_iteration"] / c["seconds_per_iteration"], rel_tol=1e-9)
    assert math.isclose(c["client_pass_s"],
                        c["seconds_per_iteration"] * c["num_iterations"],
                        rel_tol=1e-9)
    # The embedding is most of a sample's FLOPs; DSA and sums add a little.
    assert c["embed_only_flops_per_image"] <= c["flops_per_image"]
    assert w["devices"] == c["devices"]
    assert sum(b["real_clients"] * b["count"] for b in w["blocks"]) == (
        c["num_clients"])
    m = c["measurement"]
    assert m["single_trace"] and m["traces_after_warmup"] == 0
    assert m["compiles_after_warmup"] == 0 and m["traces_during_warmup"] >= 1
    # Every block of a pass has the same shapes: one compilation.
    assert m["jit_cache_size"] in (None, 1)
    assert len(m["chunks"]) >= cases.QUICK["timed_chunks"]
    assert all(_positive(ch["seconds"]) for ch in m["chunks"])
    assert _positive(m["linearity"]["median_s"])


@pytest.mark.slow  # runs the benchmark script in subprocesses
def test_multi_device_cases_ran_on_four_devices(quick):
  multi = [c for c in quick["client_pass"] if c["name"].endswith("_d4")]
  assert multi and all(c["devices"] == 4 for c in multi)
  assert len(quick["multi_device"]["devices_seen"]) == 4
  assert _positive(quick["multi_device"]["peak_rss_mb"])


@pytest.mark.slow  # runs the benchmark script in subprocesses
def test_server_end_to_end_rss_and_summary(quick):
  for s in quick["server_step"]:
    assert all(_positive(t) for t in s["step_times_s"])
    assert s["finite_losses"]
    assert all(_positive(v) for v in s["server_phase_s_extrapolated"].values())
  assert quick["embed_reference"]
  for r in quick["embed_reference"]:
    assert _positive(r["images_per_s"]) and _positive(r["gflops"])
    assert _positive(r["fraction_of_matmul_peak"])
  e2e = quick["end_to_end"]
  assert e2e["reduced_budget"] is True
  for phase in ("setup", "local_distill", "client_stats", "server",
                "evaluate", "total"):
    assert _positive(e2e["phases_s"][phase]), phase
  assert all(_positive(v) for v in quick["peak_rss_mb"].values())
  assert quick["environment"]["backend"] in ("cpu", "gpu", "tpu")
  assert quick["environment"]["devices"]
  s = quick["summary"]
  assert _positive(s["client_pass_fraction_of_matmul_peak"])
  assert s["client_pass_case"].startswith("fmnist_") and s[
      "client_pass_case"].endswith("_d1")
  assert isinstance(s["meets_target"], bool)
  assert s["single_trace_all_cases"] is True
  gpu = quick["gpu"]
  assert gpu["status"] in ("skipped", "measured")
  if gpu["status"] == "skipped":
    assert gpu["reason"] and gpu["skipped_cases"]


def test_linearity_flags_a_step_above_trend():
  flat = measure.linearity([1.0, 1.02, 0.98, 1.0])
  assert flat["no_step_above_trend"]
  assert flat["cumulative_fit"]["max_abs_residual_s"] < 0.05
  step = measure.linearity([1.0, 1.0, 2.0, 1.0])
  assert not step["no_step_above_trend"]
  assert step["max_over_median"] == pytest.approx(2.0)


def test_case_selection():
  names = cases.all_case_names(cases.FULL)
  assert "fmnist_k1000_t1000_d4" in names and "e2e_default" in names
  assert "cifar10_k10_t100_gpu" in names
  pats = cases.parse_patterns("fmnist_k10_*, server_*")
  assert cases.selected("fmnist_k10_t100_d1", pats)
  assert cases.selected("server_cifar10", pats)
  assert not cases.selected("fmnist_k100_t100_d1", pats)
  with pytest.raises(ValueError, match="--cases"):
    cases.parse_patterns(" , ")
  with pytest.raises(ValueError, match="selects none"):
    driver.run(driver.Options(quick=True, cases="nothing_matches"))
  with pytest.raises(ValueError, match="--embed-batch must be >= 1"):
    driver.resolve_sizes(driver.Options(embed_batch=0))


@pytest.mark.slow  # runs the benchmark script in subprocesses
def test_pass_time_charges_the_host_to_device_copies(quick):
  for c in quick["client_pass"]:
    T, copies = c["num_iterations"], c["host_to_device_copies"]
    blocks = sum(b["count"] for b in c["workload"]["blocks"])
    # One copy per pass for a single block, else one per block and call.
    expect = 1 if blocks == 1 else blocks * math.ceil(T / c["pipeline_t_chunk"])
    assert copies == expect, (c["name"], copies, expect)
    assert math.isclose(
        c["client_pass_s"],
        c["compute_seconds_per_iteration"] * T
        + copies * c["workload"]["host_to_device_s_per_block"], rel_tol=1e-9)


@pytest.fixture(scope="module")
def accel_dry_run(quick_script_json):
  """The GPU cases' code path, run on the CPU (``--accelerator=cpu``)."""
  return quick_script_json("experiments/bench.py", 900, "--accelerator=cpu",
                           "--cases=fmnist_*_gpu*,server_fmnist_gpu_bf16")


@pytest.mark.slow  # runs the benchmark script in subprocesses
def test_gpu_cases_compare_each_precision_with_its_own_matmul(accel_dry_run):
  doc = accel_dry_run
  assert doc["gpu"]["status"] == "measured"
  peaks = doc["matmul_peak"]["gpu"]
  assert {k: v["precision"] for k, v in peaks.items()} == {
      "tf32": "default", "fp32": "highest", "bf16": "default"}
  assert peaks["bf16"]["dtype"] == "bfloat16"
  names = {c["name"] for c in doc["client_pass"]}
  assert names == {cases.client_case_name("fmnist", k, t, "gpu", v)
                   for k in cases.ACCEL_QUICK["clients"]
                   for t in cases.QUICK["iterations"] for v in cases.VARIANTS}
  for c in doc["client_pass"]:
    variant = c["name"].split("_gpu", 1)[1]
    kind = {"": "tf32", "_fp32": "fp32", "_bf16": "bf16"}[variant]
    assert c["matmul_peak_kind"] == kind
    assert c["matmul_peak_gflops"] == peaks[kind]["gflops"]
    assert c["workload"]["compute_dtype"] == cases.VARIANTS[variant][0]
    assert c["workload"]["t_chunk"] == cases.ACCEL_QUICK["t_chunk"]
    assert c["measurement"]["single_trace"]
  assert [s["name"] for s in doc["server_step"]] == ["server_fmnist_gpu_bf16"]
  assert doc["server_step"][0]["compute_dtype"] == "bfloat16"
  assert _positive(doc["gpu"]["copy_bandwidth"]["gbytes_per_s"])
  head = doc["summary"]["gpu_cases"]
  assert _positive(head["bf16_speedup_over_default"])


def test_accuracy_effect_pairs_the_evaluation_nets():
  ref = {"name": "a", "accuracies": [0.70, 0.72, 0.71], "accuracy_mean": 0.71,
         "accuracy_std": 0.01}
  other = {"name": "b", "accuracies": [0.71, 0.72, 0.73],
           "accuracy_mean": 0.72, "accuracy_std": 0.01}
  e = gpu.accuracy_effect(ref, other)
  assert e["paired_differences"] == pytest.approx([0.01, 0.0, 0.02])
  assert e["mean_difference"] == pytest.approx(0.01)
  assert e["std_difference"] == pytest.approx(0.01)
  assert (e["reference"], e["other"]) == ("a", "b")

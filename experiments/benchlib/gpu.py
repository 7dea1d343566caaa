"""GPU cases: the client pass in three precisions, references, accuracy.

Skipped (and recorded as such) without a GPU. Each variant of the client
pass is compared with a matmul of the same precision timed on the same GPU;
the full default config runs once per variant, so that their accuracies
give bfloat16's (and TF32's) effect.
"""

import concurrent.futures

import numpy as np

from experiments.benchlib import cases
from experiments.benchlib import client_pass
from experiments.benchlib import measure
from experiments.benchlib import runs

# Dense (no sparsity) tensor-core and FP32 rates of the SXM cards, from
# NVIDIA's H100/H200 datasheet, in GFLOP/s: a reference beside the measured
# matmul peaks, which are what the ratios use.
DATASHEET_GFLOPS = {
    "H100": {"fp32": 67e3, "tf32": 494.5e3, "bf16": 989e3},
    "H200": {"fp32": 67e3, "tf32": 494.5e3, "bf16": 989e3},
}
# Which matmul peak (and datasheet rate) each variant is compared with.
VARIANT_PEAK = {"": "tf32", "_fp32": "fp32", "_bf16": "bf16"}


def datasheet_for(device):
  """The datasheet rates of ``device``'s card, or None if not listed."""
  kind = getattr(device, "device_kind", "")
  for name, rates in DATASHEET_GFLOPS.items():
    if name in kind:
      return {"card": kind, "source": "NVIDIA H100/H200 SXM datasheet, dense",
              "gflops": rates}
  return None


def accuracy_effect(ref, other):
  """``other`` run's accuracy minus ``ref``'s; both evaluate the same nets."""
  a, b = ref.get("accuracies"), other.get("accuracies")
  out = {"reference": ref["name"], "reference_mean": ref.get("accuracy_mean"),
         "reference_std": ref.get("accuracy_std"), "other": other["name"],
         "other_mean": other.get("accuracy_mean"),
         "other_std": other.get("accuracy_std")}
  if a and b and len(a) == len(b):
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    # Evaluation nets are seeded alike in both runs, so differences pair.
    out.update(paired_differences=d.tolist(), mean_difference=float(d.mean()),
               std_difference=float(d.std(ddof=1)) if d.size > 1 else None)
  return out


def references(sizes, accel, device, result, gpu):
  """Matmul peaks (TF32, FP32, BF16), copy bandwidth and bare embeddings."""
  n, reps = accel["matmul_n"], sizes["matmul_reps"]
  peaks = {"tf32": measure.matmul_peak(device, n, reps),
           "fp32": measure.matmul_peak(device, n, reps, precision="highest"),
           "bf16": measure.matmul_peak(device, n, reps, dtype="bfloat16")}
  result["matmul_peak"]["gpu"] = peaks
  for k, v in peaks.items():
    cases.log(f"GPU matmul {k}: {v['gflops']:.0f} GFLOP/s")
  gpu["copy_bandwidth"] = measure.copy_bandwidth(device, accel["copy_values"],
                                                 reps)
  cases.log(f"GPU copy: {gpu['copy_bandwidth']['gbytes_per_s']:.0f} GB/s")
  gpu["embed_reference"] = []
  for ds in cases.DATASETS:
    for dtype, kind in (("float32", "tf32"), ("bfloat16", "bf16")):
      for batch in accel["embed_probe_batches"]:
        r = measure.embed_reference(cases.make_spec(ds, accel, dtype), batch,
                                    device, reps)
        r.update(dataset=ds, matmul_peak_kind=kind,
                 fraction_of_matmul_peak=r["gflops"] / peaks[kind]["gflops"])
        gpu["embed_reference"].append(r)
        cases.log(f"GPU bare embedding {ds} {dtype} batch {batch}: "
                  f"{r['images_per_s']:.0f} images/s, "
                  f"{r['gflops']:.0f} GFLOP/s")
  return peaks


def _end_to_end_runs(sizes, accel, runs_by_suffix, device):
  """The full default config once per variant, concurrently."""
  # The runs share the GPU at the same time: mostly compilation (one CPU
  # core each) and small steps, so together they take about as long as
  # one. Their wall times are therefore upper bounds, not benchmarks; their
  # accuracies are what they are for.
  cases.log(f"{', '.join(runs_by_suffix.values())}: full default config on "
            f"{device.platform}, concurrently")

  def launch(suffix):
    dtype, precision = cases.VARIANTS[suffix]
    env = ({"JAX_DEFAULT_MATMUL_PRECISION": precision} if precision
           else None)
    out = runs.e2e_case(sizes, runs_by_suffix[suffix],
                        tuple(accel["e2e_overrides"]) +
                        (("compute_dtype", dtype),), False, env)
    out["matmul_precision"] = precision or "default"
    return out

  with concurrent.futures.ThreadPoolExecutor(len(runs_by_suffix)) as pool:
    futures = {s: pool.submit(launch, s) for s in runs_by_suffix}
    return {s: f.result() for s, f in futures.items()}


def end_to_end(sizes, accel, patterns, device, result, gpu):
  """The selected ``e2e_default_gpu*`` runs and their accuracy effects."""
  # One default run per client-pass variant; a variant's matmul precision
  # reaches the child as JAX_DEFAULT_MATMUL_PRECISION.
  names = {suffix: f"e2e_default_gpu{suffix}" for suffix in cases.VARIANTS
           if cases.selected(f"e2e_default_gpu{suffix}", patterns)}
  e2e = _end_to_end_runs(sizes, accel, names, device) if names else {}
  for suffix, run in e2e.items():
    run["ran_concurrently_with"] = sorted(set(names.values()) - {names[suffix]})
    result.setdefault("end_to_end_gpu", []).append(run)
    cases.log(f"  {names[suffix]}: accuracy {run['accuracy_mean']}, "
              f"phases {run['phases_s']}")
  # Against XLA's default float32 (TF32 on the GPU) and strict float32.
  effect = {f"bf16_vs{ref or '_default'}": accuracy_effect(e2e[ref],
                                                           e2e["_bf16"])
            for ref in ("", "_fp32") if ref in e2e and "_bf16" in e2e}
  if "" in e2e and "_fp32" in e2e:
    effect["default_vs_fp32"] = accuracy_effect(e2e["_fp32"], e2e[""])
  if effect:
    gpu["accuracy_effects"] = effect
  return bool(e2e)


def run_gpu_cases(sizes, accel, patterns, device, result, flush):
  """Every selected GPU case, most informative first; ``flush`` saves."""
  gpu = {"status": "measured", "device": str(device),
         "device_kind": getattr(device, "device_kind", ""),
         "platform": device.platform, "sizes": {
             k: v for k, v in accel.items() if k != "e2e_overrides"},
         "datasheet": datasheet_for(device)}
  result["gpu"] = gpu
  peaks = references(sizes, accel, device, result, gpu)
  flush()

  def add(entries):
    for e in entries:
      key = VARIANT_PEAK[e["name"].split("_gpu", 1)[1]]
      e["matmul_peak_kind"] = key
      e["fraction_of_fp32_matmul_peak"] = (
          e["gflops"] / peaks["fp32"]["gflops"])
      if gpu["datasheet"]:
        e["fraction_of_datasheet_peak"] = (
            e["gflops"] / gpu["datasheet"]["gflops"][key])
    result["client_pass"].extend(entries)
    flush()

  def client(clients):
    for variant in cases.VARIANTS:
      client_pass.run_client_cases(
          dict(accel, clients=clients), patterns, "gpu", [device],
          peaks[VARIANT_PEAK[variant]]["gflops"], variant, on_case=add)

  # The headline shape first, then bfloat16's accuracy effect, then scale.
  client(accel["clients"][:1])
  if end_to_end(sizes, accel, patterns, device, result, gpu):
    flush()
  client(accel["clients"][1:])
  for ds in cases.DATASETS:
    for suffix, dtype in (("", "float32"), ("_bf16", "bfloat16")):
      name = f"server_{ds}_gpu{suffix}"
      if cases.selected(name, patterns):
        result["server_step"].append(runs.server_case(
            ds, dict(sizes, server_steps=accel["server_steps"]),
            sizes["iterations"], name, dtype, device))
        flush()


def summarize_gpu(result):
  """The GPU part of the summary: headline cases, speed-up, accuracy."""
  gpu_cases = [c for c in result["client_pass"] if "_gpu" in c["name"]]
  if not gpu_cases:
    return None
  head = min(gpu_cases, key=lambda c: (c["num_clients"], c["num_iterations"]))
  out = {"fraction_of_matmul_peak_by_case": {
             c["name"]: c["fraction_of_matmul_peak"] for c in gpu_cases},
         "images_networks_per_s_by_case": {
             c["name"]: c["images_networks_per_s"] for c in gpu_cases}}
  for c in gpu_cases:
    if (c["dataset"], c["num_clients"], c["num_iterations"]) == (
        head["dataset"], head["num_clients"], head["num_iterations"]):
      suffix = c["name"].split("_gpu", 1)[1] or "_default"
      out[f"headline{suffix}"] = _headline(c)
  if "headline_bf16" in out and "headline_default" in out:
    out["bf16_speedup_over_default"] = (
        out["headline_bf16"]["images_networks_per_s"] /
        out["headline_default"]["images_networks_per_s"])
  effect = result["gpu"].get("accuracy_effects")
  if effect:
    out["accuracy_effects"] = {
        k: {"mean_difference": v.get("mean_difference"),
            "std_difference": v.get("std_difference"),
            "reference_mean": v["reference_mean"],
            "other_mean": v["other_mean"]} for k, v in effect.items()}
  bw = result["gpu"].get("copy_bandwidth")
  if bw:
    out["copy_gbytes_per_s"] = bw["gbytes_per_s"]
  return out


def _headline(c):
  return {"case": c["name"],
          "images_networks_per_s": c["images_networks_per_s"],
          "gflops": c["gflops"],
          "fraction_of_matmul_peak": c["fraction_of_matmul_peak"],
          "matmul_peak_kind": c.get("matmul_peak_kind"),
          "fraction_of_fp32_matmul_peak": c.get(
              "fraction_of_fp32_matmul_peak"),
          "fraction_of_datasheet_peak": c.get("fraction_of_datasheet_peak")}

"""The benchmark run: which cases, in what order, into one JSON document.

``run(Options(...))`` is what ``experiments/bench.py`` calls; it returns
the document (``SCHEMA_VERSION``; a run cut short keeps what it measured in
``Options.out``, written after every GPU case).
"""

import dataclasses
import json
import os
import pathlib
import time
from typing import Optional, Sequence

import jax

from collabdm_jax import provenance
from experiments.benchlib import cases
from experiments.benchlib import client_pass
from experiments.benchlib import gpu as gpu_lib
from experiments.benchlib import measure
from experiments.benchlib import runs


@dataclasses.dataclass(frozen=True)
class Options:
  """What ``experiments/bench.py``'s flags ask for (see their help)."""
  quick: bool = False
  cases: str = "*"
  embed_batch: Optional[int] = None
  out: Optional[str] = None
  accel_embed_batch: Optional[int] = None
  accelerator: str = "gpu"
  devices: Optional[int] = None  # set by the parent for its 4-device child
  matmul_gflops: Optional[float] = None  # the parent's peak, for the child
  flops_per_image: Optional[str] = None  # the parent's counts (JSON)
  command: Sequence[str] = ("experiments/bench.py",)  # for provenance


def resolve_sizes(o: Options):
  """``(sizes, sizes_name, accel, patterns, names)`` of the options.

  Raises:
    ValueError: a batch below 1, or ``cases`` that select no case.
  """
  sizes = dict(cases.QUICK if o.quick else cases.FULL)
  if o.embed_batch is not None:
    if o.embed_batch < 1:
      raise ValueError(f"--embed-batch must be >= 1, got {o.embed_batch}")
    sizes["embed_batch"] = o.embed_batch
  accel = dict(cases.ACCEL_QUICK if o.quick else cases.ACCEL)
  if o.accel_embed_batch is not None:
    if o.accel_embed_batch < 1:
      raise ValueError("--accel-embed-batch must be >= 1, got "
                       f"{o.accel_embed_batch}")
    accel["embed_batch"] = o.accel_embed_batch
    accel["e2e_overrides"] = tuple(
        (k, o.accel_embed_batch if k == "stats.embed_batch" else v)
        for k, v in accel["e2e_overrides"])
  accel = dict(sizes, **accel)
  patterns = cases.parse_patterns(o.cases)
  names = cases.all_case_names(sizes, accel)
  if not any(cases.selected(n, patterns) for n in names):
    raise ValueError(f"--cases={o.cases!r} selects none of {names}")
  return sizes, "quick" if o.quick else "full", accel, patterns, names


def run_child(o: Options, sizes, patterns):
  """The 4-device child: only the multi-device client cases."""
  if o.matmul_gflops is None:
    raise ValueError("--devices needs --matmul-gflops (set by the parent)")
  for ds, counts in json.loads(o.flops_per_image or "{}").items():
    measure.set_flops_per_image(cases.make_spec(ds, sizes), counts)
  devices = jax.devices("cpu")
  if len(devices) < o.devices:
    raise ValueError(f"--devices={o.devices} but JAX sees "
                     f"{len(devices)} CPU devices")
  found = client_pass.run_client_cases(sizes, patterns, o.devices,
                                       devices[:o.devices], o.matmul_gflops)
  return {"client_pass": found, "environment": measure.environment(),
          "peak_rss_mb": measure.peak_rss_mb()}


def _cpu_cases(result, sizes, sizes_name, patterns, names, cpu_peak):
  """The end-to-end run, then the client pass on 1 and 4 CPU devices."""
  cpu = jax.devices("cpu")[0]
  # The end-to-end run goes first so that the children's peak RSS is its own.
  result["end_to_end"] = (runs.e2e_case(sizes) if cases.selected(
      "e2e_default", patterns) else None)
  result["client_pass"] = client_pass.run_client_cases(sizes, patterns, 1,
                                                       [cpu], cpu_peak)
  multi = [n for n in names if n.endswith(f"_d{cases.MULTI_DEVICES}")
           and cases.selected(n, patterns)]
  result["multi_device"] = {
      "devices": cases.MULTI_DEVICES,
      "simulated_with": "--xla_force_host_platform_"
                        f"device_count={cases.MULTI_DEVICES}"}
  if multi:
    child = client_pass.run_multi_device_child(sizes_name, sizes, patterns,
                                               cpu_peak)
    result["client_pass"] += child["client_pass"]
    result["multi_device"].update(peak_rss_mb=child["peak_rss_mb"],
                                  devices_seen=child["environment"]["devices"])


def _gpu_cases(o: Options, result, sizes, accel, patterns, names, flush):
  """The GPU cases, or why there are none."""
  gpu_names = [n for n in names if "_gpu" in n and cases.selected(n, patterns)]
  gpus = [d for d in jax.devices() if d.platform == o.accelerator]
  result["server_step"] = []
  if not gpu_names:
    result["gpu"] = {"status": "not selected"}
  elif not gpus:
    result["gpu"] = {"status": "skipped", "reason": "no GPU visible to JAX "
                     f"(backend {jax.default_backend()})",
                     "skipped_cases": gpu_names}
  else:
    gpu_lib.run_gpu_cases(sizes, accel, patterns, gpus[0], result, flush)


def _cpu_references(result, sizes, patterns, cpu_peak):
  """The matmul peak again (the run's best is used), bare embeddings and
  the server step on the CPU."""
  cpu = jax.devices("cpu")[0]
  # The practical peak is the best matmul of the run: measured again at the
  # end, so a busy moment at the start does not flatter the ratios.
  end_peak = measure.matmul_peak(cpu, sizes["matmul_n"], sizes["matmul_reps"])
  result["matmul_peak"]["cpu_end"] = end_peak
  cpu_peak = max(cpu_peak, end_peak["gflops"])
  result["matmul_peak"]["cpu_practical_peak_gflops"] = cpu_peak
  for c in result["client_pass"]:
    if c["backend"] == "cpu" and "_gpu" not in c["name"]:
      c["matmul_peak_gflops"] = cpu_peak
      c["fraction_of_matmul_peak"] = c["gflops"] / cpu_peak
  result["embed_reference"] = []
  for ds in cases.DATASETS:
    if any(c["dataset"] == ds and c["backend"] == "cpu"
           and "_gpu" not in c["name"] for c in result["client_pass"]):
      for batch in sizes["embed_probe_batches"]:
        r = measure.embed_reference(cases.make_spec(ds, sizes), batch, cpu,
                                    sizes["matmul_reps"])
        r.update(dataset=ds, fraction_of_matmul_peak=r["gflops"] / cpu_peak)
        result["embed_reference"].append(r)
        cases.log(f"bare embedding {ds} batch {batch}: "
                  f"{r['images_per_s']:.0f} images/s = "
                  f"{100 * r['fraction_of_matmul_peak']:.1f}% of peak")
  result["server_step"] += [
      runs.server_case(ds, sizes, sizes["iterations"])
      for ds in cases.DATASETS if cases.selected(f"server_{ds}", patterns)]


def _close(result, wall0):
  """Peak memory, end load, provenance and the summary."""
  result["peak_rss_mb"] = {"bench_process": measure.peak_rss_mb()}
  if result["end_to_end"] is not None:
    result["peak_rss_mb"]["end_to_end_run"] = result["end_to_end"][
        "peak_rss_mb"]
  if "peak_rss_mb" in result["multi_device"]:
    result["peak_rss_mb"]["multi_device_child"] = result["multi_device"][
        "peak_rss_mb"]
  result["environment"]["load_average_end"] = list(os.getloadavg())
  result["provenance"] = provenance.finish(result["provenance"])
  result["bench_wall_s"] = time.perf_counter() - wall0
  result["complete"] = True
  result["summary"] = s = summarize(result)
  if "client_pass_fraction_of_matmul_peak" in s:
    verdict = "meets" if s["meets_target"] else "MISSES"
    cases.log(
        f"client pass at {100 * s['client_pass_fraction_of_matmul_peak']:.1f}"
        f"% of matmul peak ({s['client_pass_case']}): {verdict} the "
        f"{100 * cases.TARGET_FRACTION:.0f}% target")


def run(o: Options):
  """The whole benchmark (or the 4-device child's part); the document."""
  # Every process on the GPU (this one and the end-to-end children) takes
  # memory as it needs it, rather than 75% of the card each.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  sizes, sizes_name, accel, patterns, names = resolve_sizes(o)
  if o.devices is not None:
    return run_child(o, sizes, patterns)
  wall0 = time.perf_counter()
  result = {"schema_version": cases.SCHEMA_VERSION, "sizes": sizes_name,
            "embed_batch": sizes["embed_batch"], "cases_pattern": o.cases,
            "environment": measure.environment(),
            "provenance": provenance.start(list(o.command)),
            "complete": False}

  def flush():
    """Saves what is measured so far (a run cut short keeps its cases)."""
    if o.out:
      pathlib.Path(o.out).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(o.out).write_text(json.dumps(result, indent=2) + "\n")

  cpu = jax.devices("cpu")[0]
  cases.log(f"matmul peak on {cpu}")
  result["matmul_peak"] = {"cpu": measure.matmul_peak(
      cpu, sizes["matmul_n"], sizes["matmul_reps"])}
  cpu_peak = result["matmul_peak"]["cpu"]["gflops"]
  cases.log(f"  {cpu_peak:.1f} GFLOP/s")
  _cpu_cases(result, sizes, sizes_name, patterns, names, cpu_peak)
  _gpu_cases(o, result, sizes, accel, patterns, names, flush)
  _cpu_references(result, sizes, patterns, cpu_peak)
  _close(result, wall0)
  flush()
  return result


def summarize(result):
  """Headline of the CPU client pass against its target, and checks."""
  cpu_cases = [c for c in result["client_pass"]
               if c["dataset"] == "fmnist" and c["backend"] == "cpu"
               and c["devices"] == 1 and "_gpu" not in c["name"]]
  summary = {"target_fraction_of_matmul_peak": cases.TARGET_FRACTION}
  if cpu_cases:
    # Headline: the default config's shape (fewest clients, shortest run).
    head = min(cpu_cases,
               key=lambda c: (c["num_clients"], c["num_iterations"]))
    summary.update({
        "client_pass_fraction_of_matmul_peak": head["fraction_of_matmul_peak"],
        "client_pass_case": head["name"],
        "client_pass_gflops": head["gflops"],
        "client_pass_images_networks_per_s": head["images_networks_per_s"],
        "matmul_peak_gflops": head["matmul_peak_gflops"],
        "meets_target": (head["fraction_of_matmul_peak"] >=
                         cases.TARGET_FRACTION),
        "fmnist_cpu_fraction_by_case": {
            c["name"]: c["fraction_of_matmul_peak"] for c in cpu_cases},
    })
  lin = [c["measurement"]["linearity"]["no_step_above_trend"]
         for c in result["client_pass"]]
  summary["all_chunks_on_trend"] = all(lin) if lin else None
  summary["single_trace_all_cases"] = all(
      c["measurement"]["single_trace"] for c in result["client_pass"])
  summary["all_client_cases_extrapolated"] = all(
      c["method"] == "extrapolated" for c in result["client_pass"])
  summary["gpu"] = result["gpu"].get("status")
  gpu = gpu_lib.summarize_gpu(result)
  if gpu is not None:
    summary["gpu_cases"] = gpu
  return summary

"""Where the client pass spends its time on a GPU, and what each fix buys.

Made for a short lease of one GPU (issue #11, item 5); one call does all of

  XLA_PYTHON_CLIENT_PREALLOCATE=false COLLABDM_DATA_DIR=... \
      python -m experiments.gpu_profile --out_dir=$OUT

and writes, as it goes (a run cut short keeps what it measured):

* ``gpu_profile.json``: matmul peaks (TF32, strict float32, bf16) and copy
  bandwidth of the card; a ``jax.profiler`` trace of the 100-client
  Fashion-MNIST pass (the default config's statistics) summarised as the
  top GPU kernels and XLA ops with their share of GPU time, and how busy
  the GPU was over the traced calls; the bare ConvNet forward in variants
  that isolate each suspect (depth 1/2/3, no normalisation, one-pass
  instance norm, bf16); and the 100-client pass itself in each variant
  (``client_pass.measure_client_config``, the benchmark's own method);
* ``reference_gpu.json``: ``experiments/reference_bench.py`` on the card
  (the reference config end to end, GPU-sized embedding batches).

``--quick`` runs every section at toy sizes on whatever backend is there
(the CPU here), to check the script before spending device time.

One variant is not the library's code: ``onepass`` swaps ConvNet's
instance norm for one that takes the mean and the mean square in a single
pass over the activations (``E[x^2] - E[x]^2`` instead of PyTorch's
centred variance). It measures what that saving is worth before anyone
changes the networks that define the loss.
"""

import contextlib
import glob
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from collabdm_jax import dm
from collabdm_jax import models
from collabdm_jax import provenance
from experiments.benchlib import cases
from experiments.benchlib import client_pass
from experiments.benchlib import measure

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the JSON files go.")
_QUICK = flags.DEFINE_bool("quick", False, "Toy sizes, any backend.")
_CLIENTS = flags.DEFINE_integer("clients", 100, "Clients of the pass.")
_SKIP_REFERENCE = flags.DEFINE_bool(
    "skip_reference", False, "Leave out the end-to-end reference run.")
_REFERENCE_TIMEOUT = flags.DEFINE_integer(
    "reference_timeout_s", 240, "Limit of the end-to-end reference run.")

# Variants of the pass: name -> (embed batch, compute dtype, instance norm
# of blocks 2-3, first block fused). "conv" names the unfused first block.
PASS_VARIANTS = {
    "tf32_eb1024": (1024, "float32", "centred", False),
    "bf16_eb1024": (1024, "bfloat16", "centred", False),
    "tf32_eb4096": (4096, "float32", "centred", False),
    "bf16_eb4096": (4096, "bfloat16", "centred", False),
    "bf16_eb4096_onepass": (4096, "bfloat16", "onepass", False),
    "tf32_eb1024_fused": (1024, "float32", "centred", True),
    "tf32_eb4096_fused": (4096, "float32", "centred", True),
    "bf16_eb4096_fused": (4096, "bfloat16", "centred", True),
    "bf16_eb4096_fused_onepass": (4096, "bfloat16", "onepass", True),
}
# Bare forward: name -> (depth, norm, instance norm, dtype, fused).
BARE_CASES = {
    "depth3": (3, "instancenorm", "centred", "float32", False),
    "depth2": (2, "instancenorm", "centred", "float32", False),
    "depth1": (1, "instancenorm", "centred", "float32", False),
    "depth3_no_norm": (3, "none", "centred", "float32", False),
    "depth3_onepass": (3, "instancenorm", "onepass", "float32", False),
    "depth3_bf16": (3, "instancenorm", "centred", "bfloat16", False),
    "depth3_no_norm_bf16": (3, "none", "centred", "bfloat16", False),
    "depth3_onepass_bf16": (3, "instancenorm", "onepass", "bfloat16", False),
    "depth1_fused": (1, "instancenorm", "centred", "float32", True),
    "depth3_fused": (3, "instancenorm", "centred", "float32", True),
    "depth3_fused_bf16": (3, "instancenorm", "centred", "bfloat16", True),
    "depth3_fused_onepass_bf16": (3, "instancenorm", "onepass", "bfloat16",
                                  True),
}
_VARIANTS = flags.DEFINE_list("variants", list(PASS_VARIANTS),
                              "Pass variants to time.")
_BARE = flags.DEFINE_list("bare", list(BARE_CASES), "Bare-forward cases.")
_PROFILE = flags.DEFINE_string("profile", "tf32_eb1024",
                               "The pass variant traced by the profiler.")
_SUMMARISE = flags.DEFINE_string(
    "summarise_trace", None, "Only summarise the perfetto trace(s) under "
    "this folder (kernels, busy fraction per call) into --out_dir.")
VARIANT_PEAK = {"float32": "tf32", "bfloat16": "bf16"}


def log(msg):
  print(f"[gpu_profile {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
        flush=True)


class OnePassInstanceNorm(nn.Module):
  """Instance norm from one reduction pass: var = E[x^2] - E[x]^2.

  Same parameters (``scale``, ``bias``) and eps as ``models.InstanceNorm``;
  differs from it by float rounding only where the variance is not tiny
  against the squared mean (as for the random networks' activations).
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=(1, 2), keepdims=True)
    mean_sq = jnp.mean(jnp.square(xf), axis=(1, 2), keepdims=True)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    out = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return out.astype(x.dtype)


@contextlib.contextmanager
def instance_norm(kind):
  """ConvNet builds ``models.InstanceNorm`` by name: swap it for a variant."""
  original = models.InstanceNorm
  if kind == "onepass":
    models.InstanceNorm = OnePassInstanceNorm
  try:
    yield
  finally:
    models.InstanceNorm = original


def kernel_table(trace_root, top=15):
  """Top GPU kernels and XLA ops of the newest perfetto trace under a dir.

  Device events are those of processes whose name mentions a GPU; kernel
  events sit on threads named ``Stream ...``, XLA's op-level view on threads
  named ``XLA Ops``. Shares are of the summed durations of that kind; how
  busy the GPU was is measured per call (``busy_within_calls``).
  """
  paths = sorted(glob.glob(os.path.join(trace_root, "**",
                                        "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    return {"error": f"no perfetto trace under {trace_root}"}
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)["traceEvents"]
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  device_pids = {p for p, n in procs.items()
                 if "gpu" in n.lower() and "host" not in n.lower()}
  groups = {"kernels": {}, "xla_ops": {}}
  intervals = []
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in device_pids:
      continue
    thread = threads.get((e["pid"], e.get("tid")), "")
    kind = ("kernels" if thread.startswith("Stream") else
            "xla_ops" if thread.startswith("XLA Ops") else "other")
    if kind == "other":  # named by thread, in case the names differ
      groups.setdefault(kind, {})
      e = dict(e, name=f"{thread}: {e['name']}")
    dur = float(e.get("dur", 0.0))
    entry = groups[kind].setdefault(e["name"], {"us": 0.0, "calls": 0,
                                                "hlo_op": None})
    entry["us"] += dur
    entry["calls"] += 1
    args = e.get("args") or {}
    entry["hlo_op"] = entry["hlo_op"] or args.get("hlo_op")
    if kind == "kernels":
      intervals.append((float(e["ts"]), float(e["ts"]) + dur))
  out = {"trace_file": os.path.relpath(paths[-1], trace_root),
         "processes": sorted(procs.values()),
         "thread_names": sorted({threads[k] for k in threads
                                 if k[0] in device_pids})}
  for kind, table in groups.items():
    total = sum(v["us"] for v in table.values())
    rows = sorted(table.items(), key=lambda kv: -kv[1]["us"])[:top]
    out[kind] = {"total_ms": total / 1e3, "distinct": len(table), "top": [
        {"name": k[:200], "ms": v["us"] / 1e3, "calls": v["calls"],
         "share": v["us"] / total if total else None, "hlo_op": v["hlo_op"]}
        for k, v in rows]}
  if intervals:
    out.update(busy_within_calls(intervals))
  return out


def busy_within_calls(intervals, gap_us=2000.0):
  """How busy the GPU was while it worked on each call.

  Kernel intervals (start, end in us) are split into calls wherever the GPU
  idled longer than ``gap_us`` (host work between calls: building blocks,
  tracing); per call, busy = union of kernel time / span of the call.
  """
  intervals = sorted(intervals)
  calls, cur = [], [intervals[0]]
  for a, b in intervals[1:]:
    if a - max(e for _, e in cur) > gap_us:
      calls.append(cur)
      cur = []
    cur.append((a, b))
  calls.append(cur)
  rows = []
  for c in calls:
    busy, (lo, hi) = 0.0, c[0]
    for a, b in c[1:]:
      if a > hi:
        busy += hi - lo
        lo, hi = a, b
      else:
        hi = max(hi, b)
    busy += hi - lo
    span = max(b for _, b in c) - c[0][0]
    rows.append({"kernels": len(c), "span_ms": span / 1e3,
                 "busy_ms": busy / 1e3, "busy_fraction": busy / span
                 if span else None})
  main = [r for r in rows if r["kernels"] >= 100]
  return {"calls": rows, "busy_fraction_within_calls": float(np.median(
      [r["busy_fraction"] for r in main])) if main else None}


def pass_sizes(quick, embed_batch, fused, timed_chunks=None):
  """Sizes for ``client_pass.measure_client_config`` on the accelerator."""
  base = dict(cases.QUICK if quick else cases.FULL)
  accel = dict(cases.ACCEL_QUICK if quick else cases.ACCEL)
  sizes = dict(base, **accel)
  sizes["embed_batch"] = embed_batch
  sizes["model"] = dict(sizes["model"], fused_first_block=fused)
  if timed_chunks is not None:
    sizes["timed_chunks"] = timed_chunks
  return sizes


def measure_pass(name, quick, clients, device, peaks):
  embed_batch, dtype, norm, fused = PASS_VARIANTS[name]
  if quick:
    embed_batch = max(8, embed_batch // 64)
  variant = "_bf16" if dtype == "bfloat16" else ""
  sizes = pass_sizes(quick, embed_batch, fused)
  peak = peaks[VARIANT_PEAK[dtype]]["gflops"]
  # FLOPs are the plain network's, whatever the variant runs.
  plain = cases.make_spec("fmnist", pass_sizes(quick, embed_batch, False),
                          dtype)
  measure.set_flops_per_image(cases.make_spec("fmnist", sizes, dtype),
                              measure.flops_per_image(plain))
  with instance_norm(norm):
    entry = client_pass.measure_client_config("fmnist", clients, (100,), "gpu",
                                        sizes, [device], peak, variant)[0]
  entry.update(variant=name, instance_norm=norm, first_block_fused=fused,
               matmul_peak_kind=VARIANT_PEAK[dtype],
               fraction_of_tf32_matmul_peak=entry["gflops"]
               / peaks["tf32"]["gflops"])
  entry.pop("measurement", None)
  return entry


def profile_pass(name, quick, clients, device, peaks, trace_dir):
  """The default-precision pass run twice inside a profiler trace.

  The first measurement compiles (kept out of the trace by the persistent
  compilation cache the script turns on); the traced one times a few calls.
  """
  measure_pass(name, quick, clients, device, peaks)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    entry = measure_pass(name, quick, clients, device, peaks)
  table = kernel_table(trace_dir)
  trace = os.path.join(trace_dir, table["trace_file"])
  if os.path.getsize(trace) < 15 << 20:  # small enough to leave the lease
    shutil.copy(trace, os.path.join(os.path.dirname(trace_dir),
                                    "pass_trace.json.gz"))
  return entry, table


def bare_forward(quick, device, peaks, names):
  """The ConvNet forward alone, in variants that isolate each suspect."""
  batch = 64 if quick else 4096
  width = 8 if quick else 128
  rows = []
  for ds, shape in (("fmnist", (28, 28, 1)), ("cifar10", (32, 32, 3))):
    x = jax.device_put(np.random.default_rng(2).standard_normal(
        (batch,) + shape, np.float32), device)
    for name in names:
      depth, norm, impl, dtype, fused = BARE_CASES[name]
      model = models.make_model("convnet", 10, width=width, depth=depth,
                                norm=norm, fused_first_block=fused)
      plain = models.make_model("convnet", 10, width=width, depth=depth,
                                norm=norm)
      params = jax.device_put(dm.network_params(model, jax.random.key(0), 0,
                                                shape), device)
      cpu = jax.devices("cpu")[0]
      # FLOPs of the plain network, whatever the variant runs.
      flops = measure.flops_of(jax.jit(models.embed_fn(plain)).lower(
          jax.device_put(params, cpu), jax.device_put(x[:1], cpu)
      ).compile()) * batch
      with instance_norm(impl):
        f = jax.jit(models.embed_fn(model, dtype))
        times = measure.call_times(f, (params, x), 3 if quick else 20)
        got = np.asarray(f(params, x[:64]))
      ref = np.asarray(jax.jit(models.embed_fn(plain))(params, x[:64]))
      best = float(np.median(times))
      kind = VARIANT_PEAK[dtype]
      rows.append({"dataset": ds, "case": name, "batch": batch,
                   "first_block_fused": fused, "instance_norm": impl,
                   "compute_dtype": dtype, "median_s": best,
                   "times_s": times, "images_per_s": batch / best,
                   "gflops": flops / best / 1e9,
                   "fraction_of_matmul_peak": flops / best / 1e9
                   / peaks[kind]["gflops"], "matmul_peak_kind": kind,
                   "relative_error_vs_default_precision": float(
                       np.linalg.norm(got - ref) / np.linalg.norm(ref))})
      log(f"bare {ds} {name}: {best * 1e3:.2f} ms, "
          f"{rows[-1]['gflops']:.0f} GFLOP/s")
  return rows


def reference_run(out_dir, quick, timeout_s):
  config = "smoke" if quick else "reference"
  # --config before its overrides (absl's rule).
  cmd = [sys.executable, "-m", "experiments.reference_bench",
         f"--config=experiments/configs/{config}.py",
         "--config.stats.embed_batch=1024",
         f"--out={out_dir}/reference_gpu.json",
         "--matmul_n=" + ("512" if quick else "8192")]
  log(" ".join(cmd))
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"command": " ".join(cmd), "status": f"timed out ({timeout_s} s)"}
  pathlib.Path(out_dir, "reference_gpu.log").write_text(proc.stderr[-200000:])
  return {"command": " ".join(cmd), "returncode": proc.returncode,
          "wall_s": time.perf_counter() - t0}


def main(argv):
  del argv
  out_dir = pathlib.Path(_OUT_DIR.value or tempfile.mkdtemp())
  out_dir.mkdir(parents=True, exist_ok=True)
  if _SUMMARISE.value:
    (out_dir / "trace_summary.json").write_text(json.dumps(
        dict(kernel_table(_SUMMARISE.value), provenance=provenance.finish(
            provenance.start(["experiments/gpu_profile.py"] + sys.argv[1:]))),
        indent=2) + "\n")
    return
  quick = _QUICK.value
  # Recompiling a program already compiled in this run reads it back.
  cache = tempfile.mkdtemp(prefix="jax_cache_")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  device = jax.devices()[0]
  doc = {"provenance": provenance.start(["experiments/gpu_profile.py"]
                                        + sys.argv[1:]),
         "environment": measure.environment(), "device": str(device),
         "device_kind": device.device_kind, "quick": quick}
  path = out_dir / "gpu_profile.json"

  def flush():
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")

  n = 512 if quick else 8192
  doc["matmul_peak"] = peaks = {
      "tf32": measure.matmul_peak(device, n, 10),
      "fp32": measure.matmul_peak(device, n, 10, precision="highest"),
      "bf16": measure.matmul_peak(device, n, 10, dtype="bfloat16")}
  doc["copy_bandwidth"] = measure.copy_bandwidth(
      device, (1 << 20) if quick else (1 << 29), 10)
  log({k: round(v["gflops"]) for k, v in peaks.items()})
  flush()
  clients = 3 if quick else _CLIENTS.value
  entry, table = profile_pass(_PROFILE.value, quick, clients, device, peaks,
                              str(out_dir / "trace"))
  doc["profiled_pass"] = {"entry": entry, "trace": table}
  flush()
  for kind in ("kernels", "xla_ops"):
    for row in table.get(kind, {}).get("top", [])[:10]:
      log(f"{kind}: {row['share']:.1%} {row['calls']:6d}x {row['name'][:90]}")
  doc["bare_forward"] = bare_forward(quick, device, peaks, _BARE.value)
  flush()
  if not _SKIP_REFERENCE.value:
    doc["reference"] = reference_run(out_dir, quick,
                                     _REFERENCE_TIMEOUT.value)
    flush()
  doc["pass_variants"] = []
  for name in _VARIANTS.value:
    doc["pass_variants"].append(measure_pass(name, quick, clients, device,
                                             peaks))
    e = doc["pass_variants"][-1]
    log(f"pass {name}: {e['client_pass_s']:.2f} s per 100 iterations, "
        f"{e['fraction_of_tf32_matmul_peak']:.1%} of TF32 peak")
    flush()
  doc["provenance"] = provenance.finish(doc["provenance"])
  flush()
  print(json.dumps({"pass": {e["variant"]: round(
      e["fraction_of_tf32_matmul_peak"], 4) for e in doc["pass_variants"]},
      "busy": table.get("busy_fraction_within_calls")}))


if __name__ == "__main__":
  app.run(main)

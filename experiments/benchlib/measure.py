"""Measurement helpers: timings, peaks, FLOP counts, compile events.

Shared by ``experiments/bench.py`` and the probes (``sampling_probe.py``,
``reference_bench.py``).
"""

import contextlib
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from collabdm_jax import client as client_lib
from collabdm_jax import cpu_first_block
from collabdm_jax import dm
from collabdm_jax import models
from collabdm_jax import provenance

# A chunk whose time exceeds the median chunk by this factor is a step above
# the linear trend (reported, not fatal).
STEP_TOLERANCE = 1.25
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

peak_rss_mb = provenance.peak_rss_mb
cpu_model = provenance.cpu_model


def write_document(doc, out=None) -> str:
  """Prints a result document as indented JSON and writes it to ``out``
  (a path; its folder is created) when given. Returns the text."""
  text = json.dumps(doc, indent=2, default=str)
  if out:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
  print(text)
  return text


def flops_of(compiled):
  """``flops`` of XLA's cost analysis (a dict, or a list of one per module)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float((cost or {}).get("flops", 0.0))


class JaxEvents:
  """Counts tracing and compilation events reported through jax.monitoring."""

  def __init__(self):
    self.traces = []
    self.compiles = []

  def __call__(self, event, duration, **kwargs):
    del duration
    if event == TRACE_EVENT:
      self.traces.append(str(kwargs.get("fun_name", "?")))
    elif event == COMPILE_EVENT:
      self.compiles.append(str(kwargs.get("fun_name", "?")))

  def snapshot(self):
    return len(self.traces), len(self.compiles)


@contextlib.contextmanager
def jax_events():
  """A ``JaxEvents`` listening while the block runs."""
  listener = JaxEvents()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield listener
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def linearity(chunk_seconds):
  """Step and straight-line checks on equal-work chunk times."""
  ts = [float(t) for t in chunk_seconds]
  med = statistics.median(ts)
  cum = np.cumsum(ts)
  idx = np.arange(1, len(ts) + 1, dtype=np.float64)
  out = {"median_s": med, "max_over_median": max(ts) / med,
         "step_tolerance": STEP_TOLERANCE,
         "no_step_above_trend": max(ts) <= STEP_TOLERANCE * med}
  if len(ts) >= 2:
    slope, intercept = np.polyfit(idx, cum, 1)
    fit = slope * idx + intercept
    out["cumulative_fit"] = {
        "slope_s_per_chunk": float(slope), "intercept_s": float(intercept),
        "max_abs_residual_s": float(np.max(np.abs(cum - fit)))}
  return out


def environment():
  """JAX, devices, CPU, platform, XLA flags and load of this machine."""
  return {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kinds": sorted({d.device_kind for d in jax.devices()}),
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average": list(os.getloadavg()),
  }


def call_times(f, args, reps):
  """Seconds of each of ``reps`` calls ``f(*args)``, after one warm-up call.

  Every call waits for its result, so device work is inside the time.
  """
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return times


def matmul_peak(device, n, reps, dtype="float32", precision=None):
  """Best-of-``reps`` GFLOP/s of a jitted ``n x n`` matmul.

  ``precision`` is jnp.matmul's (None: XLA's default, which lets GPU matrix
  units use TF32 for float32; "highest": strict float32). Inputs are random
  (zeros would run faster than real data on some GPUs).
  """
  rng = np.random.default_rng(0)
  a = jax.device_put(jnp.asarray(rng.standard_normal((n, n), np.float32),
                                 dtype), device)
  b = jax.device_put(jnp.asarray(rng.standard_normal((n, n), np.float32),
                                 dtype), device)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
  expected = 2.0 * n ** 3
  # XLA:CPU counts exactly 2 n^3; XLA:GPU reports -1 for its cuBLAS call.
  flops = flops_of(f.lower(a, b).compile())
  flops = flops if flops > 0 else expected
  times = call_times(f, (a, b), reps)
  best = min(times)
  return {"n": n, "dtype": str(dtype), "precision": precision or "default",
          "device": str(device),
          "flops_per_call": flops, "flops_expected": expected,
          "times_s": times, "best_s": best, "gflops": flops / best / 1e9}


def copy_bandwidth(device, n, reps):
  """Best-of-``reps`` GB/s of a jitted ``x + 1`` on ``n`` float32 values.

  Bytes read plus bytes written: the practical ceiling of memory-bound
  work (instance norm, ReLU and pooling of the ConvNet's activations).
  """
  x = jax.device_put(jnp.asarray(np.random.default_rng(3).standard_normal(
      n, np.float32)), device)
  f = jax.jit(lambda v: v + 1.0)
  times = call_times(f, (x,), reps)
  best = min(times)
  return {"values": n, "bytes_per_call": 8.0 * n, "times_s": times,
          "best_s": best, "gbytes_per_s": 8.0 * n / best / 1e9}


# (model, input shape, DSA strategy, embed batch) -> FLOPs per image; a
# 4-device child is handed its parent's counts (``set_flops_per_image``).
_FLOPS_CACHE = {}


def _flops_key(spec):
  return (spec.model, spec.input_shape, spec.dsa_strategy, spec.embed_batch)


def set_flops_per_image(spec, counts):
  """Uses ``counts`` (``flops_per_image``'s pair) for ``spec`` from now on."""
  _FLOPS_CACHE[_flops_key(spec)] = tuple(counts)


def flops_per_image(spec):
  """XLA FLOPs per embedded sample: (class_moments, embed only).

  Always XLA:CPU's count of the float32 program, whatever the spec's compute
  dtype and wherever the pass runs: one count for every case, and a GPU's
  convolutions are library calls its cost analysis may not count. The
  ConvNet's first block is counted as XLA's ops (``cpu_first_block.xla_ops``:
  the CPU kernel is a custom call, which the cost analysis counts as 0).
  """
  cache_key = _flops_key(spec)
  if cache_key in _FLOPS_CACHE:
    return _FLOPS_CACHE[cache_key]
  eb, C = spec.embed_batch, spec.num_classes
  y = np.sort(np.arange(eb) % C).astype(np.int32)
  counts = np.bincount(y, minlength=C)
  slot_class, slot_rank = client_lib.class_slots(counts, counts)
  class_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  x = np.zeros((eb,) + tuple(spec.input_shape), np.float32)
  root = jax.random.key(0)
  params = dm.network_params(spec.model, root, 0, spec.input_shape)
  class_draws = dm.class_aug_draws(root, 0, C, spec.dsa_strategy,
                                   spec.input_shape)
  embed = models.embed_fn(spec.model)

  def moments(params, class_draws, key, x, y, class_start, slot_class,
              slot_rank):
    return client_lib.class_moments(spec, embed, params, class_draws, key, x,
                                    y, class_start, slot_class, slot_rank)

  # One embed batch: every loop in class_moments runs once, so XLA's count
  # (which counts a loop body once) is exact. Committed to the CPU, so that
  # XLA:CPU compiles (and counts) it.
  cpu = jax.devices("cpu")[0]
  args = jax.device_put((params, class_draws, jax.random.key(1), x, y,
                         class_start, slot_class, slot_rank), cpu)
  with cpu_first_block.xla_ops():
    total = flops_of(jax.jit(moments).lower(*args).compile())
    embed_only = flops_of(jax.jit(embed).lower(args[0], args[3]).compile())
  _FLOPS_CACHE[cache_key] = (total / eb, embed_only / eb)
  return _FLOPS_CACHE[cache_key]


def embed_reference(spec, batch, device, reps):
  """The bare embedding: one jitted ConvNet forward of ``batch`` images.

  What the client pass would reach if it were nothing but the embedding
  (no sampling, augmentation, padding or per-class sums), in the spec's
  compute dtype; FLOPs are the float32 program's XLA:CPU count.
  """
  root = jax.random.key(0)
  params = jax.device_put(
      dm.network_params(spec.model, root, 0, spec.input_shape), device)
  x = jax.device_put(np.random.default_rng(2).standard_normal(
      (batch,) + tuple(spec.input_shape), np.float32), device)
  f = jax.jit(models.embed_fn(spec.model, spec.compute_dtype))
  flops = batch * flops_per_image(spec)[1]
  times = call_times(f, (params, x), reps)
  best = min(times)
  return {"batch": batch, "compute_dtype": spec.compute_dtype,
          "device": str(device), "times_s": times, "best_s": best,
          "images_per_s": batch / best, "gflops": flops / best / 1e9}

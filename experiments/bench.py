"""Throughput benchmark of CollabDM's client pass, and of the rest of a run.

The client pass (every client embeds its real samples under every random
network psi_t) is almost all of CollabDM's compute, so this script measures
it against the practical peak of the same machine: a jitted float32 matmul
timed in the same run. It prints ONE JSON document on stdout (progress goes
to stderr) with, per case, images x networks embedded per second, achieved
GFLOP/s, the matmul peak and their ratio; the server step time; the phases of
an end-to-end run of ``experiments/configs/default.py`` (reduced budget);
peak RSS and the JAX backend and devices.

  python experiments/bench.py                 # full run, ~15 min on 2 cores
  python experiments/bench.py --quick         # tiny sizes (tests, CI)
  python experiments/bench.py --cases='fmnist_k100_*,server_*' \
      --out=experiments/results/bench.json

Case names: ``{fmnist,cifar10}_k{K}_t{T}_d{1,4}`` (client pass on K clients
for T iterations on 1 or 4 CPU devices; 4 devices run in a subprocess with
``--xla_force_host_platform_device_count=4``), ``server_{fmnist,cifar10}``
and ``e2e_default``. ``--cases`` takes comma-separated shell patterns.

On a GPU (skipped, and recorded as such, without one):
``{fmnist,cifar10}_k{K}_t{T}_gpu{,_fp32,_bf16}`` is the client pass in
float32 at XLA's default precision (which lets the GPU's matrix units use
TF32), in strict float32 (``precision="highest"``) and with
``compute_dtype="bfloat16"``; each is compared with a matmul of the same
precision timed on the same GPU. ``server_{ds}_gpu{,_bf16}`` times the server
step and ``e2e_default_gpu{,_fp32,_bf16}`` runs the *full* default config
(evaluation included) on the GPU in the three precisions, so that they give
bfloat16's (and TF32's) effect on accuracy. The GPU's copy bandwidth and
the bare embedding are measured too: on a GPU the pass is memory-bound. GPU cases use ``ACCEL`` sizes: larger embedding batches and
``t_chunk`` iterations per call, as a GPU wants.

  python experiments/bench.py --cases='*_gpu*' --out=bench_gpu.json

How the client pass is measured. Client data is random (throughput does not
depend on pixel values) with the datasets' shapes and training-set sizes,
split evenly over K clients with uniform labels; the statistics are those of
the default config (ConvNet-3, batch_real 32, embed_batch 64, DM's DSA).
One *chunk* is one call of ``client.block_stats_fn`` (the jitted function
``iter_client_stats`` calls) on one block of clients already on the devices,
for one iteration (``t_chunk`` on a GPU), followed by the device-to-host
copy ``iter_client_stats`` does. The host-to-device copy of a block is timed
on its own and charged as ``iter_client_stats`` makes it: once per pass when
the pass has one block, else once per block and call of the default
config's ``stats.t_chunk`` (8) iterations. Blocks use
``iter_client_stats``' default clients per device unless a call would then
embed more than ``max_chunk_images`` padded samples (the layout used is
recorded per case). After a
warm-up call (tracing and compilation), a few chunks are timed and the whole
pass (every block, every iteration) is extrapolated linearly from them: the
cases are labelled ``"method": "extrapolated"`` with the measured share.
Iterations are independent and sequential inside the block function, so a
pass costs T times one iteration of every block; per-chunk times are
reported so that a step above the trend can be read off, and the script
checks that no timed chunk triggered a new trace or compilation.

The practical peak is the best of several jitted float32 2048 x 2048
matmuls, timed at the start and again at the end of the run (the better of
the two is used, so a busy moment does not flatter the ratios). As a second
reference, the bare embedding (one jitted ConvNet forward of a batch) is
timed too: the client pass cannot beat it without a faster network.

FLOPs are XLA's own count (``cost_analysis`` of the compiled
``client.class_moments`` on one embed batch: DSA, ConvNet embedding and
per-class sums, divided by the batch size), times the number of *real*
samples embedded: padding the implementation embeds counts as wasted time,
not as work. XLA counts the multiply-adds of convolution taps that fall
inside the (unpadded) input only, so its count is a little below 2 x MACs of
the padded convolution.
"""

import argparse
import concurrent.futures
import contextlib
import fnmatch
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402  (after the path set-up so the package imports)
import jax.numpy as jnp  # noqa: E402

from collabdm_jax import augment  # noqa: E402
from collabdm_jax import client as client_lib  # noqa: E402
from collabdm_jax import dm  # noqa: E402
from collabdm_jax import losses  # noqa: E402
from collabdm_jax import models  # noqa: E402
from collabdm_jax import parallel  # noqa: E402
from collabdm_jax import provenance  # noqa: E402
from collabdm_jax import server as server_lib  # noqa: E402

SCHEMA_VERSION = 1
TARGET_FRACTION = 0.6  # client pass vs measured matmul peak, CPU (reported)
MULTI_DEVICES = 4
# A chunk whose time exceeds the median chunk by this factor is a step above
# the linear trend (reported, not fatal).
STEP_TOLERANCE = 1.25

# name -> (input shape, training-set size, name for the DSA strategy)
DATASETS = {
    "fmnist": ((28, 28, 1), 60000, "fashion_mnist"),
    "cifar10": ((32, 32, 3), 50000, "cifar10"),
}
NUM_CLASSES = 10

# Sizes. "quick" exercises every code path (extrapolation, partial blocks,
# the 4-device subprocess, the end-to-end run) in seconds.
FULL = dict(
    clients=(10, 100, 1000), iterations=(100, 1000),
    model=dict(arch="convnet"), train_size=None, batch_real=32,
    embed_batch=64, dsa_strategy=None, timed_chunks=3,
    max_chunk_images=2048, embed_probe_batches=(32, 64, 256),
    pipeline_t_chunk=8,  # the default config's stats.t_chunk
    matmul_n=2048, matmul_reps=10, gpu_matmul_n=8192, server_ipc=10,
    server_steps=5, e2e_config="default",
    # The default config takes ~20 min on 2 busy cores; these keep its
    # structure (10 clients, Dir(0.1), local DM, server with checkpoints,
    # evaluation) at a quarter of its iterations, local DM steps and
    # evaluation epochs, and one evaluation net instead of three.
    e2e_overrides=(("num_iterations", 10), ("local.iterations", 5),
                   ("eval.epochs", 25), ("eval.num_nets", 1)))
# Quick: compilation dominates, so one cheap DSA family ("flip" still goes
# through the per-slot Siamese augmentation) and a 2-client block, so that
# K=3 has a full and a partial block.
QUICK = dict(
    clients=(3,), iterations=(2, 6),
    model=dict(arch="convnet", width=8, depth=2), train_size=96,
    batch_real=8, embed_batch=16, dsa_strategy="flip", timed_chunks=2,
    max_chunk_images=64, embed_probe_batches=(16,), matmul_n=512, matmul_reps=3, gpu_matmul_n=1024,
    pipeline_t_chunk=2,
    server_ipc=2, server_steps=2, e2e_config="smoke",
    e2e_overrides=(("num_iterations", 2), ("local.iterations", 1),
                   ("dsa_strategy", "flip"), ("eval.dsa", False),
                   ("eval.num_nets", 1), ("eval.epochs", 1),
                   ("checkpoint.every", 0)))

# Accelerator cases: same workloads, sized for a GPU. A GPU needs thousands
# of samples per convolution to fill, so batches are 16x the CPU's and each
# call embeds t_chunk iterations (as iter_client_stats does).
ACCEL = dict(embed_batch=1024, t_chunk=8, timed_chunks=5, matmul_n=8192,
             clients=(10, 1000, 100), server_steps=10,
             copy_values=1 << 29, embed_probe_batches=(800, 3200),
             # The full default config (not reduced): its accuracy is the
             # measure of bfloat16's effect.
             e2e_overrides=(("stats.embed_batch", 1024),))
ACCEL_QUICK = dict(embed_batch=32, t_chunk=2, timed_chunks=2, matmul_n=512,
                   clients=(3,), server_steps=2, copy_values=1 << 20,
                   embed_probe_batches=(16,),
                   e2e_overrides=QUICK["e2e_overrides"])
# GPU variants: name suffix -> (compute_dtype, jax matmul precision).
VARIANTS = {"": ("float32", None), "_fp32": ("float32", "highest"),
            "_bf16": ("bfloat16", None)}

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def log(msg):
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
        flush=True)


# ---------------------------------------------------------------------------
# Case names and selection.
# ---------------------------------------------------------------------------


def client_case_name(dataset, clients, iterations, where, variant=""):
  """``fmnist_k10_t100_d1`` / ``..._gpu`` / ``..._gpu_bf16``.

  ``where`` is 1, 4 or "gpu"; ``variant`` a key of ``VARIANTS`` (GPU only).
  """
  suffix = "gpu" + variant if where == "gpu" else f"d{where}"
  return f"{dataset}_k{clients}_t{iterations}_{suffix}"


def all_case_names(sizes, accel_sizes=None):
  names = []
  for ds in DATASETS:
    for where in (1, MULTI_DEVICES):
      for k in sizes["clients"]:
        for t in sizes["iterations"]:
          names.append(client_case_name(ds, k, t, where))
    for variant in VARIANTS:
      for k in (accel_sizes or sizes)["clients"]:
        for t in sizes["iterations"]:
          names.append(client_case_name(ds, k, t, "gpu", variant))
  names += [f"server_{ds}" for ds in DATASETS]
  names += [f"server_{ds}_gpu{v}" for ds in DATASETS for v in ("", "_bf16")]
  names += ["e2e_default"] + [f"e2e_default_gpu{v}" for v in VARIANTS]
  return names


def parse_patterns(text):
  patterns = [p.strip() for p in text.split(",") if p.strip()]
  if not patterns:
    raise ValueError(f"--cases must name at least one pattern, got {text!r}")
  return patterns


def selected(name, patterns):
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ---------------------------------------------------------------------------
# Measurement helpers.
# ---------------------------------------------------------------------------


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


peak_rss_mb = provenance.peak_rss_mb
cpu_model = provenance.cpu_model


def environment():
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


# ---------------------------------------------------------------------------
# Client pass.
# ---------------------------------------------------------------------------


def make_spec(dataset, sizes, compute_dtype="float32"):
  shape, _, dsa_name = DATASETS[dataset]
  model = models.make_model(num_classes=NUM_CLASSES, **sizes["model"])
  return client_lib.StatsSpec(
      model=model, input_shape=shape, num_classes=NUM_CLASSES,
      batch_real=sizes["batch_real"],
      dsa_strategy=(sizes["dsa_strategy"] or
                    augment.dsa_strategy_for(dsa_name)),
      embed_batch=sizes["embed_batch"], compute_dtype=compute_dtype)


_FLOPS_CACHE = {}


def _flops_key(spec):
  return (spec.model, spec.input_shape, spec.dsa_strategy, spec.embed_batch)


def flops_per_image(spec):
  """XLA FLOPs per embedded sample: (class_moments, embed only).

  Always XLA:CPU's count of the float32 program, whatever the spec's compute
  dtype and wherever the pass runs: one count for every case, and a GPU's
  convolutions are library calls its cost analysis may not count.
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
  class_keys = dm.class_aug_keys(root, 0, C)
  embed = models.embed_fn(spec.model)

  def moments(params, class_keys, key, x, y, class_start, slot_class,
              slot_rank):
    return client_lib.class_moments(spec, embed, params, class_keys, key, x,
                                    y, class_start, slot_class, slot_rank)

  # One embed batch: every loop in class_moments runs once, so XLA's count
  # (which counts a loop body once) is exact. Committed to the CPU, so that
  # XLA:CPU compiles (and counts) it.
  cpu = jax.devices("cpu")[0]
  args = jax.device_put((params, class_keys, jax.random.key(1), x, y,
                         class_start, slot_class, slot_rank), cpu)
  total = flops_of(jax.jit(moments).lower(*args).compile())
  embed_only = flops_of(jax.jit(embed).lower(args[0], args[3]).compile())
  _FLOPS_CACHE[cache_key] = (total / eb, embed_only / eb)
  return _FLOPS_CACHE[cache_key]


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


def client_data(rng, n, shape, with_images=True):
  y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  x = (rng.standard_normal((n,) + tuple(shape), np.float32) if with_images
       else None)
  return x, y


def measure_client_config(dataset, num_clients, iterations, where, sizes,
                          devices, matmul_gflops, variant=""):
  """Measures one (dataset, K, device setting); returns one entry per T.

  The T cases share one measurement: the cost of a pass is T times the cost
  of one iteration over every block. ``sizes["t_chunk"]`` iterations are
  computed per call (1 on CPU, as committed results were measured).
  """
  compute_dtype, precision = VARIANTS[variant]
  spec = make_spec(dataset, sizes, compute_dtype)
  t_chunk = sizes.get("t_chunk", 1)
  shape, train_size, _ = DATASETS[dataset]
  train_size = sizes["train_size"] or train_size
  n_dev = len(devices)
  mesh = parallel.client_mesh(devices=devices)
  n = train_size // num_clients
  rng = np.random.default_rng([list(DATASETS).index(dataset), num_clients])
  # Labels of every client (cheap) give the exact number of real samples
  # embedded per iteration; images are made only for the blocks timed.
  labels = [client_data(rng, n, shape, with_images=False)[1]
            for _ in range(num_clients)]
  real_slots = np.array([spec.slots_of(y) for y in labels])
  images_per_iteration = int(real_slots.sum())

  # Block layout: exactly what iter_client_stats plans for these clients.
  # Every block has the same shapes (one compilation); blocks differ only in
  # how many real clients (and slots) they hold.
  samples = [n] * num_clients
  layout = client_lib.plan_layout(spec, samples, real_slots, n_dev)
  eb = layout.embed_batch
  shards = client_lib.pack_shards(samples, real_slots, layout)
  shards += [[]] * (-len(shards) % n_dev)
  per_block = [sum(shards[b:b + n_dev], [])
               for b in range(0, len(shards), n_dev)]
  kinds = []  # (clients in block, how many such blocks, an example block)
  for members in per_block:
    for k, kind in enumerate(kinds):
      if kind[0] == len(members):
        kinds[k] = (kind[0], kind[1] + 1, kind[2])
        break
    else:
      kinds.append((len(members), 1, members))

  def build_block(members):
    xs = [client_data(np.random.default_rng([7, m]), n, shape)[0]
          for m in members]
    built = client_lib.make_blocks(xs, [labels[m] for m in members],
                                   list(members), spec, layout)
    assert len(built) == 1, len(built)
    return built[0]

  # Images only for one example block of each kind.
  blocks = [build_block(members) for _, _, members in kinds]
  kinds = [(c, m) for c, m, _ in kinds]
  padded_slots = layout.slots_per_shard
  cpd = layout.clients_per_shard
  default_cpd = cpd
  block_size = n_dev * cpd
  blk_arrays = [tuple(b[:-1]) for b in blocks]

  fn = client_lib.block_stats_fn(spec, mesh, t_chunk, eb)
  root = jax.random.key(0)
  # iter_client_stats copies a block onto the devices (to_global) once per
  # call of pipeline_t_chunk iterations, or once per pass when the pass has
  # a single block: timed here on its own and charged to the pass that way,
  # while the timed calls run on blocks already placed.
  copies = []
  for _ in range(2):
    t0 = time.perf_counter()
    jax.block_until_ready(parallel.to_global(mesh, blk_arrays[0]))
    copies.append(time.perf_counter() - t0)
  copy_s = min(copies)
  blk_arrays = [parallel.to_global(mesh, b) for b in blk_arrays]

  def call(kind, t):
    t0 = time.perf_counter()
    with jax.default_matmul_precision(precision):
      out = fn(root, jnp.int32(t * t_chunk), *blk_arrays[kind])
      jax.device_get(out)
    return time.perf_counter() - t0

  total_units = sum(m for _, m in kinds)  # block-iterations per iteration
  timed = sizes["timed_chunks"]
  chunks = []
  with jax_events() as events:
    # Every block has the same shapes, so only the first call compiles; the
    # other kinds are called once before timing all the same.
    warm_s = call(0, 0)
    for i in range(1, len(kinds)):
      call(i, 0)
    after_warm = events.snapshot()
    main = max(range(len(kinds)), key=lambda i: kinds[i][1])
    for j in range(timed):
      s = call(main, 1 + j)
      chunks.append({"block_clients": kinds[main][0], "t": (1 + j) * t_chunk,
                     "iterations": t_chunk, "seconds": s})
    other = {}
    for i in range(len(kinds)):
      if i != main:
        other[i] = call(i, 1)
        chunks.append({"block_clients": kinds[i][0], "t": t_chunk,
                       "iterations": t_chunk, "seconds": other[i]})
    after_all = events.snapshot()
  new_traces = after_all[0] - after_warm[0]
  new_compiles = after_all[1] - after_warm[1]
  if new_traces or new_compiles:
    raise RuntimeError(
        f"{dataset} K={num_clients}: the block function was traced "
        f"{new_traces} and compiled {new_compiles} more times after warm-up "
        f"({events.traces[after_warm[0]:]})")
  cache_size = fn._cache_size() if hasattr(fn, "_cache_size") else None
  if cache_size is not None and cache_size != 1:
    raise RuntimeError(f"block function compiled {cache_size} times; every "
                       "block should share one shape")

  main_times = [c["seconds"] for c in chunks[:timed]]
  per_main = float(np.mean(main_times)) / t_chunk
  seconds_per_iteration = kinds[main][1] * per_main + sum(
      kinds[i][1] * s / t_chunk for i, s in other.items())
  fpi, embed_fpi = flops_per_image(spec)
  full_block = blocks[main]
  measurement = {
      "chunk": f"one call of client.block_stats_fn(t_chunk={t_chunk}) on "
               f"one block for {t_chunk} iteration(s), plus the "
               "device-to-host copy",
      "warmup_s_including_compile": warm_s,
      "chunks": chunks,
      "linearity": linearity(main_times),
      "traces_during_warmup": after_warm[0],
      "compiles_during_warmup": after_warm[1],
      "traces_after_warmup": new_traces,
      "compiles_after_warmup": new_compiles,
      "single_trace": new_traces == 0 and new_compiles == 0,
      "jit_cache_size": cache_size,
  }
  workload = {
      "input_shape": list(shape), "num_classes": NUM_CLASSES,
      "samples_per_client": n, "labels": "uniform random, seeded",
      "model": dict(sizes["model"]),
      "feature_dim": models.feature_dim(spec.model, spec.input_shape),
      "batch_real": spec.batch_real, "embed_batch": eb, "t_chunk": t_chunk,
      "compute_dtype": compute_dtype,
      "matmul_precision": precision or "default",
      "dsa_strategy": spec.dsa_strategy,
      "real_slots_per_client_min": int(real_slots.min()),
      "real_slots_per_client_max": int(real_slots.max()),
      "images_per_iteration": images_per_iteration,
      "devices": n_dev, "clients_per_device": cpd,
      "default_clients_per_device": default_cpd,
      "block_size": block_size,
      "blocks": [{"real_clients": c, "count": m} for c, m in kinds],
      "padded_slots_per_client": padded_slots,
      "padded_samples_per_block_call": int(full_block.slot_class.size),
      "real_samples_per_full_block_call": int(
          (full_block.slot_class >= 0).sum()),
  }
  workload["host_to_device_s_per_block"] = copy_s
  pipeline_t_chunk = sizes["pipeline_t_chunk"]
  entries = []
  for T in iterations:
    copies = 1 if total_units == 1 else total_units * math.ceil(
        T / pipeline_t_chunk)
    pass_s = seconds_per_iteration * T + copies * copy_s
    images_per_s = images_per_iteration * T / pass_s
    gflops = images_per_s * fpi / 1e9
    measured_units = (timed + len(other)) * t_chunk
    entries.append({
        "name": client_case_name(dataset, num_clients, T, where, variant),
        "dataset": dataset, "num_clients": num_clients, "num_iterations": T,
        "devices": n_dev, "backend": devices[0].platform,
        "method": "extrapolated",
        "measured_fraction_of_pass": min(1.0,
                                         measured_units / (total_units * T)),
        "client_pass_s": pass_s,
        "seconds_per_iteration": pass_s / T,
        "compute_seconds_per_iteration": seconds_per_iteration,
        "host_to_device_copies": copies,
        "pipeline_t_chunk": pipeline_t_chunk,
        "images_networks_per_s": images_per_s,
        "flops_per_image": fpi, "embed_only_flops_per_image": embed_fpi,
        "flops_source": "XLA cost_analysis of compiled client.class_moments "
                        "(one embed batch) / batch size; x real samples",
        "gflops": gflops,
        "matmul_peak_gflops": matmul_gflops,
        "fraction_of_matmul_peak": gflops / matmul_gflops,
        "workload": workload,
        "measurement": measurement,
    })
  return entries


def run_client_cases(sizes, patterns, where, devices, matmul_gflops,
                     variant="", on_case=None):
  out = []
  for ds in DATASETS:
    for k in sizes["clients"]:
      ts = [t for t in sizes["iterations"]
            if selected(client_case_name(ds, k, t, where, variant), patterns)]
      if not ts:
        continue
      log(f"client pass {ds} K={k} on {len(devices)} {devices[0].platform} "
          f"device(s){variant}, T={ts}")
      entries = measure_client_config(ds, k, ts, where, sizes, devices,
                                      matmul_gflops, variant)
      e = entries[0]
      log(f"  {e['images_networks_per_s']:.1f} images x networks/s, "
          f"{e['gflops']:.1f} GFLOP/s = "
          f"{100 * e['fraction_of_matmul_peak']:.1f}% of matmul peak; chunks "
          f"{[round(c['seconds'], 3) for c in e['measurement']['chunks']]} s")
      out += entries
      if on_case is not None:
        on_case(entries)
  return out


def run_multi_device_child(sizes_name, sizes, patterns, matmul_gflops):
  """Runs the 4-device cases in a subprocess with 4 simulated CPU devices.

  The parent's matmul peak and FLOP counts are passed down, so that every
  case is compared with the same peak (and the child compiles less).
  """
  flops = {ds: flops_per_image(make_spec(ds, sizes)) for ds in DATASETS}
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                      f"device_count={MULTI_DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()),
         f"--devices={MULTI_DEVICES}", f"--cases={','.join(patterns)}",
         f"--matmul-gflops={matmul_gflops}",
         f"--flops-per-image={json.dumps(flops)}"]
  if sizes_name == "quick":
    cmd.append("--quick")
  cmd.append(f"--embed-batch={sizes['embed_batch']}")
  log(f"4-device cases in a subprocess: {' '.join(cmd[1:])}")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        cwd=REPO)
  sys.stderr.write(proc.stderr)
  if proc.returncode != 0:
    raise RuntimeError(f"4-device subprocess failed ({proc.returncode}): "
                       f"{proc.stderr[-3000:]}")
  return json.loads(proc.stdout)


# ---------------------------------------------------------------------------
# Server step and end-to-end run.
# ---------------------------------------------------------------------------


def server_case(dataset, sizes, iterations, name=None,
                compute_dtype="float32", device=None):
  spec = make_spec(dataset, sizes)
  shape = spec.input_shape
  cfg = server_lib.ServerConfig(ipc=sizes["server_ipc"],
                                dsa_strategy=spec.dsa_strategy,
                                compute_dtype=compute_dtype)
  optimizer, step = server_lib.make_step(spec.model, shape, NUM_CLASSES, cfg)
  rng = np.random.default_rng(1)
  images = rng.standard_normal((NUM_CLASSES, cfg.ipc) + shape, np.float32)
  state = dm.init_state(jnp.asarray(images), optimizer)
  D = models.feature_dim(spec.model, shape)
  targets = losses.ClassMoments(
      mean=jnp.asarray(rng.standard_normal((NUM_CLASSES, D), np.float32)),
      std=jnp.zeros((NUM_CLASSES, D)), valid=jnp.ones((NUM_CLASSES,), bool))
  root = jax.random.key(0)
  if device is not None:
    state, targets = jax.device_put((state, targets), device)
  with jax_events() as events:
    t0 = time.perf_counter()
    state, class_losses = step(state, root, jnp.int32(0), targets)
    class_losses.block_until_ready()
    warm = time.perf_counter() - t0
    after_warm = events.snapshot()
    times = []
    for t in range(1, sizes["server_steps"] + 1):
      t0 = time.perf_counter()
      state, class_losses = step(state, root, jnp.int32(t), targets)
      class_losses.block_until_ready()
      times.append(time.perf_counter() - t0)
    after = events.snapshot()
  if after != after_warm:
    raise RuntimeError(f"server step retraced/recompiled: {events.traces}")
  mean = float(np.mean(times))
  return {
      "name": name or f"server_{dataset}", "dataset": dataset, "ipc": cfg.ipc,
      "compute_dtype": compute_dtype,
      "backend": (device.platform if device is not None
                  else jax.default_backend()),
      "num_classes": NUM_CLASSES, "dsa_strategy": cfg.dsa_strategy,
      "warmup_s_including_compile": warm, "step_times_s": times,
      "step_s_median": statistics.median(times), "step_s_mean": mean,
      "linearity": linearity(times),
      "server_phase_s_extrapolated": {str(T): mean * T for T in iterations},
      "finite_losses": bool(np.all(np.isfinite(np.asarray(class_losses)))),
  }


def e2e_case(sizes, name="e2e_default", overrides=None, reduced=True,
             env=None):
  """Runs launch.distill on the default (or smoke) config in a subprocess.

  ``overrides`` (pairs) default to the sizes' reduced budget; ``env`` adds
  to the child's environment.
  """
  config = REPO / "experiments" / "configs" / f"{sizes['e2e_config']}.py"
  pairs = tuple(sizes["e2e_overrides"] if overrides is None else overrides)
  overrides = [f"--config.{k}={v}" for k, v in pairs]
  child_env = dict(os.environ, **(env or {}))
  with tempfile.TemporaryDirectory(prefix="collabdm_bench_") as workdir:
    cmd = [sys.executable, "-m", "launch.distill", f"--config={config}",
           f"--workdir={workdir}", *overrides]
    log(f"end-to-end: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env=child_env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
      raise RuntimeError(f"end-to-end run failed ({proc.returncode}): "
                         f"{proc.stderr[-3000:]}")
    results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  return {
      "name": name,
      "config": f"experiments/configs/{sizes['e2e_config']}.py",
      "reduced_budget": reduced,
      "overrides": {k: v for k, v in pairs},
      "phases_s": results["wall_s"],
      "subprocess_wall_s": wall,
      "accuracy_mean": results.get("accuracy_mean"),
      "accuracy_std": results.get("accuracy_std"),
      "accuracies": results.get("accuracies"),
      "num_clients": results.get("num_clients"),
      "environment": results.get("environment"),
      # Children are waited for one at a time and this runs first, so the
      # children's maximum is this run's peak.
      "peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
  }


# ---------------------------------------------------------------------------
# GPU cases.
# ---------------------------------------------------------------------------

# Dense (no sparsity) tensor-core and FP32 rates of the SXM cards, from
# NVIDIA's H100/H200 datasheet, in GFLOP/s: a reference beside the measured
# matmul peaks, which are what the ratios use.
DATASHEET_GFLOPS = {
    "H100": {"fp32": 67e3, "tf32": 494.5e3, "bf16": 989e3},
    "H200": {"fp32": 67e3, "tf32": 494.5e3, "bf16": 989e3},
}
# Which matmul peak (and datasheet rate) each variant is compared with.
_VARIANT_PEAK = {"": "tf32", "_fp32": "fp32", "_bf16": "bf16"}


def datasheet_for(device):
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


def run_gpu_cases(sizes, accel, patterns, device, result, flush):
  """Every selected GPU case, most informative first; ``flush`` saves."""
  gpu = {"status": "measured", "device": str(device),
         "device_kind": getattr(device, "device_kind", ""),
         "platform": device.platform, "sizes": {
             k: v for k, v in accel.items() if k != "e2e_overrides"},
         "datasheet": datasheet_for(device)}
  result["gpu"] = gpu
  n, reps = accel["matmul_n"], sizes["matmul_reps"]
  peaks = {"tf32": matmul_peak(device, n, reps),
           "fp32": matmul_peak(device, n, reps, precision="highest"),
           "bf16": matmul_peak(device, n, reps, dtype="bfloat16")}
  result["matmul_peak"]["gpu"] = peaks
  for k, v in peaks.items():
    log(f"GPU matmul {k}: {v['gflops']:.0f} GFLOP/s")
  gpu["copy_bandwidth"] = copy_bandwidth(device, accel["copy_values"], reps)
  log(f"GPU copy: {gpu['copy_bandwidth']['gbytes_per_s']:.0f} GB/s")
  gpu["embed_reference"] = []
  for ds in DATASETS:
    for dtype, kind in (("float32", "tf32"), ("bfloat16", "bf16")):
      for batch in accel["embed_probe_batches"]:
        r = embed_reference(make_spec(ds, accel, dtype), batch, device, reps)
        r.update(dataset=ds, matmul_peak_kind=kind,
                 fraction_of_matmul_peak=r["gflops"] / peaks[kind]["gflops"])
        gpu["embed_reference"].append(r)
        log(f"GPU bare embedding {ds} {dtype} batch {batch}: "
            f"{r['images_per_s']:.0f} images/s, {r['gflops']:.0f} GFLOP/s")
  flush()

  def add(entries):
    for e in entries:
      key = _VARIANT_PEAK[e["name"].split("_gpu", 1)[1]]
      e["matmul_peak_kind"] = key
      e["fraction_of_fp32_matmul_peak"] = (
          e["gflops"] / peaks["fp32"]["gflops"])
      if gpu["datasheet"]:
        e["fraction_of_datasheet_peak"] = (
            e["gflops"] / gpu["datasheet"]["gflops"][key])
    result["client_pass"].extend(entries)
    flush()

  def client(clients):
    for variant in VARIANTS:
      run_client_cases(dict(accel, clients=clients), patterns, "gpu",
                       [device], peaks[_VARIANT_PEAK[variant]]["gflops"],
                       variant, on_case=add)

  # The headline shape first, then bfloat16's accuracy effect, then scale.
  client(accel["clients"][:1])
  # One default run per client-pass variant; a variant's matmul precision
  # reaches the child as JAX_DEFAULT_MATMUL_PRECISION.
  runs = {suffix: f"e2e_default_gpu{suffix}" for suffix in VARIANTS
          if selected(f"e2e_default_gpu{suffix}", patterns)}
  e2e = {}
  if runs:
    # The runs share the GPU at the same time: mostly compilation (one
    # CPU core each) and small steps, so together they take about as long
    # as one. Their wall times are therefore upper bounds, not benchmarks;
    # their accuracies are what they are for.
    log(f"{', '.join(runs.values())}: full default config on "
        f"{device.platform}, concurrently")

    def launch(suffix):
      dtype, precision = VARIANTS[suffix]
      env = ({"JAX_DEFAULT_MATMUL_PRECISION": precision} if precision
             else None)
      out = e2e_case(sizes, runs[suffix], tuple(accel["e2e_overrides"]) +
                     (("compute_dtype", dtype),), False, env)
      out["matmul_precision"] = precision or "default"
      return out

    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
      futures = {suffix: pool.submit(launch, suffix) for suffix in runs}
      for suffix, future in futures.items():
        e2e[suffix] = future.result()
        e2e[suffix]["ran_concurrently_with"] = sorted(
            set(runs.values()) - {runs[suffix]})
        result.setdefault("end_to_end_gpu", []).append(e2e[suffix])
        log(f"  {runs[suffix]}: accuracy {e2e[suffix]['accuracy_mean']}, "
            f"phases {e2e[suffix]['phases_s']}")
    flush()
  # Against XLA's default float32 (TF32 on the GPU) and strict float32.
  effect = {f"bf16_vs{ref or '_default'}": accuracy_effect(e2e[ref],
                                                           e2e["_bf16"])
            for ref in ("", "_fp32") if ref in e2e and "_bf16" in e2e}
  if "" in e2e and "_fp32" in e2e:
    effect["default_vs_fp32"] = accuracy_effect(e2e["_fp32"], e2e[""])
  if effect:
    gpu["accuracy_effects"] = effect
  client(accel["clients"][1:])
  for ds in DATASETS:
    for suffix, dtype in (("", "float32"), ("_bf16", "bfloat16")):
      name = f"server_{ds}_gpu{suffix}"
      if selected(name, patterns):
        result["server_step"].append(server_case(
            ds, dict(sizes, server_steps=accel["server_steps"]),
            sizes["iterations"], name, dtype, device))
        flush()


def summarize_gpu(result):
  cases = [c for c in result["client_pass"] if "_gpu" in c["name"]]
  if not cases:
    return None
  head = min(cases, key=lambda c: (c["num_clients"], c["num_iterations"]))
  out = {"fraction_of_matmul_peak_by_case": {
             c["name"]: c["fraction_of_matmul_peak"] for c in cases},
         "images_networks_per_s_by_case": {
             c["name"]: c["images_networks_per_s"] for c in cases}}
  for c in cases:
    if (c["dataset"], c["num_clients"], c["num_iterations"]) == (
        head["dataset"], head["num_clients"], head["num_iterations"]):
      suffix = c["name"].split("_gpu", 1)[1] or "_default"
      out[f"headline{suffix}"] = {
          "case": c["name"], "images_networks_per_s": c[
              "images_networks_per_s"], "gflops": c["gflops"],
          "fraction_of_matmul_peak": c["fraction_of_matmul_peak"],
          "matmul_peak_kind": c.get("matmul_peak_kind"),
          "fraction_of_fp32_matmul_peak": c.get(
              "fraction_of_fp32_matmul_peak"),
          "fraction_of_datasheet_peak": c.get("fraction_of_datasheet_peak")}
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


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------


def summarize(result):
  cases = [c for c in result["client_pass"]
           if c["dataset"] == "fmnist" and c["backend"] == "cpu"
           and c["devices"] == 1 and "_gpu" not in c["name"]]
  summary = {"target_fraction_of_matmul_peak": TARGET_FRACTION}
  if cases:
    # Headline: the default config's shape (fewest clients, shortest run).
    head = min(cases, key=lambda c: (c["num_clients"], c["num_iterations"]))
    summary.update({
        "client_pass_fraction_of_matmul_peak": head["fraction_of_matmul_peak"],
        "client_pass_case": head["name"],
        "client_pass_gflops": head["gflops"],
        "client_pass_images_networks_per_s": head["images_networks_per_s"],
        "matmul_peak_gflops": head["matmul_peak_gflops"],
        "meets_target": head["fraction_of_matmul_peak"] >= TARGET_FRACTION,
        "fmnist_cpu_fraction_by_case": {
            c["name"]: c["fraction_of_matmul_peak"] for c in cases},
    })
  lin = [c["measurement"]["linearity"]["no_step_above_trend"]
         for c in result["client_pass"]]
  summary["all_chunks_on_trend"] = all(lin) if lin else None
  summary["single_trace_all_cases"] = all(
      c["measurement"]["single_trace"] for c in result["client_pass"])
  summary["all_client_cases_extrapolated"] = all(
      c["method"] == "extrapolated" for c in result["client_pass"])
  summary["gpu"] = result["gpu"].get("status")
  gpu = summarize_gpu(result)
  if gpu is not None:
    summary["gpu_cases"] = gpu
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, for tests and CI")
  parser.add_argument("--cases", default="*",
                      help="comma-separated shell patterns of case names")
  parser.add_argument("--embed-batch", type=int, default=None,
                      help="samples embedded at once in the client pass "
                           "(default: the default config's, 64; quick: 16)")
  parser.add_argument("--out", default=None,
                      help="also write the JSON document to this path (GPU "
                           "runs also save it after every case)")
  parser.add_argument("--accel-embed-batch", type=int, default=None,
                      help="embed batch of the GPU cases (default 1024)")
  parser.add_argument("--accelerator", default="gpu",
                      help=argparse.SUPPRESS)  # tests: "cpu" dry-runs them
  parser.add_argument("--devices", type=int, default=None,
                      help=argparse.SUPPRESS)  # internal: 4-device child
  parser.add_argument("--matmul-gflops", type=float, default=None,
                      help=argparse.SUPPRESS)  # internal: parent's peak
  parser.add_argument("--flops-per-image", default=None,
                      help=argparse.SUPPRESS)  # internal: parent's counts
  args = parser.parse_args(argv)
  # Every process on the GPU (this one and the end-to-end children) takes
  # memory as it needs it, rather than 75% of the card each.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  sizes = dict(QUICK if args.quick else FULL)
  sizes_name = "quick" if args.quick else "full"
  if args.embed_batch is not None:
    if args.embed_batch < 1:
      raise ValueError(f"--embed-batch must be >= 1, got {args.embed_batch}")
    sizes["embed_batch"] = args.embed_batch
  accel = dict(ACCEL_QUICK if args.quick else ACCEL)
  if args.accel_embed_batch is not None:
    if args.accel_embed_batch < 1:
      raise ValueError("--accel-embed-batch must be >= 1, got "
                       f"{args.accel_embed_batch}")
    accel["embed_batch"] = args.accel_embed_batch
    accel["e2e_overrides"] = tuple(
        (k, args.accel_embed_batch if k == "stats.embed_batch" else v)
        for k, v in accel["e2e_overrides"])
  accel = dict(sizes, **accel)
  patterns = parse_patterns(args.cases)
  names = all_case_names(sizes, accel)
  if not any(selected(n, patterns) for n in names):
    raise ValueError(f"--cases={args.cases!r} selects none of {names}")

  if args.devices is not None:  # child: only the multi-device client cases
    if args.matmul_gflops is None:
      raise ValueError("--devices needs --matmul-gflops (set by the parent)")
    for ds, counts in json.loads(args.flops_per_image or "{}").items():
      _FLOPS_CACHE[_flops_key(make_spec(ds, sizes))] = tuple(counts)
    devices = jax.devices("cpu")
    if len(devices) < args.devices:
      raise ValueError(f"--devices={args.devices} but JAX sees "
                       f"{len(devices)} CPU devices")
    cases = run_client_cases(sizes, patterns, args.devices,
                             devices[:args.devices], args.matmul_gflops)
    json.dump({"client_pass": cases, "environment": environment(),
               "peak_rss_mb": peak_rss_mb()}, sys.stdout)
    return 0

  wall0 = time.perf_counter()
  result = {"schema_version": SCHEMA_VERSION, "sizes": sizes_name,
            "embed_batch": sizes["embed_batch"],
            "cases_pattern": args.cases, "environment": environment(),
            "provenance": provenance.start(["experiments/bench.py"]
                                           + list(sys.argv[1:] if argv is None
                                                  else argv)),
            "complete": False}

  def flush():
    """Saves what is measured so far (a run cut short keeps its cases)."""
    if args.out:
      pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

  cpu = jax.devices("cpu")[0]
  log(f"matmul peak on {cpu}")
  result["matmul_peak"] = {"cpu": matmul_peak(cpu, sizes["matmul_n"],
                                              sizes["matmul_reps"])}
  cpu_peak = result["matmul_peak"]["cpu"]["gflops"]
  log(f"  {cpu_peak:.1f} GFLOP/s")

  # The end-to-end run goes first so that the children's peak RSS is its own.
  result["end_to_end"] = (e2e_case(sizes) if selected("e2e_default", patterns)
                          else None)
  result["client_pass"] = run_client_cases(sizes, patterns, 1, [cpu],
                                           cpu_peak)
  multi = [n for n in names if n.endswith(f"_d{MULTI_DEVICES}")
           and selected(n, patterns)]
  result["multi_device"] = {"devices": MULTI_DEVICES,
                            "simulated_with": "--xla_force_host_platform_"
                                              f"device_count={MULTI_DEVICES}"}
  if multi:
    child = run_multi_device_child(sizes_name, sizes, patterns, cpu_peak)
    result["client_pass"] += child["client_pass"]
    result["multi_device"].update(peak_rss_mb=child["peak_rss_mb"],
                                  devices_seen=child["environment"]["devices"])

  gpu_names = [n for n in names if "_gpu" in n and selected(n, patterns)]
  gpus = [d for d in jax.devices() if d.platform == args.accelerator]
  result["server_step"] = []
  if not gpu_names:
    result["gpu"] = {"status": "not selected"}
  elif not gpus:
    result["gpu"] = {"status": "skipped", "reason": "no GPU visible to JAX "
                     f"(backend {jax.default_backend()})",
                     "skipped_cases": gpu_names}
  else:
    run_gpu_cases(sizes, accel, patterns, gpus[0], result, flush)

  # The practical peak is the best matmul of the run: measured again at the
  # end, so a busy moment at the start does not flatter the ratios.
  end_peak = matmul_peak(cpu, sizes["matmul_n"], sizes["matmul_reps"])
  result["matmul_peak"]["cpu_end"] = end_peak
  cpu_peak = max(cpu_peak, end_peak["gflops"])
  result["matmul_peak"]["cpu_practical_peak_gflops"] = cpu_peak
  for c in result["client_pass"]:
    if c["backend"] == "cpu" and "_gpu" not in c["name"]:
      c["matmul_peak_gflops"] = cpu_peak
      c["fraction_of_matmul_peak"] = c["gflops"] / cpu_peak

  result["embed_reference"] = []
  for ds in DATASETS:
    if any(c["dataset"] == ds and c["backend"] == "cpu"
           and "_gpu" not in c["name"] for c in result["client_pass"]):
      for batch in sizes["embed_probe_batches"]:
        r = embed_reference(make_spec(ds, sizes), batch, cpu,
                            sizes["matmul_reps"])
        r.update(dataset=ds, fraction_of_matmul_peak=r["gflops"] / cpu_peak)
        result["embed_reference"].append(r)
        log(f"bare embedding {ds} batch {batch}: {r['images_per_s']:.0f} "
            f"images/s = {100 * r['fraction_of_matmul_peak']:.1f}% of peak")

  iterations = sizes["iterations"]
  result["server_step"] += [server_case(ds, sizes, iterations)
                            for ds in DATASETS
                            if selected(f"server_{ds}", patterns)]
  result["peak_rss_mb"] = {"bench_process": peak_rss_mb()}
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
  result["summary"] = summarize(result)
  s = result["summary"]
  if "client_pass_fraction_of_matmul_peak" in s:
    verdict = "meets" if s["meets_target"] else "MISSES"
    log(f"client pass at {100 * s['client_pass_fraction_of_matmul_peak']:.1f}"
        f"% of matmul peak ({s['client_pass_case']}): {verdict} the "
        f"{100 * TARGET_FRACTION:.0f}% target")
  text = json.dumps(result, indent=2)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The client pass, timed: one (dataset, K, devices) set-up per measurement.

One *chunk* is one call of ``client.block_stats_fn`` (the jitted function
``iter_client_stats`` calls) on one block of clients already on the
devices, for ``t_chunk`` iterations, followed by the device-to-host copy
``iter_client_stats`` does. The whole pass is extrapolated linearly from a
few timed chunks (see ``experiments/benchlib/__init__.py``).
"""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from collabdm_jax import client as client_lib
from collabdm_jax import models
from collabdm_jax import parallel
from experiments.benchlib import cases
from experiments.benchlib import measure

REPO = pathlib.Path(__file__).resolve().parents[2]
BENCH_SCRIPT = REPO / "experiments" / "bench.py"


@dataclasses.dataclass
class ClientPass:
  """A client pass laid out as ``iter_client_stats`` lays it out.

  ``kinds`` are the distinct blocks: ``(real clients, how many such blocks,
  the members of one)``; every block has the same shapes, so only one
  example block of each kind is built (``blocks``).
  """
  spec: client_lib.StatsSpec
  layout: client_lib.BlockLayout
  samples_per_client: int
  labels: List[np.ndarray]
  real_slots: np.ndarray
  kinds: list
  blocks: list
  mesh: object
  num_devices: int


def _block_kinds(layout, samples, real_slots, n_dev):
  """The distinct blocks of a pass: ``[(clients, count, members)]``."""
  shards = client_lib.pack_shards(samples, real_slots, layout)
  shards += [[]] * (-len(shards) % n_dev)
  per_block = [sum(shards[b:b + n_dev], [])
               for b in range(0, len(shards), n_dev)]
  kinds = []
  for members in per_block:
    for k, kind in enumerate(kinds):
      if kind[0] == len(members):
        kinds[k] = (kind[0], kind[1] + 1, kind[2])
        break
    else:
      kinds.append((len(members), 1, members))
  return kinds


def prepare(dataset, num_clients, sizes, devices, compute_dtype="float32"):
  """The ``ClientPass`` of ``num_clients`` clients of random data.

  Labels of every client (cheap) give the exact number of real samples
  embedded per iteration; images are made only for the blocks timed.
  """
  spec = cases.make_spec(dataset, sizes, compute_dtype)
  shape, train_size, _ = cases.DATASETS[dataset]
  n = (sizes["train_size"] or train_size) // num_clients
  rng = np.random.default_rng([list(cases.DATASETS).index(dataset),
                               num_clients])
  labels = [cases.client_data(rng, n, shape, with_images=False)[1]
            for _ in range(num_clients)]
  real_slots = np.array([spec.slots_of(y) for y in labels])
  samples = [n] * num_clients
  layout = client_lib.plan_layout(spec, samples, real_slots, len(devices))
  kinds = _block_kinds(layout, samples, real_slots, len(devices))

  def build_block(members):
    xs = [cases.client_data(np.random.default_rng([7, m]), n, shape)[0]
          for m in members]
    built = client_lib.make_blocks(xs, [labels[m] for m in members],
                                   list(members), spec, layout)
    assert len(built) == 1, len(built)
    return built[0]

  blocks = [build_block(members) for _, _, members in kinds]
  return ClientPass(spec, layout, n, labels, real_slots,
                    [(c, m) for c, m, _ in kinds], blocks,
                    parallel.client_mesh(devices=devices), len(devices))


def host_to_device_seconds(mesh, arrays):
  """Best of two copies of one block onto the devices (``to_global``)."""
  copies = []
  for _ in range(2):
    t0 = time.perf_counter()
    jax.block_until_ready(parallel.to_global(mesh, arrays))
    copies.append(time.perf_counter() - t0)
  return min(copies)


def time_chunks(p: ClientPass, fn, arrays, t_chunk, timed, precision, where):
  """Warm-up, then ``timed`` chunks of the most common block, and one of
  each other block; fails if a timed chunk traced or compiled again."""
  def call(kind, t):
    t0 = time.perf_counter()
    with jax.default_matmul_precision(precision):
      out = fn(jax.random.key(0), t * t_chunk, *arrays[kind])
      jax.device_get(out)
    return time.perf_counter() - t0

  def chunk(kind, t, seconds):
    return {"block_clients": p.kinds[kind][0], "t": t * t_chunk,
            "iterations": t_chunk, "seconds": seconds}

  with measure.jax_events() as events:
    # Every block has the same shapes, so only the first call compiles; the
    # other kinds are called once before timing all the same.
    warm_s = call(0, 0)
    for i in range(1, len(p.kinds)):
      call(i, 0)
    after_warm = events.snapshot()
    main = max(range(len(p.kinds)), key=lambda i: p.kinds[i][1])
    chunks = [chunk(main, 1 + j, call(main, 1 + j)) for j in range(timed)]
    other = {i: call(i, 1) for i in range(len(p.kinds)) if i != main}
    chunks += [chunk(i, 1, s) for i, s in other.items()]
    after_all = events.snapshot()
  new_traces = after_all[0] - after_warm[0]
  new_compiles = after_all[1] - after_warm[1]
  if new_traces or new_compiles:
    raise RuntimeError(
        f"{where}: the block function was traced {new_traces} and compiled "
        f"{new_compiles} more times after warm-up "
        f"({events.traces[after_warm[0]:]})")
  return dict(warm_s=warm_s, chunks=chunks, main=main, other=other,
              after_warm=after_warm, new_traces=new_traces,
              new_compiles=new_compiles)


def measurement_record(fn, timing, t_chunk, timed):
  """The ``measurement`` field of a client case."""
  cache_size = fn.program._cache_size()
  if cache_size != 1:
    raise RuntimeError(f"block function compiled {cache_size} times; every "
                       "block should share one shape")
  new_traces, new_compiles = timing["new_traces"], timing["new_compiles"]
  return {
      "chunk": f"one call of client.block_stats_fn(t_chunk={t_chunk}) on "
               f"one block for {t_chunk} iteration(s), plus the "
               "device-to-host copy",
      "warmup_s_including_compile": timing["warm_s"],
      "chunks": timing["chunks"],
      "linearity": measure.linearity(
          [c["seconds"] for c in timing["chunks"][:timed]]),
      "traces_during_warmup": timing["after_warm"][0],
      "compiles_during_warmup": timing["after_warm"][1],
      "traces_after_warmup": new_traces,
      "compiles_after_warmup": new_compiles,
      "single_trace": new_traces == 0 and new_compiles == 0,
      "jit_cache_size": cache_size,
  }


def workload_record(p: ClientPass, sizes, t_chunk, compute_dtype, precision,
                    main, copy_s):
  """The ``workload`` field of a client case."""
  spec, layout, n_dev = p.spec, p.layout, p.num_devices
  full_block = p.blocks[main]
  return {
      "input_shape": list(spec.input_shape), "num_classes": cases.NUM_CLASSES,
      "samples_per_client": p.samples_per_client,
      "labels": "uniform random, seeded",
      "model": dict(sizes["model"]),
      "feature_dim": models.feature_dim(spec.model, spec.input_shape),
      "batch_real": spec.batch_real, "embed_batch": layout.embed_batch,
      "t_chunk": t_chunk, "compute_dtype": compute_dtype,
      "matmul_precision": precision or "default",
      "dsa_strategy": spec.dsa_strategy,
      "real_slots_per_client_min": int(p.real_slots.min()),
      "real_slots_per_client_max": int(p.real_slots.max()),
      "images_per_iteration": int(p.real_slots.sum()),
      "devices": n_dev, "clients_per_device": layout.clients_per_shard,
      "default_clients_per_device": layout.clients_per_shard,
      "block_size": n_dev * layout.clients_per_shard,
      "blocks": [{"real_clients": c, "count": m} for c, m in p.kinds],
      "padded_slots_per_client": layout.slots_per_shard,
      "padded_samples_per_block_call": int(full_block.slot_class.size),
      "real_samples_per_full_block_call": int(
          (full_block.slot_class >= 0).sum()),
      "host_to_device_s_per_block": copy_s,
  }


def case_entries(p: ClientPass, timing, iterations, sizes, t_chunk, common):
  """One client case per T: the pass is T times one iteration of every
  block, plus the host-to-device copies ``iter_client_stats`` makes."""
  main, other, timed = timing["main"], timing["other"], sizes["timed_chunks"]
  per_main = float(np.mean([c["seconds"] for c in
                            timing["chunks"][:timed]])) / t_chunk
  seconds_per_iteration = p.kinds[main][1] * per_main + sum(
      p.kinds[i][1] * s / t_chunk for i, s in other.items())
  total_units = sum(m for _, m in p.kinds)  # block-iterations per iteration
  copy_s = common["workload"]["host_to_device_s_per_block"]
  fpi, embed_fpi = measure.flops_per_image(p.spec)
  images_per_iteration = int(p.real_slots.sum())
  entries = []
  for T in iterations:
    copies = 1 if total_units == 1 else total_units * math.ceil(
        T / sizes["pipeline_t_chunk"])
    pass_s = seconds_per_iteration * T + copies * copy_s
    images_per_s = images_per_iteration * T / pass_s
    gflops = images_per_s * fpi / 1e9
    measured_units = (timed + len(other)) * t_chunk
    entries.append({
        "name": cases.client_case_name(common["dataset"], len(p.labels), T,
                                       common["where"], common["variant"]),
        "dataset": common["dataset"], "num_clients": len(p.labels),
        "num_iterations": T, "devices": p.num_devices,
        "backend": common["platform"], "method": "extrapolated",
        "measured_fraction_of_pass": min(1.0,
                                         measured_units / (total_units * T)),
        "client_pass_s": pass_s, "seconds_per_iteration": pass_s / T,
        "compute_seconds_per_iteration": seconds_per_iteration,
        "host_to_device_copies": copies,
        "pipeline_t_chunk": sizes["pipeline_t_chunk"],
        "images_networks_per_s": images_per_s,
        "flops_per_image": fpi, "embed_only_flops_per_image": embed_fpi,
        "flops_source": "XLA cost_analysis of compiled client.class_moments "
                        "(one embed batch) / batch size; x real samples",
        "gflops": gflops, "matmul_peak_gflops": common["matmul_gflops"],
        "fraction_of_matmul_peak": gflops / common["matmul_gflops"],
        "workload": common["workload"], "measurement": common["measurement"],
    })
  return entries


def measure_client_config(dataset, num_clients, iterations, where, sizes,
                          devices, matmul_gflops, variant=""):
  """Measures one (dataset, K, device setting); returns one entry per T.

  The T cases share one measurement: the cost of a pass is T times the cost
  of one iteration over every block. ``sizes["t_chunk"]`` iterations are
  computed per call (1 on CPU, as committed results were measured).
  """
  compute_dtype, precision = cases.VARIANTS[variant]
  t_chunk = sizes.get("t_chunk", 1)
  p = prepare(dataset, num_clients, sizes, devices, compute_dtype)
  fn = client_lib.block_stats_fn(p.spec, p.mesh, t_chunk,
                                 p.layout.embed_batch)
  arrays = [tuple(b[:-1]) for b in p.blocks]
  # iter_client_stats copies a block onto the devices (to_global) once per
  # call of pipeline_t_chunk iterations, or once per pass when the pass has
  # a single block: timed here on its own and charged to the pass that way,
  # while the timed calls run on blocks already placed.
  copy_s = host_to_device_seconds(p.mesh, arrays[0])
  arrays = [parallel.to_global(p.mesh, a) for a in arrays]
  timing = time_chunks(p, fn, arrays, t_chunk, sizes["timed_chunks"],
                       precision, f"{dataset} K={num_clients}")
  common = {
      "dataset": dataset, "where": where, "variant": variant,
      "platform": devices[0].platform, "matmul_gflops": matmul_gflops,
      "workload": workload_record(p, sizes, t_chunk, compute_dtype,
                                  precision, timing["main"], copy_s),
      "measurement": measurement_record(fn, timing, t_chunk,
                                        sizes["timed_chunks"])}
  return case_entries(p, timing, iterations, sizes, t_chunk, common)


def run_client_cases(sizes, patterns, where, devices, matmul_gflops,
                     variant="", on_case=None):
  """Every selected client case of ``sizes`` on ``devices``."""
  out = []
  for ds in cases.DATASETS:
    for k in sizes["clients"]:
      ts = [t for t in sizes["iterations"] if cases.selected(
          cases.client_case_name(ds, k, t, where, variant), patterns)]
      if not ts:
        continue
      cases.log(f"client pass {ds} K={k} on {len(devices)} "
                f"{devices[0].platform} device(s){variant}, T={ts}")
      entries = measure_client_config(ds, k, ts, where, sizes, devices,
                                      matmul_gflops, variant)
      e = entries[0]
      cases.log(
          f"  {e['images_networks_per_s']:.1f} images x networks/s, "
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
  flops = {ds: measure.flops_per_image(cases.make_spec(ds, sizes))
           for ds in cases.DATASETS}
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                      f"device_count={cases.MULTI_DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, str(BENCH_SCRIPT),
         f"--devices={cases.MULTI_DEVICES}", f"--cases={','.join(patterns)}",
         f"--matmul-gflops={matmul_gflops}",
         f"--flops-per-image={json.dumps(flops)}"]
  if sizes_name == "quick":
    cmd.append("--quick")
  cmd.append(f"--embed-batch={sizes['embed_batch']}")
  cases.log(f"4-device cases in a subprocess: {' '.join(cmd[1:])}")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        cwd=REPO)
  sys.stderr.write(proc.stderr)
  if proc.returncode != 0:
    raise RuntimeError(f"4-device subprocess failed ({proc.returncode}): "
                       f"{proc.stderr[-3000:]}")
  return json.loads(proc.stdout)

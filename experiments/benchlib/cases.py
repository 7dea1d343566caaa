"""Sizes, case names and their selection, and the benchmark's workloads.

Case names: ``{fmnist,cifar10}_k{K}_t{T}_d{1,4}`` (client pass on K clients
for T iterations on 1 or 4 CPU devices), ``..._gpu{,_fp32,_bf16}`` (the same
on a GPU in three precisions), ``server_{fmnist,cifar10}{,_gpu,_gpu_bf16}``
and ``e2e_default{,_gpu,_gpu_fp32,_gpu_bf16}``. Committed results refer to
these names: keep them.
"""

import fnmatch
import sys
import time

import numpy as np

from collabdm_jax import augment
from collabdm_jax import client as client_lib
from collabdm_jax import models

SCHEMA_VERSION = 1
TARGET_FRACTION = 0.6  # client pass vs measured matmul peak, CPU (reported)
MULTI_DEVICES = 4

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
    max_chunk_images=64, embed_probe_batches=(16,), matmul_n=512,
    matmul_reps=3, gpu_matmul_n=1024, pipeline_t_chunk=2,
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


def log(msg):
  """Progress on stderr (stdout carries only the JSON document)."""
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
        flush=True)


def client_case_name(dataset, clients, iterations, where, variant=""):
  """``fmnist_k10_t100_d1`` / ``..._gpu`` / ``..._gpu_bf16``.

  ``where`` is 1, 4 or "gpu"; ``variant`` a key of ``VARIANTS`` (GPU only).
  """
  suffix = "gpu" + variant if where == "gpu" else f"d{where}"
  return f"{dataset}_k{clients}_t{iterations}_{suffix}"


def all_case_names(sizes, accel_sizes=None):
  """Every case name the sizes define, CPU and GPU."""
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
  """``--cases``: comma-separated shell patterns (at least one)."""
  patterns = [p.strip() for p in text.split(",") if p.strip()]
  if not patterns:
    raise ValueError(f"--cases must name at least one pattern, got {text!r}")
  return patterns


def selected(name, patterns):
  """Whether case ``name`` matches one of ``patterns``."""
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def make_spec(dataset, sizes, compute_dtype="float32"):
  """The ``client.StatsSpec`` of the benchmark's client pass on ``dataset``."""
  shape, _, dsa_name = DATASETS[dataset]
  model = models.make_model(num_classes=NUM_CLASSES, **sizes["model"])
  return client_lib.StatsSpec(
      model=model, input_shape=shape, num_classes=NUM_CLASSES,
      batch_real=sizes["batch_real"],
      dsa_strategy=(sizes["dsa_strategy"] or
                    augment.dsa_strategy_for(dsa_name)),
      embed_batch=sizes["embed_batch"], compute_dtype=compute_dtype)


def client_data(rng, n, shape, with_images=True):
  """One client's ``(x [n, ...] or None, y [n])``: random, uniform labels."""
  y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  x = (rng.standard_normal((n,) + tuple(shape), np.float32) if with_images
       else None)
  return x, y

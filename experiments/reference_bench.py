"""Times the reference config end to end, phase by phase, against the matmul peak.

Runs ``experiments/configs/reference.py`` (the config the authors' PyTorch
code was timed at, see that file) through ``pipeline.run_distillation`` and
writes ONE JSON document: per phase the wall time, the FLOPs XLA counts for
the work the phase did, the GFLOP/s that makes and its fraction of a float32
2048 x 2048 matmul timed in the same run (best of its start and end
timings); the accuracy; and the ``provenance`` record every results file
carries (commit, command line, machine, versions, load, peak RSS).
The server's entry also holds its per-iteration wall times
(``server_iteration_times``): the step (median over iterations 2..T) and
the time until the first iteration ended (compilation included).

  python -m experiments.reference_bench \
      --out=experiments/results/reference/reference.json

``--config.*`` overrides reach the config (e.g. ``--config.eval.num_nets=1``
for a quicker look, or ``--config.local.networks=independent``). Time it on
an otherwise idle machine and say so: the load average at the start and end
is recorded.

How FLOPs are counted. XLA's cost analysis counts a loop body once, so each
phase's count is built from programs in which every loop runs exactly once,
times the number of times the phase runs them:

* client statistics: FLOPs per embedded sample
  (``benchlib.measure.flops_per_image``:
  sampling, DSA, embedding and sums) x samples embedded (per client and
  iteration, ``min(class count, batch_real)`` per class) x iterations;
* local DM on the shared networks: one class step of all clients
  (``client.shared_local_step`` on a one-class set) x classes x
  iterations;
* server: one class step (``server.make_step`` on a one-class set) x
  classes x iterations;
* evaluation: one SGD step on the whole (one-batch) synthetic set
  (``evaluate`` programs with one epoch) x epochs x networks, plus the test
  predictions (one image's logits x test images x networks).

Network initialisation and the other small work outside the loops is left
out, so the fractions slightly understate the machine's use. The ConvNet's
first block is counted as XLA's ops (direct convolution, instance norm,
ReLU, pooling) also where the CPU kernels of ``cpu_first_block`` run it.
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from collabdm_jax import augment
from collabdm_jax import client as client_lib
from collabdm_jax import cpu_first_block
from collabdm_jax import dm
from collabdm_jax import evaluate
from collabdm_jax import losses
from collabdm_jax import metrics as metrics_lib
from collabdm_jax import models
from collabdm_jax import pipeline
from collabdm_jax import provenance
from collabdm_jax import server as server_lib
from collabdm_jax import setup as setup_lib
from experiments.benchlib import measure

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/reference.py", "Run config.",
    lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON document.")
_MATMUL_N = flags.DEFINE_integer(
    "matmul_n", 2048, "Size of the square float32 matmul whose best time is "
    "the peak (a GPU needs 8192 to fill).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: a new temporary one, kept).")


def loop_once_flops(f, *args):
  return measure.flops_of(jax.jit(f).lower(*args).compile())


def server_class_step_flops(s, cfg: server_lib.ServerConfig):
  """FLOPs of one server class step (loss, image gradient, update).

  Counted on the step's update program alone: psi_t and the augmentations
  are drawn once per iteration, not per class, by a program of their own.
  """
  _, step = server_lib.make_step(s.model, s.input_shape, 1, cfg)
  optimizer = dm.make_optimizer(cfg.lr, cfg.momentum)
  d = models.feature_dim(s.model, s.input_shape)
  state = dm.init_state(jnp.zeros((1, cfg.ipc) + s.input_shape), optimizer)
  targets = losses.ClassMoments(
      jnp.zeros((1, d)), jnp.zeros((1, d)), jnp.ones((1,), bool))
  inputs = step.inputs(s.root, jnp.int32(0))
  return measure.flops_of(step.update.lower(state, *inputs, targets)
                          .compile())


def shared_local_class_step_flops(s, lcfg, num_clients):
  """FLOPs of one class step of local DM on the shared networks, all clients."""
  optimizer, step = client_lib.shared_local_step(s.model, s.input_shape, 1,
                                                 lcfg)
  d = models.feature_dim(s.model, s.input_shape)
  images = jnp.zeros((num_clients, 1, lcfg.ipc) + s.input_shape)
  states = jax.vmap(lambda im: dm.init_state(im, optimizer))(images)
  z = jnp.zeros((num_clients, 1, d))
  inputs = step.inputs(s.root, jnp.int32(0))
  return measure.flops_of(step.update.lower(
      states, *inputs, z, z, jnp.ones((num_clients, 1), bool)).compile())


def eval_flops(s, num_train):
  """(FLOPs of one SGD step on the whole set, FLOPs of one test logit)."""
  cfg = s.config.eval
  strategy = "_".join(augment.parse_strategy(s.dsa_strategy)) if cfg.dsa \
      else ""
  kwargs = tuple(sorted(cfg.model_kwargs.to_dict().items()))
  programs = evaluate.compiled_programs(
      cfg.arch, s.dataset.num_classes, kwargs, strategy, cfg.batch_size, 1, 1,
      None)
  x = jnp.zeros((num_train,) + s.input_shape)
  y = jnp.zeros((num_train,), jnp.int32)
  key = jax.random.key(0)
  hyper = (np.float32(cfg.lr), np.float32(cfg.momentum),
           np.float32(cfg.weight_decay))
  if num_train > cfg.batch_size:
    raise ValueError("eval_flops assumes one batch per epoch")
  step = measure.flops_of(programs.train_net.lower(key, x, y, *hyper).compile())
  model = models.make_model(cfg.arch, s.dataset.num_classes, **dict(kwargs))
  params = models.init_params(model, key, s.input_shape)
  init = loop_once_flops(
      lambda k: models.init_params(model, k, s.input_shape), key)
  logit = loop_once_flops(models.logits_fn(model), params, x[:1])
  return step - init, logit


def server_iteration_times(workdir, server_wall_s):
  """The server phase's per-iteration wall times, from ``metrics.jsonl``.

  A server row is written when its iteration's losses reach the host, so
  the differences of consecutive rows' times are the iterations' wall
  times (the step, the host's work and the row's writing). ``first_s`` is
  the rest of the phase: the aggregation, the starting set, the update
  program's compilation and the first iteration.
  """
  rows = sorted((r for r in metrics_lib.read_metrics(workdir)
                 if r["phase"] == "server"), key=lambda r: r["step"])
  times = np.array([r["time"] for r in rows])
  steps = np.diff(times)
  return {"iterations": len(rows),
          "first_s": server_wall_s - float(times[-1] - times[0]),
          "step_median_s": float(np.median(steps)),
          "step_mean_s": float(steps.mean()),
          "step_max_s": float(steps.max())}


def phase_flops(s, results):
  """FLOPs of each phase of the run (see the module docstring)."""
  # The ConvNet's first block as XLA's ops: the CPU kernels that run it are
  # custom calls, which XLA's cost analysis counts as no FLOPs.
  with cpu_first_block.xla_ops():
    return _phase_flops(s, results)


def _phase_flops(s, results):
  cfg = s.config
  T, C = cfg.num_iterations, s.dataset.num_classes
  counts = np.asarray(results["client_class_counts"])
  slots = int(s.stats_spec.slots_per_class(counts).sum())
  per_image = measure.flops_per_image(s.stats_spec)[0]
  out = {"client_stats": per_image * slots * T}
  lcfg = setup_lib.local_config(cfg, s.dsa_strategy)
  if cfg.local.enabled and cfg.local.networks == "shared":
    out["local_distill"] = (shared_local_class_step_flops(
        s, lcfg, cfg.partition.num_clients) * C * lcfg.iterations)
  out["server"] = (server_class_step_flops(s, setup_lib.server_config(s))
                   * C * T)
  n_syn = C * cfg.server.ipc * (4 if cfg.server.pae else 1)
  step, logit = eval_flops(s, n_syn)
  out["evaluate"] = cfg.eval.num_nets * (
      step * cfg.eval.epochs + logit * len(s.dataset.test_y))
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  config.checkpoint.every = 0  # time the algorithm, not checkpoint writes
  device = jax.devices()[0]
  env = measure.environment()
  record = provenance.start()
  load_start = record["load_average_start"]
  logging.info("load average at start: %s", load_start)
  peak_start = measure.matmul_peak(device, _MATMUL_N.value, 10)
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="collabdm_reference_")
  t0 = time.perf_counter()
  results = pipeline.run_distillation(config, workdir)
  wall = time.perf_counter() - t0
  peak_end = measure.matmul_peak(device, _MATMUL_N.value, 10)
  peak = max(peak_start["gflops"], peak_end["gflops"])
  s = setup_lib.setup(config)
  flops = phase_flops(s, results)
  phases = {}
  for name, seconds in results["wall_s"].items():
    if name == "total":
      continue
    entry = {"wall_s": seconds}
    if name in flops:
      entry["flops"] = flops[name]
      entry["gflops"] = flops[name] / seconds / 1e9
      entry["fraction_of_matmul_peak"] = entry["gflops"] / peak
    phases[name] = entry
  if "server" in phases:
    phases["server"]["iterations"] = server_iteration_times(
        workdir, phases["server"]["wall_s"])
  total_flops = sum(flops.values())
  doc = {
      "config": "experiments/configs/reference.py",
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "workdir": str(workdir),
      "total_s": results["wall_s"]["total"],
      "script_wall_s": wall,
      "accuracy_mean": results["accuracy_mean"],
      "accuracy_std": results["accuracy_std"],
      "accuracies": results["accuracies"],
      "phases": phases,
      "total_flops": total_flops,
      "total_gflops": total_flops / results["wall_s"]["total"] / 1e9,
      "total_fraction_of_matmul_peak": (
          total_flops / results["wall_s"]["total"] / 1e9 / peak),
      "matmul_peak_gflops": peak,
      "matmul_peak": {"start": peak_start, "end": peak_end},
      "load_average_start": load_start,
      "load_average_end": list(os.getloadavg()),
      # Whether the ConvNet's first block ran as the compiled CPU kernels
      # (COLLABDM_CPU_KERNELS=0 turns them off, for a side-by-side run).
      "cpu_first_block_kernel": cpu_first_block.enabled(),
      "peak_rss_mb": measure.peak_rss_mb(),
      "environment": env,
      "config_values": config.to_dict(),
      "upload_bytes_total": results["upload_bytes_total"],
      "provenance": provenance.finish(record),
  }
  measure.write_document(doc, _OUT.value)


if __name__ == "__main__":
  app.run(main)

"""The server step, timed, and an end-to-end run of a config."""

import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from collabdm_jax import dm
from collabdm_jax import losses
from collabdm_jax import models
from collabdm_jax import server as server_lib
from experiments.benchlib import cases
from experiments.benchlib import measure

REPO = pathlib.Path(__file__).resolve().parents[2]


def _server_inputs(spec, cfg, optimizer):
  """Random synthetic images and targets for the server step."""
  C, shape = cases.NUM_CLASSES, spec.input_shape
  rng = np.random.default_rng(1)
  images = rng.standard_normal((C, cfg.ipc) + shape, np.float32)
  state = dm.init_state(jnp.asarray(images), optimizer)
  D = models.feature_dim(spec.model, shape)
  targets = losses.ClassMoments(
      mean=jnp.asarray(rng.standard_normal((C, D), np.float32)),
      std=jnp.zeros((C, D)), valid=jnp.ones((C,), bool))
  return state, targets


def _time_steps(step, state, targets, steps):
  """Warm-up step (compile), then ``steps`` timed steps; no retracing."""
  root = jax.random.key(0)
  with measure.jax_events() as events:
    t0 = time.perf_counter()
    state, class_losses = step(state, root, jnp.int32(0), targets)
    class_losses.block_until_ready()
    warm = time.perf_counter() - t0
    after_warm = events.snapshot()
    times = []
    for t in range(1, steps + 1):
      t0 = time.perf_counter()
      state, class_losses = step(state, root, jnp.int32(t), targets)
      class_losses.block_until_ready()
      times.append(time.perf_counter() - t0)
    after = events.snapshot()
  if after != after_warm:
    raise RuntimeError(f"server step retraced/recompiled: {events.traces}")
  return warm, times, class_losses


def server_case(dataset, sizes, iterations, name=None,
                compute_dtype="float32", device=None):
  """Times the server's DM iteration step (all classes) on ``dataset``."""
  spec = cases.make_spec(dataset, sizes)
  cfg = server_lib.ServerConfig(ipc=sizes["server_ipc"],
                                dsa_strategy=spec.dsa_strategy,
                                compute_dtype=compute_dtype)
  optimizer, step = server_lib.make_step(spec.model, spec.input_shape,
                                         cases.NUM_CLASSES, cfg)
  state, targets = _server_inputs(spec, cfg, optimizer)
  if device is not None:
    state, targets = jax.device_put((state, targets), device)
  warm, times, class_losses = _time_steps(step, state, targets,
                                          sizes["server_steps"])
  mean = float(np.mean(times))
  return {
      "name": name or f"server_{dataset}", "dataset": dataset, "ipc": cfg.ipc,
      "compute_dtype": compute_dtype,
      "backend": (device.platform if device is not None
                  else jax.default_backend()),
      "num_classes": cases.NUM_CLASSES, "dsa_strategy": cfg.dsa_strategy,
      "warmup_s_including_compile": warm, "step_times_s": times,
      "step_s_median": statistics.median(times), "step_s_mean": mean,
      "linearity": measure.linearity(times),
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
  child_env = dict(os.environ, **(env or {}))
  with tempfile.TemporaryDirectory(prefix="collabdm_bench_") as workdir:
    cmd = [sys.executable, "-m", "launch.distill", f"--config={config}",
           f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in pairs]]
    cases.log(f"end-to-end: {' '.join(cmd[1:])}")
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
      "peak_rss_mb": measure.peak_rss_mb(resource.RUSAGE_CHILDREN),
  }

"""What one FedAvg or DENSE cell of the reference table costs on this machine.

Measures, at the settings of ``experiments/configs/reference_table.py``
(full Fashion-MNIST, the instance-norm ConvNet of width 128 and depth 3,
``fmnist_table_paper.baseline_settings()``), the three kinds of work that
make up the two baselines' cells, and projects a cell's time from them:

* ``client_training``: FedAvg's client SGD (``fedavg.client_programs``:
  batch 256, DSA, micro-batches of ``evaluate.MICRO_BATCH_CPU``) for one
  epoch over ``--client_images`` training images, with the models' own
  kernels and with ``fast_convnet``'s (what ``fedavg`` uses on CPU),
  alternating in ONE process (``--pairs`` pairs after one warm-up epoch of
  each, so compilation is outside the times). Per kernel: the time per
  sample-step of each call; ``ratio_median``: the median over pairs of
  models' time / fast time (a slow drift of the load does not bias it).
* ``dense_server``: per kernel (as above; the baselines' networks use
  ``fast_convnet``'s on CPU for teachers, student and generator gradients),
  ``dense.distill`` for one seed with K random teachers at the table's
  batches (``dense_synthesis_batch`` generated samples per step, KD batch
  ``dense_kd_batch``; 256 and 256, DENSE's reference, until 80e32d8 set
  the table's DENSE server to default.py's 30 x 10 x 64), run
  for ``--dense_rounds`` rounds with 1 and with ``--dense_g_steps``
  generator steps per round (after a warm-up run of each). The two runs
  differ only in generator steps, so
  ``generator_step_s = (T_many - T_one) / (rounds * (g_steps - 1))`` and
  ``kd_step_s = (T_one - rounds * generator_step_s) / kd_steps``
  (``dense.server_budget``; a round's other work counts as KD), each from
  the medians over ``--repeats``.

``projection`` multiplies the ``fast_convnet`` figures by the reference
budgets. A FedAvg search runs every learning rate of ``local_lrs`` on the
85 % training split (about 51,000 of a partition's 60,000 images) until
``local_patience`` checks every ``local_val_every`` epochs bring no
improvement, so a search run lasts at
least ``local_val_every * (local_patience + 1)`` epochs and at most
``local_epochs``; the refit trains ``eval.num_nets`` models on all 60,000
images for the chosen epochs (at least ``local_val_every``). Which epochs
the search chooses is only known by running it, so the projection gives the
lower bound (every client's best check is its first) and the upper bound
(every run lasts ``local_epochs``). A DENSE cell distils ``eval.num_nets``
students, each ``dense_epochs * dense_g_steps`` generator steps and
``server_budget``'s KD steps (the pool grows by ``dense_synthesis_batch``
samples a round and every round passes over all of it), plus the client
models it shares with FedAvg.

  python -m experiments.baseline_cost \\
      --out=experiments/results/client_training/baseline_cost.json

About 11 minutes on an idle 2-core machine. Time it on an otherwise idle
machine; the load average is recorded at the start and end.
"""

import dataclasses
import pathlib
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from collabdm_jax import evaluate  # noqa: E402
from collabdm_jax import provenance  # noqa: E402
from collabdm_jax import setup as setup_lib  # noqa: E402
from collabdm_jax.baselines import dense  # noqa: E402
from collabdm_jax.baselines import fedavg  # noqa: E402
from experiments.benchlib import measure  # noqa: E402
from experiments.configs import reference_table  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON document.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Tiny sizes (embedded Fashion-MNIST subset, width 8, "
    "depth 2, small batches): tests, CI. Its numbers project nothing.")
_CLIENT_IMAGES = flags.DEFINE_integer(
    "client_images", 2560, "Training images per timed client epoch.")
_PAIRS = flags.DEFINE_integer("pairs", 4, "Timed (models, fast) epoch pairs.")
_TEACHERS = flags.DEFINE_integer("teachers", 5, "DENSE's K (clients).")
_DENSE_ROUNDS = flags.DEFINE_integer("dense_rounds", 3,
                                     "Rounds per timed DENSE run.")
_DENSE_G_STEPS = flags.DEFINE_integer(
    "dense_g_steps", 4, "Generator steps per round of the longer DENSE run.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs of each DENSE budget.")


# The two kernel choices timed side by side (``nets.Net.fast_kernels``).
KERNELS = {"models": False, "fast_convnet": True}


def reference_setup(quick: bool):
  """The reference table's setup (K = 5, alpha = 0.5, seed 0's config)."""
  c = reference_table.base_config()
  c.method = "fedavg"
  if quick:
    c.data_kwargs.max_train_per_class = 60
    c.data_kwargs.max_test_per_class = 10
    c.model.width = c.eval.model_kwargs.width = 8
    c.model.depth = c.eval.model_kwargs.depth = 2
    c.baseline.local_batch = 32
    c.baseline.dense_synthesis_batch = 16
    c.baseline.dense_kd_batch = 16
  return setup_lib.setup(c)


def time_client_training(s, images: int, pairs: int):
  """Alternating one-epoch trainings with each kernel (module docstring)."""
  net = fedavg.baseline_net(s)
  lcfg = fedavg.local_train_config(s)
  n = min(images, len(s.dataset.train_y))
  x = jnp.asarray(np.asarray(s.train_x[:n], np.float32))
  y = jnp.asarray(np.asarray(s.dataset.train_y[:n], np.int32))
  batch = min(lcfg.batch_size, n)
  micro = evaluate.default_micro_batch()
  key = [jax.random.key(0)]
  programs = {name: fedavg.client_programs(
      dataclasses.replace(net, fast_kernels=fast), tuple(s.input_shape),
      batch, lcfg.dsa_strategy, micro) for name, fast in KERNELS.items()}

  def epoch(name):
    t = time.perf_counter()
    params, _ = fedavg.train_runs(programs[name], key, key,
                                  [lcfg.lrs[0]], x, y, n, 1, lcfg)
    jax.block_until_ready(params)
    return time.perf_counter() - t

  warm = {name: round(epoch(name), 3) for name in KERNELS}
  per_sample = {name: [] for name in KERNELS}
  ratios = []
  for p in range(pairs):
    order = list(KERNELS) if p % 2 == 0 else list(KERNELS)[::-1]
    t = {name: epoch(name) for name in order}
    for name in KERNELS:
      per_sample[name].append(t[name] / n)
    ratios.append(t["models"] / t["fast_convnet"])
  return {
      "images": n, "batch": batch, "micro_batch": micro,
      "dsa_strategy": lcfg.dsa_strategy,
      "first_epoch_s_with_compile": warm,
      "s_per_sample_step": {k: [round(v, 7) for v in vs]
                            for k, vs in per_sample.items()},
      "s_per_sample_step_median": {k: round(statistics.median(vs), 7)
                                   for k, vs in per_sample.items()},
      "ratio_median": round(statistics.median(ratios), 3),
      "ratios": [round(r, 3) for r in ratios],
  }


def time_dense_server(s, net, teachers_k: int, rounds: int, g_steps: int,
                      repeats: int):
  """``generator_step_s`` and ``kd_step_s`` of ``net`` from two budgets
  (docstring)."""
  base = dense.dense_config(s, net)
  teachers = jax.tree.map(
      lambda *a: jnp.stack(a),
      *[net.init(jax.random.key(100 + k), s.input_shape)
        for k in range(teachers_k)])
  mean = std = None
  if len(s.input_shape) == 3:
    mean, std = s.dataset.mean, s.dataset.std
  cfgs = {1: dataclasses.replace(base, epochs=rounds, g_steps=1),
          g_steps: dataclasses.replace(base, epochs=rounds, g_steps=g_steps)}

  def run(g):
    t = time.perf_counter()
    student, _, _ = dense.distill(jax.random.key(7), teachers, net,
                                  s.input_shape, s.dataset.num_classes,
                                  cfgs[g], mean, std)
    jax.block_until_ready(student)
    return time.perf_counter() - t

  warm = {str(g): round(run(g), 3) for g in cfgs}
  times = {g: [] for g in cfgs}
  for r in range(repeats):
    for g in (cfgs if r % 2 == 0 else list(cfgs)[::-1]):
      times[g].append(run(g))
  t_one = statistics.median(times[1])
  t_many = statistics.median(times[g_steps])
  gen = (t_many - t_one) / (rounds * (g_steps - 1))
  kd_steps = dense.server_budget(cfgs[1])["kd_steps"]
  return {
      "teachers": teachers_k, "rounds": rounds,
      "g_steps": [1, g_steps],
      "synthesis_batch": base.synthesis_batch, "kd_batch": base.kd_batch,
      "kd_steps_per_run": kd_steps,
      "first_run_s_with_compile": warm,
      "run_s": {str(g): [round(v, 3) for v in vs] for g, vs in times.items()},
      "generator_step_s": round(gen, 4),
      "kd_step_s": round((t_one - rounds * gen) / kd_steps, 4),
  }


def projection(s, client, server):
  """Hours of one reference-table cell (module docstring), bounds."""
  lcfg = fedavg.local_train_config(s)
  b = s.config.baseline
  seeds = int(s.config.eval.num_nets)
  n_all = len(s.dataset.train_y)
  n_search = n_all * (1 - lcfg.val_fraction)
  t = client["s_per_sample_step_median"]["fast_convnet"]
  shortest = lcfg.val_every * (lcfg.patience + 1)
  bounds = {
      "lower": (len(lcfg.lrs) * shortest * n_search
                + seeds * lcfg.val_every * n_all),
      "upper": (len(lcfg.lrs) * lcfg.epochs * n_search
                + seeds * lcfg.epochs * n_all)}
  fedavg_h = {k: round(v * t / 3600, 2) for k, v in bounds.items()}
  full = dataclasses.replace(dense.dense_config(s), epochs=int(b.dense_epochs),
                             g_steps=int(b.dense_g_steps))
  budget = dense.server_budget(full)
  dense_h = seeds * (budget["generator_steps"] * server["generator_step_s"]
                     + budget["kd_steps"] * server["kd_step_s"]) / 3600
  return {
      "train_images": n_all, "search_images": round(n_search),
      "learning_rates": list(lcfg.lrs), "seeds_per_cell": seeds,
      "search_run_epochs": [shortest, lcfg.epochs],
      "refit_epochs": [lcfg.val_every, lcfg.epochs],
      "client_sample_steps": {k: round(v) for k, v in bounds.items()},
      "fedavg_cell_h": fedavg_h,
      "dense_server_budget_per_seed": budget,
      "dense_server_h_per_cell": round(dense_h, 2),
      "note": ("FedAvg's client models serve the DENSE cell of the same "
               "partition and seed (client cache), so a DENSE cell adds "
               "dense_server_h_per_cell to its FedAvg cell. The DENSE "
               "figure is for K = teachers; its cost grows with K."),
  }


def main(argv):
  del argv
  record = provenance.start()
  quick = _QUICK.value
  s = reference_setup(quick)
  client = time_client_training(s, 64 if quick else _CLIENT_IMAGES.value,
                                1 if quick else _PAIRS.value)
  net = fedavg.baseline_net(s)
  server = {name: time_dense_server(
      s, dataclasses.replace(net, fast_kernels=fast),
      2 if quick else _TEACHERS.value, 2 if quick else _DENSE_ROUNDS.value,
      2 if quick else _DENSE_G_STEPS.value, 1 if quick else _REPEATS.value)
            for name, fast in KERNELS.items()}
  doc = {
      "benchmark": "baseline_cost",
      "quick": quick,
      "environment": measure.environment(),
      "client_training": client,
      "dense_server": server,
      "projection": projection(s, client, server["fast_convnet"]),
      "provenance": provenance.finish(record),
  }
  measure.write_document(doc, _OUT.value)


if __name__ == "__main__":
  app.run(main)

"""The reference config's synthesis phases in two checkouts, side by side.

A whole reference run (``experiments/reference_bench.py``) varies by 5-15 %
per phase from one sitting to the next on this project's shared 2-core VM,
more than a change to the server or local DM's compilation moves it. This
times those phases for two checkouts of the repository (``--trees``)
alternately, ``--rounds`` rounds, each in a fresh process (compilation
included, as in a run), in the order a run has them:

* ``client_stats``: the client pass (``client.client_stats``) of the
  reference config's 5 clients over ``--stats_iterations`` iterations, the
  full Fashion-MNIST partition (it also compiles what the later phases
  reuse, as in a run);
* ``local_distill``: ``client.shared_local_distill`` of those 5 clients for
  the reference config's 100 iterations on the statistics of the pass,
  cycled (a run has 100 iterations of statistics; the work per iteration
  is the same);
* ``server``: ``server.synthesize`` for 100 iterations, ipc 10, from those
  clients' local images, on the pass's aggregated targets cycled likewise;
  ``server_first_iteration_s`` is the first iteration's time (its
  compilation).

Only public functions that both checkouts have are called. Prints the
document and writes it to ``--out``:

  python -m experiments.phase_pair --trees=/path/to/old,/path/to/new \\
      --out=experiments/results/reference/phase_pair.json

About 1 minute per process. Time it on an otherwise idle machine; the load
average is recorded per process.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from collabdm_jax import provenance  # pylint: disable=g-import-not-at-top
from experiments.benchlib import measure  # pylint: disable=g-import-not-at-top

_TREES = flags.DEFINE_list("trees", None, "Two (or more) checkouts to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
_STATS_ITERATIONS = flags.DEFINE_integer(
    "stats_iterations", 8, "Iterations of the timed client pass.")
_CONFIG = flags.DEFINE_string(
    "config", "reference", "Config module under experiments/configs (smoke: "
    "a seconds-sized check of this script).")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON document.")

# Runs in the child, with the checkout under test first on sys.path.
CHILD = r"""
import importlib, json, os, sys, time
import numpy as np
import jax
import jax.numpy as jnp
import collabdm_jax
from collabdm_jax import client, losses, server, setup as setup_lib

T_STATS = int(sys.argv[1])
cfg = importlib.import_module("experiments.configs." + sys.argv[2]).get_config()
out = {"package": collabdm_jax.__file__,
       "load_average_start": list(os.getloadavg())}
s = setup_lib.setup(cfg)
C = s.dataset.num_classes
ids = list(range(cfg.partition.num_clients))
xs = [s.train_x[s.partition.client_indices[k]] for k in ids]
ys = [s.dataset.train_y[s.partition.client_indices[k]] for k in ids]
t0 = time.perf_counter()
stats = client.client_stats(s.root, xs, ys, ids, s.stats_spec, T_STATS)
out["client_stats_s"] = time.perf_counter() - t0
out["client_stats_iterations"] = T_STATS
T = cfg.num_iterations
cycle = lambda a: None if a is None else np.concatenate(
    [a] * -(-T // a.shape[1]), axis=1)[:, :T]
full = client.ClientStats(cycle(stats.means), cycle(stats.counts),
                          stats.class_counts, cycle(stats.second_moments))
lcfg = setup_lib.local_config(cfg, s.dsa_strategy)
t0 = time.perf_counter()
local = client.shared_local_distill(s.root, xs, ys, ids, full, C, s.model,
                                    s.input_shape, lcfg)
out["local_distill_s"] = time.perf_counter() - t0
out["local_iterations"] = lcfg.iterations
sums = losses.class_moment_sums(full.means, full.counts, full.class_counts,
                                None, cfg.server.weighting)
targets = losses.moments_from_sums(sums)
pool_x = np.concatenate([im for im, _ in local])
pool_y = np.concatenate([lb for _, lb in local])
init = server.initial_synthetic_set(jax.random.key(1), "local", C,
                                    cfg.server.ipc, s.input_shape, pool_x,
                                    pool_y)
done = []
t0 = time.perf_counter()
server.synthesize(s.root, [(0, targets)], s.model, s.input_shape, C,
                  setup_lib.server_config(s), init,
                  on_iteration=lambda t, st, l: done.append(
                      (float(np.asarray(l).sum()), time.perf_counter())))
out["server_s"] = time.perf_counter() - t0
out["server_first_iteration_s"] = done[0][1] - t0
out["server_iterations"] = len(done)
out["server_final_loss"] = done[-1][0]
out["load_average_end"] = list(os.getloadavg())
print("RESULT " + json.dumps(out))
"""


def run_child(tree, stats_iterations, config):
  env = dict(os.environ, PYTHONPATH=str(tree))
  proc = subprocess.run(
      [sys.executable, "-c", CHILD, str(stats_iterations), config], cwd=tree,
      env=env, capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"the child in {tree} failed:\n{proc.stderr[-3000:]}")


def main(argv):
  del argv
  trees = [pathlib.Path(t).resolve() for t in _TREES.value or []]
  if len(trees) < 2:
    raise app.UsageError("--trees needs two checkouts or more")
  record = provenance.start()
  runs = {str(t): [] for t in trees}
  for r in range(_ROUNDS.value):
    for tree in trees:
      res = run_child(tree, _STATS_ITERATIONS.value, _CONFIG.value)
      runs[str(tree)].append(res)
      if not res["package"].startswith(str(tree)):
        raise RuntimeError(f"the child in {tree} imported {res['package']}")
      print(f"round {r} {tree}: " + ", ".join(
          f"{k} {v:.2f}" for k, v in res.items() if k.endswith("_s")),
            flush=True)
  phases = ("client_stats_s", "local_distill_s", "server_s",
            "server_first_iteration_s")
  doc = {
      "config": f"experiments/configs/{_CONFIG.value}.py",
      "trees": {str(t): provenance.git_state(t) for t in trees},
      "rounds": _ROUNDS.value,
      "runs": runs,
      "median_s": {t: {p: statistics.median(x[p] for x in rs) for p in phases}
                   for t, rs in runs.items()},
  }
  base = str(trees[0])
  doc["median_ratio_vs_first_tree"] = {
      t: {p: statistics.median(
          b[p] / a[p] for a, b in zip(runs[base], rs)) for p in phases}
      for t, rs in runs.items() if t != base}
  doc["provenance"] = provenance.finish(record)
  measure.write_document(doc, _OUT.value)


if __name__ == "__main__":
  app.run(main)

"""Full-data detector: the evaluation network trained on every site's raw data.

The upper bound of an intrusion-detection table: the same evaluation
architecture, optimiser and test split as the distilled sets
(``config.eval``), but trained on all pooled training rows, as if every site
shipped its raw traffic to one place. Run with any run config:

  python -m experiments.full_data_detector --config=experiments/configs/ids_5g.py:drop_gtp --workdir=/tmp/full_5g_nogtp

Writes ``results.json`` in the pipeline's format with method ``"full_data"``
(accuracy, balanced accuracy, per-class recall, false-positive rate over
``config.eval.num_nets`` networks). ``upload_bytes_per_client`` is what each
site would have to send: its raw rows as float32 plus int32 labels.

A distilled set is a few rows per class, so its evaluation runs hundreds of
epochs of one batch each; the full table has thousands of batches per pass,
hence the separate (much smaller) ``--epochs``.
"""

import dataclasses
import logging
import pathlib
import time
from typing import Dict

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from collabdm_jax import evaluate
from collabdm_jax import keys as keys_lib
from collabdm_jax import outputs
from collabdm_jax import setup as setup_lib

METHOD = "full_data"



def _check_epochs(epochs):
  if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")


def eval_config(s, epochs: int) -> evaluate.EvalConfig:
  """The run's evaluator (``setup.eval_config``) with ``epochs`` full passes
  and no partition-and-expansion (real rows are not synthetic images)."""
  _check_epochs(epochs)
  return dataclasses.replace(setup_lib.eval_config(s), epochs=epochs,
                             pae=False)


def raw_upload_bytes(s) -> Dict[str, int]:
  """Bytes each site would send to pool its data: float32 rows + int32 labels."""
  row_bytes = int(np.prod(s.dataset.train_x.shape[1:])) * 4 + 4
  return {str(k): int(len(idx)) * row_bytes
          for k, idx in enumerate(s.partition.client_indices)}


def run(config, workdir, epochs: int = 30) -> Dict:
  """Trains ``config.eval`` networks on all training rows; writes results.json.

  Args:
    config: a run config (e.g. ``experiments/configs/ids_5g.py``); its data,
      partition (for the per-site upload sizes), seed and ``eval`` settings
      are used, ``method`` and the distillation settings are ignored.
    workdir: output folder (created).
    epochs: passes over the pooled training set (>= 1).

  Returns:
    The results dict written to ``workdir/results.json``.
  """
  _check_epochs(epochs)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  timings = {}
  t0 = time.perf_counter()
  s = setup_lib.setup(config)
  timings["setup"] = time.perf_counter() - t0
  ecfg = eval_config(s, epochs)
  t1 = time.perf_counter()
  # The pipeline's evaluation stream, so net i starts from the same weights
  # as the i-th network trained on a distilled set of the same run.
  res = evaluate.evaluate_synthetic(
      keys_lib.eval_key(s.root), s.train_x, s.dataset.train_y, s.test_x,
      s.dataset.test_y, num_classes=s.dataset.num_classes, config=ecfg)
  timings["evaluate"] = time.perf_counter() - t1
  timings["total"] = time.perf_counter() - t0
  extra = {"method": METHOD, "ipc": None,
           "train_rows": int(len(s.dataset.train_y)), "epochs": int(epochs)}
  results = outputs.results_record(s, timings, res.accuracies,
                                   res.predictions, raw_upload_bytes(s), extra)
  outputs.write_results(workdir, results)
  logging.info("full-data detector accuracy %.4f +- %.4f over %d nets",
               res.mean, res.std, len(res.accuracies))
  return results


def define_flags():
  """This program's absl flags, defined only when it runs as a program so
  that importing ``run`` leaves the global flags alone."""
  config_flags.DEFINE_config_file(
      "config", "experiments/configs/ids_5g.py", "Run config file.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_integer("epochs", 30,
                       "Training epochs over the full pooled training set.")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  FLAGS = flags.FLAGS
  results = run(FLAGS.config, FLAGS.workdir, FLAGS.epochs)
  print(f"{METHOD} on {results['dataset']}: test accuracy "
        f"{100 * results['accuracy_mean']:.2f} +- "
        f"{100 * results['accuracy_std']:.2f} %, balanced accuracy "
        f"{100 * results['balanced_accuracy_mean']:.2f} % over "
        f"{results['n_eval']} networks; results in {FLAGS.workdir}/results.json")


if __name__ == "__main__":
  define_flags()
  app.run(main)

"""Simulated CollabDM run: every client and the server in one process.

  python -m launch.distill --config=experiments/configs/default.py --workdir=/tmp/collabdm

Writes ``synthetic.npz`` and ``results.json`` under ``--workdir`` and prints
the accuracy of networks trained on the synthetic set.
"""

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from collabdm_jax import pipeline
from collabdm_jax import plots
from launch import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Experiment config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)


def main(argv):
  del argv
  common.init_runtime()
  results = pipeline.run(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() > 0:
    return  # Process 0 evaluates and writes the outputs of a multi-host run.
  # Pictures for people: the synthetic set and the client x class counts.
  plots.run_figures(_WORKDIR.value, overwrite=True)
  print(f"{results['method']} on {results['dataset']}: test accuracy "
        f"{100 * results['accuracy_mean']:.2f} +- "
        f"{100 * results['accuracy_std']:.2f} % over {results['n_eval']} "
        f"networks; results in {_WORKDIR.value}/results.json")


if __name__ == "__main__":
  app.run(main)

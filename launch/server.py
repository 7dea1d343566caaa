"""The CollabDM server: read the clients' messages, synthesise, evaluate.

  python -m launch.server --config=experiments/configs/default.py --message_dir=/tmp/msgs --workdir=/tmp/collabdm

Missing clients are skipped with a warning; invalid messages are rejected
with their reason (also recorded in results.json). With --public_key_dir
only messages signed for this run by their client are accepted. With
--coordinator_address, --num_processes and --process_id (and
--cpu_collectives=gloo on CPUs) several processes share the clients: each
reads its own, process 0 writes the outputs.
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
_MESSAGE_DIR = flags.DEFINE_string("message_dir", None,
                                   "Directory of client messages.",
                                   required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_PUBLIC_KEY_DIR = flags.DEFINE_string(
    "public_key_dir", None, "Directory of the clients' public keys "
    "(launch.keygen): accept only messages signed for this run by their "
    "client. Unset: unsigned uploads are accepted.")


def main(argv):
  del argv
  common.init_runtime()
  results = pipeline.run_server(_CONFIG.value, _MESSAGE_DIR.value,
                                _WORKDIR.value,
                                public_key_dir=_PUBLIC_KEY_DIR.value)
  if jax.process_index() > 0:
    return  # Process 0 evaluates and writes the outputs of a multi-host run.
  plots.run_figures(_WORKDIR.value, overwrite=True)
  print(f"test accuracy {100 * results['accuracy_mean']:.2f} +- "
        f"{100 * results['accuracy_std']:.2f} % from clients "
        f"{results['clients_used']}")


if __name__ == "__main__":
  app.run(main)

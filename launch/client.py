"""One CollabDM client: compute its one-shot message and write it to a file.

  python -m launch.client --config=experiments/configs/default.py --client_id=3 --message_dir=/tmp/msgs

Run one per client (any order, any machine); then ``launch.server``. With
``--signing_key`` (from ``launch.keygen``) the message is signed.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from collabdm_jax import pipeline
from launch import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Experiment config file.",
    lock_config=True)
_CLIENT_ID = flags.DEFINE_integer("client_id", None, "This client's id.",
                                  required=True)
_MESSAGE_DIR = flags.DEFINE_string("message_dir", None,
                                   "Where to write the message.", required=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where this client's config.json, metrics.jsonl and "
    "TensorBoard files go (default <message_dir>/client_<id>_run).")
_SIGNING_KEY = flags.DEFINE_string(
    "signing_key", None, "This client's Ed25519 private key (launch.keygen); "
    "signs the message for this run. Unset: unsigned.")


def main(argv):
  del argv
  common.init_runtime()
  path = pipeline.run_client(_CONFIG.value, _CLIENT_ID.value,
                             _MESSAGE_DIR.value, workdir=_WORKDIR.value,
                             signing_key=_SIGNING_KEY.value)
  print(path)


if __name__ == "__main__":
  app.run(main)

"""CollabDM on one machine through Flower's simulation engine.

  python -m launch.flower --config=experiments/configs/default.py --workdir=/tmp/collabdm_flower

Runs the Flower app of ``collabdm_jax/flower_app.py`` (one round: every
client sends its one-shot message, the server validates, distils and
evaluates) with ``partition.num_clients`` simulated SuperNodes, and writes
what ``launch.server`` writes under ``--workdir`` (clients' config and
metrics under ``--workdir/clients``). With the same config and seed the
synthetic set equals ``launch.distill``'s.

Flower's simulation engine runs the ClientApps in Ray actors
(``pip install -e '.[flower]'`` brings ``flwr[simulation]``); each actor
takes ``--client_cpus`` CPUs, so by default one client runs at a time with
the whole machine, as ``launch.client`` would.
"""

import logging
import os
import pathlib
import sys

from absl import app
from absl import flags
from flwr.simulation import run_simulation
from ml_collections import config_flags

from launch import common

# Ray's workers import the apps from the driver's sys.path; an absolute
# repository root makes them import this checkout's collabdm_jax.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from collabdm_jax import flower_app  # noqa: E402  (after the path fix)

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Experiment config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_CLIENT_CPUS = flags.DEFINE_float(
    "client_cpus", None, "CPUs each simulated client takes (Ray resource); "
    "default: all of them, so clients run one at a time.")
_CLIENT_GPUS = flags.DEFINE_float(
    "client_gpus", 0.0, "GPUs (fractions allowed) each simulated client takes.")
_REPLY_TIMEOUT = flags.DEFINE_float(
    "reply_timeout", flower_app.DEFAULT_REPLY_TIMEOUT_S,
    "Seconds the server waits for the clients' replies.")


def simulate(config, workdir, client_cpus=None, client_gpus=0.0,
             reply_timeout_s=flower_app.DEFAULT_REPLY_TIMEOUT_S):
  """Runs the one-round Flower app on ``num_clients`` simulated nodes."""
  cpus = float(client_cpus or os.cpu_count() or 1)
  server = flower_app.make_server_app(
      config, str(pathlib.Path(workdir).resolve()), connect_timeout_s=60.0,
      reply_timeout_s=reply_timeout_s)
  run_simulation(
      server_app=server, client_app=flower_app.make_client_app(),
      num_supernodes=config.partition.num_clients,
      backend_config={
          "client_resources": {"num_cpus": cpus, "num_gpus": client_gpus},
          "init_args": {"num_cpus": max(int(cpus), os.cpu_count() or 1),
                        "num_gpus": 1 if client_gpus else 0}})


def main(argv):
  del argv
  common.init_runtime()
  # flwr configures its own "flwr" logger; ours goes to stderr as usual.
  logging.getLogger("collabdm_jax").setLevel(logging.INFO)
  simulate(_CONFIG.value, _WORKDIR.value, _CLIENT_CPUS.value,
           _CLIENT_GPUS.value, _REPLY_TIMEOUT.value)
  results = pathlib.Path(_WORKDIR.value) / "results.json"
  if not results.exists():
    raise SystemExit(f"the Flower run wrote no {results}; see the log above")
  print(f"Flower run finished; results in {results}")


if __name__ == "__main__":
  app.run(main)

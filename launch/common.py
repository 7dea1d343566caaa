"""Flags and set-up shared by the launchers."""

import logging
import sys

from absl import flags

from collabdm_jax import parallel

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process runs (jax.distributed).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                     "Number of processes (multi-process).")
PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                  "This process's id (multi-process).")
CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", None,
    "CPU collectives across processes, e.g. 'gloo' (multi-process on CPU).")


def init_runtime():
  """Logging to stderr and, when asked, the multi-process JAX runtime."""
  logging.basicConfig(
      level=logging.INFO, stream=sys.stderr,
      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  # Orbax and friends log every file operation at INFO through absl.
  logging.getLogger("absl").setLevel(logging.WARNING)
  parallel.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value,
                                  PROCESS_ID.value, CPU_COLLECTIVES.value)

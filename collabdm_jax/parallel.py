"""Device meshes for CollabDM: clients spread over every device of every host.

The client pass is embarrassingly parallel over clients, so one named mesh
axis, ``clients``, is all it needs: blocks of clients are split along it with
``jax.shard_map`` (``jax.pmap`` is in maintenance mode and not used here).
On several hosts the same mesh spans all processes' devices once
``initialize_distributed`` has run.
"""

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

CLIENT_AXIS = "clients"


def client_mesh(devices: Optional[Sequence] = None,
                num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes).

  Args:
    devices: explicit devices; default ``jax.devices()``.
    num_devices: use only the first ``num_devices`` of them (e.g. 1 to
      compare against a multi-device run).
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices must be in [1, {len(devices)}], got "
                       f"{num_devices}")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (CLIENT_AXIS,))


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           cpu_collectives: Optional[str] = None) -> bool:
  """Joins a multi-process JAX runtime when asked to; returns True if it did.

  With explicit flags the processes rendezvous at ``coordinator_address``;
  with none, JAX's cluster auto-detection (TPU pods, SLURM, ...) is tried
  only when the environment announces such a cluster. On CPU, collectives
  across processes need ``cpu_collectives='gloo'``.
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if coordinator_address is not None or num_processes is not None:
    if None in (coordinator_address, num_processes, process_id):
      raise ValueError("coordinator_address, num_processes and process_id must "
                       "be given together")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return True
  if any(v in os.environ for v in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                   "MEGASCALE_COORDINATOR_ADDRESS")):
    jax.distributed.initialize()
    return True
  return False

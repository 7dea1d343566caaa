"""Device meshes for CollabDM: clients spread over every device of every host.

The client pass is embarrassingly parallel over clients, so one named mesh
axis, ``clients``, is all it needs: blocks of clients are split along it with
``jax.shard_map`` (``jax.pmap`` is in maintenance mode and not used here).
On several hosts the same mesh spans all processes' devices once
``initialize_distributed`` has run.
"""

import json
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


def local_device_count(mesh: Mesh) -> int:
  """How many of ``mesh``'s devices belong to this process.

  Client blocks are split evenly over the mesh, each process supplying the
  part on its own devices, so those devices must form one contiguous run of
  the ``clients`` axis (``client_mesh`` orders devices by process).
  """
  devices = list(mesh.devices.reshape(-1))
  mine = [i for i, d in enumerate(devices)
          if d.process_index == jax.process_index()]
  if not mine:
    raise ValueError("the mesh has no device of this process "
                     f"(process {jax.process_index()})")
  if mine != list(range(mine[0], mine[0] + len(mine))):
    raise ValueError("this process's devices must be contiguous along the "
                     f"'{CLIENT_AXIS}' axis; build the mesh with client_mesh()")
  return len(mine)


def max_over_processes(values: Sequence[int]) -> np.ndarray:
  """Element-wise maximum of small integer vectors over all processes.

  Single-process: ``values`` as an array. Every process must pass a vector
  of the same length.
  """
  values = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # multi-process only
  return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


def to_global(mesh: Mesh, arrays):
  """Arrays split along ``clients`` from each process's local parts.

  Single-process: the arrays placed on the mesh's devices. Otherwise
  ``jax.make_array_from_process_local_data``: each process passes the rows
  for its own devices and the global array is their concatenation in
  process order, without any process holding the others' data.
  """
  sharding = NamedSharding(mesh, P(CLIENT_AXIS))
  if jax.process_count() == 1:
    return tuple(jax.device_put(a, sharding) for a in arrays)
  return tuple(jax.make_array_from_process_local_data(sharding, a)
               for a in arrays)


def process_clients(num_clients: int) -> list:
  """The ids of the clients this process simulates (a contiguous share).

  Process p of P gets clients ``p*K//P .. (p+1)*K//P - 1``; one process gets
  them all.
  """
  p, n = jax.process_index(), jax.process_count()
  return list(range(p * num_clients // n, (p + 1) * num_clients // n))


def sum_over_processes(array) -> np.ndarray:
  """Sum over processes of an equally shaped array (itself on one process)."""
  array = np.asarray(array)
  if jax.process_count() == 1:
    return array
  from jax.experimental import multihost_utils  # multi-process only
  return np.asarray(multihost_utils.process_allgather(array)).sum(axis=0)


def concat_over_processes(array) -> np.ndarray:
  """Concatenation, in process order, of arrays that differ in length only."""
  array = np.asarray(array)
  if jax.process_count() == 1:
    return array
  from jax.experimental import multihost_utils  # multi-process only
  lengths = np.asarray(multihost_utils.process_allgather(
      np.asarray([array.shape[0]], np.int64))).reshape(-1)
  padded = np.zeros((int(lengths.max()),) + array.shape[1:], array.dtype)
  padded[:array.shape[0]] = array
  parts = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([parts[i, :n] for i, n in enumerate(lengths)])


def allgather_json(obj) -> list:
  """Every process's JSON-serialisable ``obj``, in process order.

  For small records (which clients a process read, what it rejected);
  ``[obj]`` on one process.
  """
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  from jax.experimental import multihost_utils  # multi-process only
  lengths = np.asarray(multihost_utils.process_allgather(
      np.asarray([data.size], np.int64))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  parts = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(parts[i, :n]).decode())
          for i, n in enumerate(lengths)]


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

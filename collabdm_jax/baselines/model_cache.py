"""Client models trained once and reused by every run that would retrain them.

One-shot FedAvg and DENSE start from the same uploads: every client's model,
trained with the FedAvg key and settings (``fedavg.train_local_models``).
In a table sweep the ``fedavg`` and ``dense`` cells of one (partition, seed)
are separate runs, so without a cache each trains the identical client
models, which is most of a FedAvg cell's time and a large part of a DENSE
cell's. With ``config.baseline.client_cache_dir`` set, the first of them
stores the models there and the other reads them back.

An entry is named by a SHA-256 ``fingerprint`` of everything the training
reads: the clients' samples and labels (their bytes), the network, the
local-training settings, the number of seeds, the key, the JAX version and
backend, and a hash of the package's source files (an entry from other
code, committed or not, is never reused). So a config, data or code change
misses the cache instead of reading stale models.

Files: ``<fingerprint>.npz`` (the parameters as arrays keyed by their path
in the nested dicts, read with ``allow_pickle=False``) and
``<fingerprint>.json`` (the training record, the leaf shapes and what the
fingerprint covered), each written to a temporary name and renamed, the
JSON last, so a reader never sees half an entry.

While a training is under way, each client's models are stored as soon as
they are trained, as the partial entry ``<fingerprint>-client<k>``
(``ClientProgress``). A training that is cut off (a time box, a lost
machine) and started again with the same fingerprint reads the clients
it finished instead of training them again. Within a client, every run
(one learning rate's validated search, one seed's refit) stores its state
at each validation check as ``<fingerprint>-client<k>-<run>``
(``RunCheckpoint``), and a restarted run goes on from its last check:
on this project's 2-core CPU one client of a reference-table partition
(K = 5) trains for 0.4 to 5 hours and one of its runs for up to an hour
(``experiments/results/client_training/``), so without these a cut-off
session lost up to a client's hours. A client's run checkpoints are
removed once its models are stored, and its partial entry once the whole
entry is stored. DENSE's server stage saves its students' rounds in the
same directory (``dense.server_checkpoints``), removed once every student
is finished.
"""

import hashlib
import json
import os
import pathlib
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]


FORMAT = "collabdm_jax client models 1"


def flatten_params(params) -> Dict[str, np.ndarray]:
  """Nested-dict parameters as ``{"a/b/c": array}``.

  Raises:
    ValueError: a container other than a dict with string keys.
  """
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not all(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)
               and "/" not in k.key for k in path):
      raise ValueError("parameters must be nested dicts with string keys "
                       f"(without '/'), got the path {jax.tree_util.keystr(path)}")
    flat["/".join(k.key for k in path)] = np.asarray(leaf)
  return flat


def unflatten_params(flat: Dict[str, np.ndarray]):
  """``flatten_params``'s inverse."""
  out: Dict[str, Any] = {}
  for key in sorted(flat):
    node = out
    *parents, leaf = key.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = flat[key]
  return out


def save_params(path, params) -> None:
  """Writes nested-dict parameters as an ``.npz`` (see ``flatten_params``)."""
  with open(path, "wb") as f:
    np.savez(f, **flatten_params(params))


def load_params(path):
  """``save_params``'s file back as nested dicts of arrays, without pickle."""
  with np.load(path, allow_pickle=False) as data:
    return unflatten_params({k: data[k] for k in data.files})


def code_digest() -> str:
  """SHA-256 of this package's Python sources (paths and contents).

  Any edit to the code, committed or not, changes it; unlike a git commit it
  also exists in an installed copy or a tree copied without ``.git``.
  """
  h = hashlib.sha256()
  for path in sorted(PACKAGE_DIR.rglob("*.py")):
    h.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0")
    h.update(path.read_bytes() + b"\0")
  return h.hexdigest()


def fingerprint(key, client_x: Sequence[np.ndarray],
                client_y: Sequence[np.ndarray], description: Dict[str, Any]
                ) -> Tuple[str, Dict[str, Any]]:
  """``(hex digest, what it covers)`` of one client-model training.

  Args:
    key: the training's JAX key.
    client_x, client_y: every client's samples and labels, in client order.
    description: JSON-serialisable settings (network, training config,
      number of seeds, classes, input shape).
  """
  covered = {
      "format": FORMAT,
      "settings": description,
      "key": np.asarray(jax.random.key_data(key)).tolist(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "code": code_digest(),
      "clients": [],
  }
  h = hashlib.sha256()
  for x, y in zip(client_x, client_y):
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    dx = hashlib.sha256(x.tobytes()).hexdigest()
    dy = hashlib.sha256(y.tobytes()).hexdigest()
    covered["clients"].append({"x": [str(x.dtype), list(x.shape), dx],
                               "y": [str(y.dtype), list(y.shape), dy]})
  h.update(json.dumps(covered, sort_keys=True).encode())
  return h.hexdigest(), covered


def _paths(directory, digest):
  d = pathlib.Path(directory)
  return d / f"{digest}.npz", d / f"{digest}.json"


def entry_path(directory, digest) -> pathlib.Path:
  """The ``.npz`` file of the entry ``digest`` in ``directory``."""
  return _paths(directory, digest)[0]


def load(directory, digest) -> Optional[Tuple[Any, Dict[str, Any]]]:
  """``(params, entry)`` stored under ``digest``, or None if there is none.

  Raises:
    ValueError: an entry whose arrays do not match its own record (a
      damaged or foreign file): it is reported, not silently retrained over.
  """
  weights, record = _paths(directory, digest)
  if not record.exists():
    return None
  entry = json.loads(record.read_text())
  params = load_params(weights)
  shapes = {k: list(v.shape) for k, v in flatten_params(params).items()}
  if shapes != entry.get("shapes"):
    raise ValueError(f"client-model cache entry {weights} does not match its "
                     f"record {record}; remove both files to retrain")
  return params, entry


def store(directory, digest, params, record: Dict[str, Any],
          covered: Dict[str, Any]) -> pathlib.Path:
  """Stores ``params`` and its training ``record`` under ``digest``.

  Returns the ``.npz`` path. Temporary files plus renames: a concurrent
  reader sees the whole entry or none of it, and a concurrent writer of the
  same digest (the same models) only replaces identical content.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  weights, record_path = _paths(directory, digest)
  params = jax.device_get(params)
  entry = {"record": record, "covered": covered,
           "shapes": {k: list(v.shape)
                      for k, v in flatten_params(params).items()}}
  suffix = f".tmp{os.getpid()}"
  tmp_w = weights.with_name(weights.name + suffix)
  tmp_r = record_path.with_name(record_path.name + suffix)
  save_params(tmp_w, params)
  tmp_r.write_text(json.dumps(entry))
  os.replace(tmp_w, weights)
  os.replace(tmp_r, record_path)
  return weights


def client_entry_name(digest: str, client: int) -> str:
  """The name of client ``client``'s partial entry of training ``digest``."""
  return f"{digest}-client{int(client)}"


class RunCheckpoint:
  """The last saved state of one long run (see the module docstring).

  ``fedavg.train_runs`` saves its whole state there at each validation
  check (the networks' variables and optimiser state as arrays, the epoch
  and the validation bookkeeping as JSON), ``dense.distill`` after its
  rounds (student, optimiser state and sample pool); started again, each
  goes on from it. Their keys depend only on the epoch or round, so the
  resumed run is the run that was cut off.
  """

  def __init__(self, directory, name: str, covered: Dict[str, Any]):
    self.directory = pathlib.Path(directory)
    self.name = name
    self.covered = covered
    # Wall seconds the run had spent when its loaded state was saved (its
    # record's ``wall_s``): time before a cut that this process did not see.
    self.resumed_s = 0.0

  def load(self, structure) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """``(state, record)`` saved last, or None if the run never checked.

    Args:
      structure: a state of the same run (its freshly initialised one):
        the saved arrays are put back into its tree structure.

    Raises:
      ValueError: a checkpoint whose arrays do not fit ``structure`` (saved
        by other code or damaged).
    """
    hit = load(self.directory, self.name)
    if hit is None:
      return None
    leaves, entry = hit
    ref = jax.tree.leaves(structure)
    got = [leaves["leaf"].get(str(i)) for i in range(len(ref))]
    if len(leaves["leaf"]) != len(ref) or any(
        g is None or g.shape != np.shape(r) for g, r in zip(got, ref)):
      raise ValueError(f"run checkpoint {entry_path(self.directory, self.name)}"
                       f" does not fit this run's state; remove it (and its "
                       f".json) to start the run again")
    self.resumed_s = float(entry["record"].get("wall_s", 0.0))
    return jax.tree.unflatten(jax.tree.structure(structure), got), \
        entry["record"]

  def save(self, state, record: Dict[str, Any]) -> None:
    """Stores ``state`` (any pytree of arrays) with its JSON ``record``."""
    leaves = {str(i): v for i, v in enumerate(jax.tree.leaves(state))}
    store(self.directory, self.name, {"leaf": leaves}, record, self.covered)

  def remove(self) -> None:
    """Deletes the saved state, if any."""
    for path in _paths(self.directory, self.name):
      path.unlink(missing_ok=True)


class ClientProgress:
  """Per-client partial entries of one training (see the module docstring).

  ``fedavg.train_local_models`` calls ``load(k)`` before it trains client
  ``k``, trains each of its runs with ``run_checkpoint(k, run)`` and calls
  ``save(k, ...)`` after; ``clear(K)`` removes the partial entries once the
  whole training is stored.
  """

  def __init__(self, directory, digest: str, covered: Dict[str, Any]):
    self.directory = pathlib.Path(directory)
    self.digest = digest
    self.covered = covered

  def load(self, client: int) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """``(params, report entry)`` of a client trained before, or None."""
    hit = load(self.directory, client_entry_name(self.digest, client))
    return None if hit is None else (hit[0], hit[1]["record"])

  def run_checkpoint(self, client: int, run: str) -> RunCheckpoint:
    """The checkpoint of client ``client``'s run named ``run``."""
    return RunCheckpoint(
        self.directory, f"{client_entry_name(self.digest, client)}-{run}",
        dict(self.covered, client=int(client), run=run))

  def save(self, client: int, params, report_entry: Dict[str, Any]) -> None:
    """Stores client ``client``'s models and its report entry, then removes
    its run checkpoints."""
    store(self.directory, client_entry_name(self.digest, client), params,
          report_entry, dict(self.covered, client=int(client)))
    self._remove(f"{client_entry_name(self.digest, client)}-*")

  def clear(self, num_clients: int) -> None:
    """Removes the partial entries of clients ``0 .. num_clients - 1``."""
    for k in range(num_clients):
      name = client_entry_name(self.digest, k)
      self._remove(name)
      self._remove(f"{name}-*")

  def _remove(self, pattern: str) -> None:
    for suffix in (".npz", ".json"):
      for path in self.directory.glob(pattern + suffix):
        path.unlink(missing_ok=True)

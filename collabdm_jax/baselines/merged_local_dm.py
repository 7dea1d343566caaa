"""Merged local DM: every client distils alone, the server concatenates.

Each client runs the reference's local DM on its own data
(``client.local_distill`` with ``setup.local_config``: ipc
``config.server.ipc // K + 1`` per class unless ``config.local.ipc`` is
set, ``config.local.iterations`` iterations, a fresh network per iteration,
the client's own key ``keys.local_distill_key``), as the paper's merged
local DM baseline does. With ``local.networks="independent"`` that is
bit-for-bit the pool CollabDM's server starts from with ``init="local"``,
and the baseline measures what CollabDM's server iterations add. With the
default ``"shared"``, CollabDM's clients distil under the shared networks
instead (``client.shared_local_distill``), so its starting pool differs
from this baseline's (NSL-KDD, seed 0: this baseline 60.6 %, CollabDM's pooled
rows 60.2 % balanced accuracy, ``experiments/results/nsl_kdd/README.md``).

Budget: the pool holds ``client_ipc * (#clients holding c)`` images of class
c. Where that exceeds ``config.server.ipc``, ipc of them are drawn with the
server's own key exactly as CollabDM's server initialisation draws them
(``server.initial_synthetic_set``), so the kept set equals CollabDM's
initial synthetic set for that class. Where it does not, every pooled image
of the class is kept (no duplicates are added: repeats carry no
information). A class no client holds is absent.
"""

import time

import numpy as np

from collabdm_jax import client as client_lib
from collabdm_jax import keys as keys_lib
from collabdm_jax import server as server_lib
from collabdm_jax import setup as setup_lib


def select_per_class(key, pool_x, pool_y, num_classes, ipc, input_shape):
  """At most ``ipc`` images per class from a pool (see the module docstring).

  Args:
    key: the server's key (``keys.server_key``).
    pool_x: ``[P, ...]`` pooled images; pool_y: ``[P]`` int labels.
    num_classes, ipc, input_shape: the synthetic set's layout.

  Returns:
    ``(images [M, ...] float32, labels [M] int32)``, classes in increasing
    order, ``min(ipc, count_c)`` images of each class c in the pool.
  """
  pool_x = np.asarray(pool_x, np.float32)
  pool_y = np.asarray(pool_y, np.int32)
  if ipc < 1:
    raise ValueError(f"ipc must be >= 1, got {ipc}")
  if len(pool_y) == 0:
    raise ValueError("the pool of local images is empty: no client holds data")
  drawn = server_lib.initial_synthetic_set(key, "local", num_classes, ipc,
                                           input_shape, pool_x, pool_y)
  xs, ys = [], []
  for c in range(num_classes):
    own = pool_x[pool_y == c]
    if len(own) == 0:
      continue
    xs.append(drawn[c] if len(own) >= ipc else own)
    ys.append(np.full(min(ipc, len(own)), c, np.int32))
  return np.concatenate(xs), np.concatenate(ys)


def run(s, timings: dict) -> dict:
  """Local DM on every client, pooled and cut to at most ipc per class.

  Args:
    s: ``setup.Setup``.
    timings: receives ``merged_local_dm`` (wall seconds).

  Returns:
    ``{"images": [M, ...] float32, "labels": [M] int32}``.
  """
  cfg = s.config
  t0 = time.perf_counter()
  lcfg = setup_lib.local_config(cfg, s.dsa_strategy)
  pool_x, pool_y = [], []
  pad_to = client_lib.local_padding(
      [s.dataset.train_y[i] for i in s.partition.client_indices],
      s.dataset.num_classes, lcfg)
  for k in range(cfg.partition.num_clients):
    idx = s.partition.client_indices[k]
    x, y = client_lib.local_distill(
        keys_lib.local_distill_key(s.root, k), s.train_x[idx],
        s.dataset.train_y[idx], s.dataset.num_classes, s.model,
        s.input_shape, lcfg, pad_to=pad_to)
    pool_x.append(x)
    pool_y.append(y)
  images, labels = select_per_class(
      keys_lib.server_key(s.root), np.concatenate(pool_x),
      np.concatenate(pool_y), s.dataset.num_classes, cfg.server.ipc,
      s.input_shape)
  timings["merged_local_dm"] = time.perf_counter() - t0
  return {"images": images, "labels": labels}

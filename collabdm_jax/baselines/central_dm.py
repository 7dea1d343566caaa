"""Central DM: distribution matching on the pooled data of every client.

Not federated (all raw data in one place): the quality CollabDM aims to reach
with the same synthetic budget. It is DM (Zhao & Bilen) as
``client.local_distill`` runs it, on all of ``s.train_x``, with

* ipc = ``config.server.ipc`` and iterations = ``config.num_iterations``
  (the CollabDM server's budget: one random network per iteration);
* real batch per class = ``config.local.batch_real``;
* the image optimiser of DM: lr ``config.baseline.central_lr`` (default 1.0,
  DM's lr_img, rather than the CollabDM server's lr 10 which is tuned for
  its local-image initialisation and ipc >= 100) and momentum
  ``config.local.momentum`` (0.5 by default, DM's);
* initialisation ``config.baseline.central_init`` (default ``"real"``: ipc
  real images per class, 2x2 mosaics with PAE);
* the server's loss options (``config.server.pae``, ``std_weight``), so the
  objective is the one CollabDM's server optimises, with exact targets.
"""

import time

from collabdm_jax.baselines import common
from collabdm_jax import client as client_lib


def local_dm_config(s) -> client_lib.LocalDMConfig:
  """The DM settings of the central baseline (see the module docstring)."""
  cfg, b = s.config, s.config.baseline
  lr = common.check_positive(b.central_lr, "baseline.central_lr")
  iterations = common.check_positive(cfg.num_iterations, "num_iterations",
                                     integer=True, allow_zero=True)
  ipc = common.check_positive(cfg.server.ipc, "server.ipc", integer=True)
  return client_lib.LocalDMConfig(
      ipc=ipc, iterations=iterations, lr=lr,
      momentum=float(common.unless_none(b.central_momentum,
                                        cfg.local.momentum)),
      batch_real=common.check_positive(
          common.unless_none(b.central_batch_real, cfg.local.batch_real),
          "baseline.central_batch_real", integer=True),
      dsa_strategy=s.dsa_strategy, pae=bool(cfg.server.pae),
      std_weight=float(cfg.server.std_weight),
      init=b.central_init,
      compute_dtype=cfg.compute_dtype)


def run(s, timings: dict) -> dict:
  """Distils the pooled training set with DM.

  Args:
    s: ``setup.Setup`` (its ``train_x`` / ``dataset.train_y`` are the
      union of all clients' data).
    timings: receives ``central_dm`` (wall seconds).

  Returns:
    ``{"images": [M, ...] float32, "labels": [M] int32}`` with ipc images for
    every class present in the training set (raw images; PAE, if
    configured, is applied by the evaluator as for CollabDM).
  """
  t0 = time.perf_counter()
  images, labels = client_lib.local_distill(
      common.baseline_key(s.root, "central_dm"), s.train_x,
      s.dataset.train_y, s.dataset.num_classes, s.model, s.input_shape,
      local_dm_config(s))
  timings["central_dm"] = time.perf_counter() - t0
  return {"images": images.astype("float32"), "labels": labels.astype("int32")}
